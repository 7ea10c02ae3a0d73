"""Distances and normalisation shared by the losses and the models.

Everything here is jit-compatible with static shapes and has a finite gradient where the
distance or norm is 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "cosine_similarity",
    "l2_normalize",
    "pairwise_distances",
    "safe_sqrt",
    "squared_distances",
]

# Same floor as torch.nn.functional.normalize, so that normalised embeddings agree with
# pytorch-metric-learning to the last bit for ordinary inputs.
_NORM_EPS = 1e-12

# Up to this many elements, squared_distances uses the [n, m, d] differences (exact to
# rounding, no cancellation); above it, the expansion ‖a‖² + ‖b‖² − 2a·b on centred
# inputs, which needs no [n, m, d] intermediate.
_MAX_DIFFERENCE_ELEMENTS = 2**22


def pairwise_distances(
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    *,
    squared: bool = True,
) -> jax.Array:
    r"""Euclidean distances between every row of ``a`` and every row of ``b``.

    .. math::
      D_{ij} = \max\big(0,\ \|a_i\|^2 + \|b_j\|^2 - 2\, a_i^\top b_j\big)
      \quad\text{(squared)}, \qquad \sqrt{D_{ij}}\ \text{otherwise.}

    The expansion uses one matrix product (computed at ``Precision.HIGHEST`` so that
    accelerators do not round the inputs to bfloat16/TF32, which would make small distances
    meaningless). Cancellation can leave tiny negative values, which are clamped to 0. The
    square root is "safe": where the squared distance is 0 (the diagonal of
    ``pairwise_distances(x, x)``, duplicate points), the value is 0 and its gradient is 0
    instead of NaN/inf.

    Args:
      a: points ``[n, dim]``.
      b: points ``[m, dim]``.
      squared: return squared distances (default) or Euclidean distances.

    Returns:
      distances ``[n, m]``, dtype of the promoted inputs.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0, 0.0], [3.0, 4.0]])
      >>> pairwise_distances(x, x, squared=False)
      Array([[0., 5.],
             [5., 0.]], dtype=float32)

    Raises:
      ValueError: if ``a`` or ``b`` is not 2-D or their last dimensions differ.
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            "pairwise_distances expects a [n, dim] and b [m, dim] with the same dim; "
            f"got a.shape={a.shape}, b.shape={b.shape}."
        )
    dtype = jnp.result_type(a, b, jnp.float32)
    a = a.astype(dtype)
    b = b.astype(dtype)
    sq_a = jnp.sum(a * a, axis=1)
    sq_b = jnp.sum(b * b, axis=1)
    dots = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    sq_dists = jnp.maximum(sq_a[:, None] + sq_b[None, :] - 2.0 * dots, 0.0)
    if squared:
        return sq_dists
    return safe_sqrt(sq_dists)


def squared_distances(
    points: jax.Array, centres: jax.Array, *, use_differences: bool | None = None
) -> jax.Array:
    """Squared Euclidean distances ``[n, m]`` between points ``[n, d]`` and centres ``[m, d]``.

    Unlike :func:`pairwise_distances` (the expansion, as pytorch-metric-learning), exact
    to rounding for small inputs (``use_differences``; None: up to
    ``_MAX_DIFFERENCE_ELEMENTS`` elements of ``[n, m, d]``) and centred before the
    expansion otherwise, so data far from the origin do not cancel catastrophically.
    The Magnet Loss, whose σ² normalises these distances, uses it.
    """
    if use_differences is None:
        size = points.shape[0] * centres.shape[0] * points.shape[1]
        use_differences = size <= _MAX_DIFFERENCE_ELEMENTS
    if use_differences:
        differences = points[:, None, :] - centres[None, :, :]
        return jnp.sum(differences * differences, axis=-1)
    # Distances are translation invariant; centring first keeps the expansion from
    # cancelling catastrophically when the data sit far from the origin.
    shift = jax.lax.stop_gradient(jnp.mean(centres, axis=0))
    points = points - shift
    centres = centres - shift
    cross = jnp.matmul(points, centres.T, precision=jax.lax.Precision.HIGHEST)
    points_norms = jnp.sum(points * points, axis=-1)
    centres_norms = jnp.sum(centres * centres, axis=-1)
    return jnp.maximum(points_norms[:, None] + centres_norms[None, :] - 2 * cross, 0)


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x >= 0`` whose gradient at 0 is 0 instead of inf/NaN."""
    positive = x > 0
    # The inner where keeps sqrt's own derivative finite on the masked branch, so the
    # outer where's zero cotangent does not meet an inf (0 * inf = NaN).
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    r"""``x / max(‖x‖, 1e-12)`` along ``axis`` (as ``torch.nn.functional.normalize``).

    Finite value and gradient for an all-zero row (it stays zero). The one normalisation
    of the library (the models' normalised embeddings and the losses' cosine terms): the
    floor is torch's, on the norm (1e-24 on the squared norm), so that the baseline losses
    agree with pytorch-metric-learning to the last bit and a loss that normalises again
    an embedding a model normalised leaves it unchanged; rows shorter than 1e-12 are not
    embeddings anyone trains.
    """
    sq_norm = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq_norm, _NORM_EPS**2))


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarities ``[n, m]`` between rows of ``a [n, d]`` and ``b [m, d]``."""
    return jnp.matmul(l2_normalize(a), l2_normalize(b).T, precision=jax.lax.Precision.HIGHEST)
