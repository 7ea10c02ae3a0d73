"""Input checks shared by the library's modules.

Values are checked eagerly when they are concrete; under ``jax.jit`` they are tracers
whose values are unknown, and only their shapes and dtypes can be checked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(value) -> bool:
    """Whether ``value`` has a value now (it is not being traced)."""
    return not isinstance(value, jax.core.Tracer)


def concrete(value) -> np.ndarray | None:
    """``value`` as a NumPy array, or None while it is being traced."""
    return np.asarray(value) if is_concrete(value) else None


def check_integer_vector(name: str, value, length: int | None = None) -> None:
    """Raises ValueError unless ``value`` is an integer vector (of ``length`` if given)."""
    shape = np.shape(value)
    if length is not None and shape != (length,):
        raise ValueError(f"{name} must have shape [N] = ({length},), got {shape}")
    if len(shape) != 1:
        raise ValueError(f"{name} must be a vector [N], got shape {shape}")
    check_integer_dtype(name, value)


def check_integer_dtype(name: str, value) -> None:
    """Raises ValueError unless ``value`` has an integer dtype."""
    dtype = jnp.result_type(value)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {dtype}")
