"""Input checks shared by the losses (eager: shapes and dtypes are static under jit)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_REDUCTIONS = ("mean", "sum", "none")


def check_embeddings_and_labels(
    fn_name: str, embeddings: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """Eager shape/dtype checks shared by every loss; returns the inputs as arrays.

    Embeddings are promoted to at least float32 (integer or float16 inputs would otherwise
    lose the distance arithmetic).
    """
    embeddings = jnp.asarray(embeddings)
    labels = jnp.asarray(labels)
    if embeddings.ndim != 2:
        raise ValueError(
            f"{fn_name}: embeddings must be [batch, dim]; got shape {embeddings.shape}."
        )
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(
            f"{fn_name}: labels must be [batch] matching embeddings [batch, dim]; got "
            f"labels.shape={labels.shape}, embeddings.shape={embeddings.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"{fn_name}: labels must be integers; got dtype {labels.dtype} (shape {labels.shape})."
        )
    if embeddings.shape[0] == 0:
        raise ValueError(f"{fn_name}: empty batch, embeddings.shape={embeddings.shape}.")
    dtype = jnp.result_type(embeddings, jnp.float32)
    return embeddings.astype(dtype), labels


def check_class_weights(
    fn_name: str, name: str, weights: jax.typing.ArrayLike, embeddings: jax.Array
) -> jax.Array:
    """Checks a per-class parameter matrix (proxies, classifier weights) ``[C, dim]``."""
    weights = jnp.asarray(weights)
    if weights.ndim != 2 or weights.shape[1] != embeddings.shape[1] or weights.shape[0] == 0:
        raise ValueError(
            f"{fn_name}: {name} must be [num_classes, dim] with the embeddings' dim; got "
            f"{name}.shape={weights.shape}, embeddings.shape={embeddings.shape}."
        )
    return weights.astype(jnp.result_type(weights, embeddings))


def check_reduction(fn_name: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn_name}: reduction must be one of {_REDUCTIONS}; got {reduction!r}.")
