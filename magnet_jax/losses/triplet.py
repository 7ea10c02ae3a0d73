"""Triplet loss with in-batch mining: batch-all, batch-hard and semi-hard.

The triplet baseline of the Magnet Loss paper, in the forms that are actually used: every
valid triplet of the batch (Hermans et al.'s "batch all"), the hardest positive and hardest
negative of every anchor ("batch hard"), and FaceNet's semi-hard negatives.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from magnet_jax.losses._checks import check_embeddings_and_labels, check_reduction
from magnet_jax.losses._masked import (
    label_masks,
    masked_max,
    masked_min,
    mean_nonzero,
    reduce_losses,
)
from magnet_jax.losses.distances import l2_normalize, pairwise_distances
from magnet_jax.names import MININGS

__all__ = ["triplet_loss"]

_MINING = MININGS


def triplet_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    margin: float = 0.2,
    mining: Literal["batch_all", "batch_hard", "semi_hard"] = "batch_all",
    squared: bool = True,
    normalize: bool = False,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> jax.Array:
    r"""Triplet margin loss over the triplets mined inside the batch.

    With :math:`d` the (squared) Euclidean distance, a triplet ``(a, p, n)`` has
    ``labels[a] == labels[p]``, ``a != p``, ``labels[a] != labels[n]`` and loss

    .. math::
      \ell(a, p, n) = \max\big(0,\ d(x_a, x_p) - d(x_a, x_n) + \text{margin}\big).

    ``mining`` chooses the triplets:

    * ``"batch_all"``: every valid triplet. ``reduction="mean"`` averages over the triplets
      with :math:`\ell > 0` only ("batch all (+)" of Hermans et al.; pytorch-metric-learning's
      ``AvgNonZeroReducer``); 0 when no triplet violates the margin.
    * ``"batch_hard"``: one triplet per anchor, its farthest positive and its nearest
      negative (Hermans et al., 2017). ``"mean"`` averages over the anchors that have at
      least one positive and one negative (pytorch-metric-learning's ``BatchHardMiner`` +
      ``TripletMarginLoss`` instead averages over the anchors with non-zero loss).
    * ``"semi_hard"``: one triplet per positive pair ``(a, p)``, with the nearest negative
      that is farther than the positive, :math:`d(x_a,x_n) > d(x_a,x_p)` (FaceNet; the
      semantics of TF-Addons' ``triplet_semihard_loss``). Such a negative only contributes
      when it lies within the margin. If ``a`` has no negative farther than ``p``, the
      fallback is its farthest negative (all of them are then closer than ``p``), exactly as
      TF-Addons. ``"mean"`` averages over the positive pairs whose anchor has a negative.
      This differs from pytorch-metric-learning's ``TripletMarginMiner("semihard")``, which
      keeps *every* triplet with :math:`0 < d_{an} - d_{ap} \le \text{margin}` and has no
      fallback.

    Anchors without a positive or without a negative in the batch contribute nothing (and
    are not counted by the mean); a batch with no valid triplet gives 0 with zero gradient,
    never NaN. ``"batch_all"`` and ``"semi_hard"`` build a ``[batch, batch, batch]`` tensor:
    fine for batches of a few hundred.

    Args:
      embeddings: embeddings ``[batch, dim]``.
      labels: integer class labels ``[batch]``.
      margin: the margin :math:`\alpha` (in the units of ``d``: squared or not).
      mining: ``"batch_all"``, ``"batch_hard"`` or ``"semi_hard"``, see above.
      squared: use squared Euclidean distances (FaceNet; the default) or plain ones
        (Hermans et al. recommend these for batch-hard). The square root has a zero, finite
        gradient at distance 0.
      normalize: L2-normalise the embeddings first (then squared distances lie in [0, 4]).
      reduction: ``"mean"`` (see above), ``"sum"`` (sum over the mined triplets), or
        ``"none"``: the per-triplet losses with zeros at invalid entries, of shape
        ``[batch, batch, batch]`` indexed ``[a, p, n]`` for batch-all, ``[batch]`` (per
        anchor) for batch-hard, ``[batch, batch]`` indexed ``[a, p]`` for semi-hard.

    Returns:
      The scalar loss ``[]`` (or the per-triplet losses with ``reduction="none"``).

    Raises:
      ValueError: for embeddings that are not ``[batch, dim]``, labels that are not integer
        ``[batch]``, or an unknown ``mining``/``reduction``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0], [1.0], [3.0]])
      >>> y = jnp.array([0, 0, 1])
      >>> # triplets (0,1,2): 1 - 9 + 9 = 1 and (1,0,2): 1 - 4 + 9 = 6 -> mean 3.5
      >>> float(triplet_loss(x, y, margin=9.0))
      3.5

    References:
      Schroff, Kalenichenko, Philbin, "FaceNet: A Unified Embedding for Face Recognition
      and Clustering", CVPR 2015, arXiv:1503.03832.

      Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for Person Re-Identification",
      2017, arXiv:1703.07737.
    """
    embeddings, labels = check_embeddings_and_labels("triplet_loss", embeddings, labels)
    if mining not in _MINING:
        raise ValueError(f"triplet_loss: mining must be one of {_MINING}; got {mining!r}.")
    check_reduction("triplet_loss", reduction)

    if normalize:
        embeddings = l2_normalize(embeddings)
    dists = pairwise_distances(embeddings, embeddings, squared=squared)
    positive, negative = label_masks(labels)

    if mining == "batch_all":
        valid = positive[:, :, None] & negative[:, None, :]
        losses = jax.nn.relu(dists[:, :, None] - dists[:, None, :] + margin)
        losses = jnp.where(valid, losses, 0.0)
        if reduction == "mean":
            return mean_nonzero(losses)
        return reduce_losses(losses, valid, reduction)

    has_negative = jnp.any(negative, axis=1)
    if mining == "batch_hard":
        hardest_positive = masked_max(dists, positive, axis=1)
        hardest_negative = masked_min(dists, negative, axis=1)
        valid = jnp.any(positive, axis=1) & has_negative
        losses = jax.nn.relu(hardest_positive - hardest_negative + margin)
        return reduce_losses(losses, valid, reduction)

    # semi_hard: for every pair (a, p), negatives n with d[a, n] > d[a, p].
    dist_ap = dists[:, :, None]
    dist_an = dists[:, None, :]
    farther = negative[:, None, :] & (dist_an > dist_ap)
    nearest_farther = masked_min(jnp.broadcast_to(dist_an, farther.shape), farther, axis=2)
    farthest_negative = masked_max(dists, negative, axis=1)
    semi_hard_negative = jnp.where(
        jnp.any(farther, axis=2), nearest_farther, farthest_negative[:, None]
    )
    valid = positive & has_negative[:, None]
    losses = jax.nn.relu(dists - semi_hard_negative + margin)
    return reduce_losses(losses, valid, reduction)
