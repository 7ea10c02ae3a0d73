"""Pair-based losses: contrastive and multi-similarity (with its pair miner).

Every ordered pair ``(i, j)``, ``i != j``, of the batch is a positive pair (same label) or a
negative pair. Conventions follow pytorch-metric-learning so that values can be compared.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from magnet_jax.losses._checks import check_embeddings_and_labels, check_reduction
from magnet_jax.losses._masked import label_masks, masked_logsumexp, mean_nonzero, reduce_losses
from magnet_jax.losses.distances import cosine_similarity, l2_normalize, pairwise_distances

__all__ = ["contrastive_loss", "multi_similarity_loss", "multi_similarity_miner"]


def contrastive_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    squared: bool = False,
    normalize: bool = False,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> jax.Array:
    r"""Contrastive loss: hinge on positive-pair and negative-pair distances.

    With :math:`d` the Euclidean distance (squared if ``squared``), for ordered pairs
    ``i != j``:

    .. math::
      \ell^+_{ij} = \max(0,\ d_{ij} - m^+) \ \ (y_i = y_j), \qquad
      \ell^-_{ij} = \max(0,\ m^- - d_{ij}) \ \ (y_i \ne y_j),

    and with ``reduction="mean"`` the loss is the mean of the non-zero :math:`\ell^+` plus
    the mean of the non-zero :math:`\ell^-` (each 0 when there is none), the convention of
    pytorch-metric-learning's ``ContrastiveLoss`` with its default ``AvgNonZeroReducer``.
    Note the hinge is on the distance itself, not its square as in Hadsell et al.; use
    ``squared=True`` for squared distances.

    Args:
      embeddings: embeddings ``[batch, dim]``.
      labels: integer class labels ``[batch]``.
      pos_margin: positive pairs closer than this cost nothing.
      neg_margin: negative pairs farther than this cost nothing.
      squared: use squared Euclidean distances (default: plain distances, with a zero
        gradient at distance 0).
      normalize: L2-normalise the embeddings first.
      reduction: ``"mean"`` (see above), ``"sum"`` over all pairs, or ``"none"``: the
        per-pair losses ``[batch, batch]`` (0 on the diagonal).

    Returns:
      The scalar loss ``[]`` (``[batch, batch]`` with ``reduction="none"``).

    Raises:
      ValueError: for embeddings that are not ``[batch, dim]``, labels that are not integer
        ``[batch]``, or an unknown ``reduction``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0], [0.5], [0.8]])
      >>> y = jnp.array([0, 0, 1])
      >>> # positive pairs: d = 0.5 twice -> 0.5; negatives: 1 - 0.8 and 1 - 0.3 -> mean 0.45
      >>> round(float(contrastive_loss(x, y)), 4)
      0.95

    References:
      Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an Invariant Mapping",
      CVPR 2006.
    """
    embeddings, labels = check_embeddings_and_labels("contrastive_loss", embeddings, labels)
    check_reduction("contrastive_loss", reduction)
    if normalize:
        embeddings = l2_normalize(embeddings)
    dists = pairwise_distances(embeddings, embeddings, squared=squared)
    positive, negative = label_masks(labels)
    pos_losses = jnp.where(positive, jax.nn.relu(dists - pos_margin), 0.0)
    neg_losses = jnp.where(negative, jax.nn.relu(neg_margin - dists), 0.0)
    if reduction == "mean":
        return mean_nonzero(pos_losses) + mean_nonzero(neg_losses)
    return reduce_losses(pos_losses + neg_losses, positive | negative, reduction)


def multi_similarity_miner(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    epsilon: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    r"""Multi-similarity pair mining: the informative positive and negative pairs.

    With :math:`S` the cosine similarity, a positive pair ``(i, j)`` is kept when it is less
    similar than the hardest negative of ``i`` plus ``epsilon``, and a negative pair when it
    is more similar than the hardest positive of ``i`` minus ``epsilon``:

    .. math::
      S_{ij} - \epsilon < \max_{k: y_k \ne y_i} S_{ik}, \qquad
      S_{ij} + \epsilon > \min_{k \ne i: y_k = y_i} S_{ik}.

    An anchor without negatives keeps no positives, and one without positives keeps no
    negatives (pytorch-metric-learning's ``MultiSimilarityMiner``). The masks carry no
    gradient.

    Args:
      embeddings: embeddings ``[batch, dim]``.
      labels: integer class labels ``[batch]``.
      epsilon: the mining margin :math:`\epsilon`.

    Returns:
      ``(positive_pairs, negative_pairs)``: boolean masks ``[batch, batch]``, indexed
      ``[anchor, other]``.

    Raises:
      ValueError: for embeddings that are not ``[batch, dim]`` or labels that are not
        integer ``[batch]``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
      >>> pos, neg = multi_similarity_miner(x, jnp.array([0, 0, 1]))
      >>> bool(pos[0, 1]), bool(neg[0, 2])
      (True, True)

    References:
      Wang, Han, Huang, Dong, Scott, "Multi-Similarity Loss with General Pair Weighting for
      Deep Metric Learning", CVPR 2019, arXiv:1904.06627.
    """
    embeddings, labels = check_embeddings_and_labels("multi_similarity_miner", embeddings, labels)
    similarities = jax.lax.stop_gradient(cosine_similarity(embeddings, embeddings))
    return _mine_pairs(similarities, labels, epsilon)


def _mine_pairs(
    similarities: jax.Array, labels: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array]:
    positive, negative = label_masks(labels)
    dtype = similarities.dtype
    # Empty sets give -max / +max so that no comparison with them can succeed.
    hardest_negative = jnp.max(
        jnp.where(negative, similarities, jnp.finfo(dtype).min), axis=1, keepdims=True
    )
    hardest_positive = jnp.min(
        jnp.where(positive, similarities, jnp.finfo(dtype).max), axis=1, keepdims=True
    )
    mined_positive = positive & (similarities - epsilon < hardest_negative)
    mined_negative = negative & (similarities + epsilon > hardest_positive)
    return mined_positive, mined_negative


def multi_similarity_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    mine: bool = True,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> jax.Array:
    r"""Multi-similarity loss on cosine similarities, with its pair miner.

    With :math:`S` the cosine similarity, :math:`\lambda` = ``base``, and :math:`P_i`,
    :math:`N_i` the positive and negative pairs of anchor ``i`` (those kept by
    :func:`multi_similarity_miner` when ``mine``, else all of them):

    .. math::
      \ell_i = \frac{1}{\alpha}\log\Big(1 + \sum_{j \in P_i} e^{-\alpha (S_{ij} - \lambda)}\Big)
             + \frac{1}{\beta}\log\Big(1 + \sum_{j \in N_i} e^{\beta (S_{ij} - \lambda)}\Big),

    and the loss is the mean of :math:`\ell_i` over all anchors of the batch (anchors with
    no mined pair contribute 0 and still count, as pytorch-metric-learning's
    ``MultiSimilarityLoss`` + ``MultiSimilarityMiner`` with its ``MeanReducer``). One
    deliberate difference: pytorch-metric-learning returns 0 when at most one positive and
    at most one negative pair are mined in the whole batch; here those pairs count.

    Args:
      embeddings: embeddings ``[batch, dim]`` (normalised internally).
      labels: integer class labels ``[batch]``.
      alpha: scale of the positive term :math:`\alpha`.
      beta: scale of the negative term :math:`\beta`.
      base: the similarity offset :math:`\lambda`.
      epsilon: the mining margin (ignored unless ``mine``).
      mine: use the multi-similarity miner (default) or every pair.
      reduction: ``"mean"`` over anchors, ``"sum"``, or ``"none"``: per-anchor ``[batch]``.

    Returns:
      The scalar loss ``[]`` (``[batch]`` with ``reduction="none"``).

    Raises:
      ValueError: for embeddings that are not ``[batch, dim]``, labels that are not integer
        ``[batch]``, or an unknown ``reduction``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
      >>> loss = multi_similarity_loss(x, jnp.array([0, 0, 1]))
      >>> loss.shape
      ()

    References:
      Wang, Han, Huang, Dong, Scott, "Multi-Similarity Loss with General Pair Weighting for
      Deep Metric Learning", CVPR 2019, arXiv:1904.06627.
    """
    embeddings, labels = check_embeddings_and_labels("multi_similarity_loss", embeddings, labels)
    check_reduction("multi_similarity_loss", reduction)
    similarities = cosine_similarity(embeddings, embeddings)
    if mine:
        positive, negative = _mine_pairs(jax.lax.stop_gradient(similarities), labels, epsilon)
    else:
        positive, negative = label_masks(labels)
    pos_term = masked_logsumexp(-alpha * (similarities - base), positive, axis=1, add_one=True)
    neg_term = masked_logsumexp(beta * (similarities - base), negative, axis=1, add_one=True)
    losses = pos_term / alpha + neg_term / beta
    return reduce_losses(losses, jnp.ones_like(losses, dtype=bool), reduction)
