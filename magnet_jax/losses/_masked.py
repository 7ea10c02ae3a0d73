"""Label masks and reductions over them, shared by the losses.

Label structure is expressed as boolean masks, never by boolean indexing, and every
reduction over a possibly empty set has a defined, finite value and gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def label_masks(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Boolean ``[B, B]`` masks of positive pairs (same label, ``i != j``) and negative pairs."""
    same = labels[:, None] == labels[None, :]
    not_self = ~jnp.eye(labels.shape[0], dtype=bool)
    return same & not_self, ~same


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
