"""Shared numerics for the metric-learning losses: distances, masks, safe reductions.

Everything here is jit-compatible with static shapes: label structure is expressed as
boolean masks, never by boolean indexing, and every reduction over a possibly empty set
has a defined, finite value and gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "pairwise_distances",
    "safe_sqrt",
    "cosine_similarity",
    "l2_normalize",
    "label_masks",
    "check_embeddings_and_labels",
    "check_class_weights",
    "masked_max",
    "masked_min",
    "masked_logsumexp",
    "mean_nonzero",
    "check_reduction",
    "reduce_losses",
]

# Same floor as torch.nn.functional.normalize, so that normalised embeddings agree with
# pytorch-metric-learning to the last bit for ordinary inputs.
_NORM_EPS = 1e-12


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


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x >= 0`` whose gradient at 0 is 0 instead of inf/NaN."""
    positive = x > 0
    # The inner where keeps sqrt's own derivative finite on the masked branch, so the
    # outer where's zero cotangent does not meet an inf (0 * inf = NaN).
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    r"""``x / max(‖x‖, 1e-12)`` along ``axis`` (as ``torch.nn.functional.normalize``).

    Finite value and gradient for an all-zero row (it stays zero).
    """
    sq_norm = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq_norm, _NORM_EPS**2))


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarities ``[n, m]`` between rows of ``a [n, d]`` and ``b [m, d]``."""
    return jnp.matmul(l2_normalize(a), l2_normalize(b).T, precision=jax.lax.Precision.HIGHEST)


def label_masks(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Boolean ``[B, B]`` masks of positive pairs (same label, ``i != j``) and negative pairs."""
    same = labels[:, None] == labels[None, :]
    not_self = ~jnp.eye(labels.shape[0], dtype=bool)
    return same & not_self, ~same


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


def masked_max(x: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """Max of ``x`` over ``mask`` along ``axis``; 0 where the mask is empty (zero gradient)."""
    lowest = jnp.finfo(x.dtype).min
    out = jnp.max(jnp.where(mask, x, lowest), axis=axis)
    return jnp.where(jnp.any(mask, axis=axis), out, 0.0)


def masked_min(x: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """Min of ``x`` over ``mask`` along ``axis``; 0 where the mask is empty (zero gradient)."""
    highest = jnp.finfo(x.dtype).max
    out = jnp.min(jnp.where(mask, x, highest), axis=axis)
    return jnp.where(jnp.any(mask, axis=axis), out, 0.0)


def masked_logsumexp(
    x: jax.Array, mask: jax.Array, axis: int = -1, *, add_one: bool = False
) -> jax.Array:
    r"""``log(Σ_{mask} exp(x))`` (plus ``exp(0)`` when ``add_one``), finite for empty masks.

    With ``add_one`` this is ``log(1 + Σ exp x)``, which is 0 for an empty mask. Without it
    an empty mask gives 0 as well (instead of ``-inf``); callers decide what that means.
    """
    lowest = jnp.finfo(x.dtype).min
    out = jax.nn.logsumexp(jnp.where(mask, x, lowest), axis=axis)
    if add_one:
        # An empty mask leaves out ~ finfo.min, so logaddexp(out, 0) = 0 with zero gradient.
        return jnp.logaddexp(out, 0.0)
    return jnp.where(jnp.any(mask, axis=axis), out, 0.0)


def mean_nonzero(losses: jax.Array) -> jax.Array:
    """Mean of the strictly positive entries of ``losses`` (0 if there are none).

    The convention of pytorch-metric-learning's ``AvgNonZeroReducer`` and of Hermans et al.'s
    "batch all (+)": easy terms that already satisfy the margin do not dilute the average.
    The count is piecewise constant, so it carries no gradient.
    """
    count = jnp.sum(losses > 0)
    return jnp.sum(losses) / jnp.maximum(count, 1).astype(losses.dtype)


_REDUCTIONS = ("mean", "sum", "none")


def check_reduction(fn_name: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn_name}: reduction must be one of {_REDUCTIONS}; got {reduction!r}.")


def reduce_losses(losses: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
    """Reduces per-term ``losses`` over the ``valid`` terms: mean (0 if none), sum or none.

    With ``"none"`` the losses are returned with invalid terms set to 0.
    """
    losses = jnp.where(valid, losses, 0.0)
    if reduction == "none":
        return losses
    total = jnp.sum(losses)
    if reduction == "sum":
        return total
    return total / jnp.maximum(jnp.sum(valid), 1).astype(losses.dtype)
