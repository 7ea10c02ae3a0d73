"""Piecewise-linear manifold (PLM) losses for unsupervised metric learning.

Bhatnagar & Ahuja, *Piecewise-Linear Manifolds for Deep Metric Learning* (CPAL 2024,
arXiv:2403.14977). The embedding is trained to make its distances match the
dissimilarities estimated from linear pieces fitted to a momentum (EMA) copy of the
network's embeddings (:mod:`magnet_jax.manifolds`):

.. math::
  L = L_\\text{point} + \\lambda_\\rho L_\\text{proxy} + \\lambda_\\nu L_\\text{neighbourhood},
  \\qquad \\ell(s, a, b) = \\big(\\delta\\,(1 - s) - \\|a - b\\|_2\\big)^2,

over pairs of batch points, pairs of a batch point and a learnable proxy, and pairs of a
batch point and the members of its linear piece. Labels are never used. The target
similarities are inputs (computed by :func:`plm_targets` from the momentum encoder's
embeddings and pieces) and are treated as constants: the gradient flows only through the
distances, as a pseudo-label's would.

No code of the paper is public; the choices made where its text is silent are stated in
each docstring.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from magnet_jax.losses._checks import check_reduction
from magnet_jax.losses._masked import reduce_losses
from magnet_jax.losses.distances import pairwise_distances, safe_sqrt
from magnet_jax.manifolds import SimilarityMode, piece_similarity

__all__ = [
    "PLMTargets",
    "PLMTerms",
    "plm_loss",
    "plm_neighbourhood_loss",
    "plm_point_loss",
    "plm_proxy_loss",
    "plm_targets",
]


class PLMTargets(NamedTuple):
    """Target similarities of one batch (constants for the loss).

    Attributes:
      points: ``[B, B]`` between batch points.
      proxies: ``[B, P]`` between batch points and proxies.
      neighbours: ``[B, k]`` between each batch point and its piece's members.
    """

    points: jax.Array
    proxies: jax.Array
    neighbours: jax.Array


class PLMTerms(NamedTuple):
    """The PLM objective and its three terms, all scalars ``[]``.

    ``loss = point + proxy_weight · proxy + neighbourhood_weight · neighbourhood``.
    """

    loss: jax.Array
    point: jax.Array
    proxy: jax.Array
    neighbourhood: jax.Array


def _check_delta(fn_name: str, delta) -> None:
    if isinstance(delta, (int, float)) and not delta > 0:
        raise ValueError(f"{fn_name}: delta must be > 0; got {delta}.")


def _squared_errors(similarities: jax.Array, distances: jax.Array, delta) -> jax.Array:
    targets = delta * (1.0 - jax.lax.stop_gradient(similarities))
    return (targets - distances) ** 2


def plm_point_loss(
    embeddings: jax.typing.ArrayLike,
    similarities: jax.typing.ArrayLike,
    *,
    delta: float = 1.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> jax.Array:
    r"""Point term: distances between batch points match the estimated dissimilarities.

    .. math::
      L_\text{point} = \frac{1}{B(B-1)} \sum_{i \ne j}
        \big(\delta\,(1 - s_{ij}) - \|f(x_i) - f(x_j)\|_2\big)^2.

    ``delta`` is the distance of fully dissimilar points (the paper's :math:`\delta`; its
    value is not public: 1, the diameter scale of L2-normalised embeddings, is the
    default). The embeddings are used as given; normalise them first if the network does
    not. Every ordered pair counts, so a symmetric ``similarities`` weighs each unordered
    pair twice, which the mean absorbs. The distance's square root has zero gradient at 0
    (duplicate points in a batch), not NaN.

    Args:
      embeddings: ``[B, d]`` the online network's embeddings.
      similarities: ``[B, B]`` target similarities in ``[0, 1]`` (constant: no gradient
        flows into them), e.g. :attr:`PLMTargets.points`.
      delta: :math:`\delta > 0`.
      reduction: ``"mean"`` over the ``B(B-1)`` pairs, ``"sum"``, or ``"none"``:
        ``[B, B]`` with a zero diagonal.

    Returns:
      The scalar loss ``[]`` (``[B, B]`` with ``reduction="none"``).

    Raises:
      ValueError: on mismatched shapes, ``delta <= 0`` or an unknown reduction.
    """
    embeddings, similarities = jnp.asarray(embeddings), jnp.asarray(similarities)
    batch = embeddings.shape[0] if embeddings.ndim == 2 else -1
    if embeddings.ndim != 2 or similarities.shape != (batch, batch):
        raise ValueError(
            "plm_point_loss expects embeddings [B, d] and similarities [B, B]; got "
            f"embeddings.shape={embeddings.shape}, similarities.shape={similarities.shape}."
        )
    _check_delta("plm_point_loss", delta)
    check_reduction("plm_point_loss", reduction)
    distances = pairwise_distances(embeddings, embeddings, squared=False)
    errors = _squared_errors(similarities.astype(distances.dtype), distances, delta)
    off_diagonal = ~jnp.eye(batch, dtype=bool)
    return reduce_losses(errors, off_diagonal, reduction)


def plm_proxy_loss(
    embeddings: jax.typing.ArrayLike,
    proxies: jax.typing.ArrayLike,
    similarities: jax.typing.ArrayLike,
    *,
    delta: float = 1.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> jax.Array:
    r"""Proxy term: proxies are treated like embeddings of extra points.

    .. math::
      L_\text{proxy} = \frac{1}{BP} \sum_{i, p}
        \big(\delta\,(1 - s_{ip}) - \|f(x_i) - \rho_p\|_2\big)^2,

    with :math:`s_{ip}` the similarity of proxy :math:`\rho_p` to the linear piece of
    point :math:`i` (:func:`plm_targets`). The paper's proxies stand for linear pieces
    and are learnt by back-propagation with the network; how their targets are formed is
    not public. Here a proxy that lies on a point's piece, near the point, is pulled to
    it, and one far from the piece is pushed to distance :math:`\delta`, so proxies settle
    on pieces and carry their structure across batches. The proxies are model parameters
    owned by the caller (gradient flows into them through the distance only).

    Args:
      embeddings: ``[B, d]``.
      proxies: ``[P, d]`` learnable proxies (the paper's default ``P`` is 100).
      similarities: ``[B, P]`` target similarities (constant), e.g.
        :attr:`PLMTargets.proxies`.
      delta: :math:`\delta > 0`.
      reduction: ``"mean"`` over the ``B·P`` pairs, ``"sum"``, or ``"none"``: ``[B, P]``.

    Returns:
      The scalar loss ``[]`` (``[B, P]`` with ``reduction="none"``).

    Raises:
      ValueError: on mismatched shapes, ``delta <= 0`` or an unknown reduction.
    """
    embeddings, proxies = jnp.asarray(embeddings), jnp.asarray(proxies)
    similarities = jnp.asarray(similarities)
    if (
        embeddings.ndim != 2
        or proxies.ndim != 2
        or proxies.shape[1] != embeddings.shape[1]
        or similarities.shape != (embeddings.shape[0], proxies.shape[0])
    ):
        raise ValueError(
            "plm_proxy_loss expects embeddings [B, d], proxies [P, d] and similarities "
            f"[B, P]; got embeddings.shape={embeddings.shape}, proxies.shape={proxies.shape}, "
            f"similarities.shape={similarities.shape}."
        )
    _check_delta("plm_proxy_loss", delta)
    check_reduction("plm_proxy_loss", reduction)
    distances = pairwise_distances(embeddings, proxies, squared=False)
    errors = _squared_errors(similarities.astype(distances.dtype), distances, delta)
    return reduce_losses(errors, jnp.ones_like(errors, dtype=bool), reduction)


def plm_neighbourhood_loss(
    embeddings: jax.typing.ArrayLike,
    neighbour_embeddings: jax.typing.ArrayLike,
    similarities: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    delta: float = 1.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> jax.Array:
    r"""Neighbourhood term: each batch point against the members of its linear piece.

    .. math::
      L_\text{neighbourhood} = \frac{1}{\sum_{ij} m_{ij}} \sum_{i, j} m_{ij}
        \big(\delta\,(1 - s_{ij}) - \|f(x_i) - e_{ij}\|_2\big)^2,

    where :math:`e_{ij}` are the momentum encoder's embeddings of the members of point
    :math:`i`'s piece (its neighbourhood after subset selection, mask :math:`m`) and
    :math:`s_{ij}` their similarity to the piece. The paper names a neighbourhood term on
    a point and its nearest neighbours without a public formula; this form is chosen
    because it reaches the whole neighbourhood of every batch point at the cost of a
    gather from the stored embeddings (no extra forward pass), whereas the point term only
    sees the neighbours that happen to be in the batch. The neighbour embeddings are
    constants.

    Args:
      embeddings: ``[B, d]`` the online network's embeddings.
      neighbour_embeddings: ``[B, k, d]`` stored momentum embeddings of each point's
        neighbours (constant).
      similarities: ``[B, k]`` target similarities (constant), e.g.
        :attr:`PLMTargets.neighbours`.
      mask: ``[B, k]`` bool, which neighbours count (members of the piece).
      delta: :math:`\delta > 0`.
      reduction: ``"mean"`` over the counted pairs (0 if none), ``"sum"``, or ``"none"``:
        ``[B, k]`` with 0 where the mask is off.

    Returns:
      The scalar loss ``[]`` (``[B, k]`` with ``reduction="none"``).

    Raises:
      ValueError: on mismatched shapes, ``delta <= 0`` or an unknown reduction.
    """
    embeddings = jnp.asarray(embeddings)
    neighbour_embeddings = jax.lax.stop_gradient(jnp.asarray(neighbour_embeddings))
    similarities, mask = jnp.asarray(similarities), jnp.asarray(mask)
    if (
        embeddings.ndim != 2
        or neighbour_embeddings.ndim != 3
        or neighbour_embeddings.shape[::2] != embeddings.shape
        or similarities.shape != neighbour_embeddings.shape[:2]
        or mask.shape != similarities.shape
    ):
        raise ValueError(
            "plm_neighbourhood_loss expects embeddings [B, d], neighbour_embeddings "
            f"[B, k, d], similarities [B, k] and mask [B, k]; got embeddings.shape="
            f"{embeddings.shape}, neighbour_embeddings.shape={neighbour_embeddings.shape}, "
            f"similarities.shape={similarities.shape}, mask.shape={mask.shape}."
        )
    _check_delta("plm_neighbourhood_loss", delta)
    check_reduction("plm_neighbourhood_loss", reduction)
    dtype = jnp.result_type(embeddings, neighbour_embeddings, jnp.float32)
    offsets = embeddings.astype(dtype)[:, None, :] - neighbour_embeddings.astype(dtype)
    distances = safe_sqrt(jnp.sum(offsets**2, axis=-1))
    errors = _squared_errors(similarities.astype(dtype), distances, delta)
    return reduce_losses(errors, mask.astype(bool), reduction)


def plm_targets(
    target_embeddings: jax.typing.ArrayLike,
    bases: jax.typing.ArrayLike,
    scales: jax.typing.ArrayLike,
    *,
    proxies: jax.typing.ArrayLike | None = None,
    neighbour_embeddings: jax.typing.ArrayLike | None = None,
    symmetric: bool = True,
    orthogonal_exponent: float = 3.0,
    inplane_exponent: float = 0.5,
    mode: SimilarityMode = "continuous",
) -> PLMTargets:
    r"""Target similarities of a batch from the momentum encoder's linear pieces.

    ``s(x_i, x_j)`` uses :math:`x_j`'s piece anchored at :math:`x_j`'s momentum embedding
    (:func:`magnet_jax.manifolds.piece_similarity`). That similarity is not symmetric, the
    distance it is compared with is; with ``symmetric=True`` (default, a choice: the paper
    does not say) the point targets are :math:`(s_{ij} + s_{ji})/2`, so neither point's
    piece is favoured. A proxy's target with point :math:`i` is the proxy's similarity to
    :math:`i`'s piece, a neighbour's target is its similarity to :math:`i`'s piece. The
    proxies enter as constants (their gradient comes from the loss's distances only).

    Args:
      target_embeddings: ``[B, d]`` momentum-encoder embeddings of the batch.
      bases: ``[B, d, r]`` the batch points' piece bases (``pieces.bases[batch]``).
      scales: ``[B]`` their length scales (e.g. ``pieces.radii[batch]``).
      proxies: ``[P, d]`` or ``None`` (the proxy targets are then ``[B, 0]``).
      neighbour_embeddings: ``[B, k, d]`` momentum embeddings of each point's neighbours,
        or ``None`` (``[B, 0]``).
      symmetric: average :math:`s_{ij}` and :math:`s_{ji}` for the point targets.
      orthogonal_exponent, inplane_exponent, mode: as
        :func:`magnet_jax.manifolds.piece_similarity`.

    Returns:
      :class:`PLMTargets`, all without gradient.
    """
    target_embeddings = jax.lax.stop_gradient(jnp.asarray(target_embeddings))
    similarity = dict(
        orthogonal_exponent=orthogonal_exponent, inplane_exponent=inplane_exponent, mode=mode
    )
    # [B, B]: row i, column j = s(x_i, x_j) by x_j's piece.
    points = piece_similarity(target_embeddings, target_embeddings, bases, scales, **similarity)
    if symmetric:
        points = 0.5 * (points + points.T)
    batch = target_embeddings.shape[0]
    if proxies is None:
        proxy_targets = jnp.zeros((batch, 0), points.dtype)
    else:
        proxies = jax.lax.stop_gradient(jnp.asarray(proxies))
        proxy_targets = piece_similarity(proxies, target_embeddings, bases, scales, **similarity).T
    if neighbour_embeddings is None:
        neighbour_targets = jnp.zeros((batch, 0), points.dtype)
    else:
        neighbour_embeddings = jax.lax.stop_gradient(jnp.asarray(neighbour_embeddings))

        def own_piece(members, anchor, basis, scale):
            return piece_similarity(members, anchor[None], basis[None], scale[None], **similarity)

        neighbour_targets = jax.vmap(own_piece)(
            neighbour_embeddings, target_embeddings, jnp.asarray(bases), jnp.asarray(scales)
        )[..., 0]
    return PLMTargets(
        points=jax.lax.stop_gradient(points),
        proxies=jax.lax.stop_gradient(proxy_targets),
        neighbours=jax.lax.stop_gradient(neighbour_targets),
    )


def plm_loss(
    embeddings: jax.typing.ArrayLike,
    targets: PLMTargets,
    *,
    proxies: jax.typing.ArrayLike | None = None,
    neighbour_embeddings: jax.typing.ArrayLike | None = None,
    neighbour_mask: jax.typing.ArrayLike | None = None,
    delta: float = 1.0,
    proxy_weight: float = 1.0,
    neighbourhood_weight: float = 1.0,
) -> PLMTerms:
    r"""The PLM objective :math:`L_\text{point} + \lambda_\rho L_\text{proxy} +
    \lambda_\nu L_\text{neighbourhood}` of one batch.

    The paper sums the three terms; the weights (default 1) are there for its ablations
    (a weight 0 switches a term off, as does passing ``None`` for its inputs, which makes
    the term 0).

    Args:
      embeddings: ``[B, d]`` the online network's embeddings of the batch.
      targets: from :func:`plm_targets` (momentum encoder, no gradient).
      proxies: ``[P, d]`` learnable proxies, or ``None`` (no proxy term).
      neighbour_embeddings: ``[B, k, d]`` stored momentum embeddings of each point's
        neighbours, or ``None`` (no neighbourhood term).
      neighbour_mask: ``[B, k]`` bool members of each point's piece (required with
        ``neighbour_embeddings``).
      delta: :math:`\delta > 0`, the distance of fully dissimilar points.
      proxy_weight: :math:`\lambda_\rho`.
      neighbourhood_weight: :math:`\lambda_\nu`.

    Returns:
      :class:`PLMTerms` of scalars.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from magnet_jax.manifolds import fit_linear_pieces, neighbour_table
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> table = neighbour_table(x, num_neighbours=8)
      >>> pieces = fit_linear_pieces(x, table, max_rank=2, error_threshold=0.5)
      >>> batch = jnp.arange(16)
      >>> targets = plm_targets(x[batch], pieces.bases[batch], pieces.radii[batch])
      >>> float(plm_loss(x[batch], targets).loss) > 0
      True

    References:
      Bhatnagar & Ahuja, Piecewise-Linear Manifolds for Deep Metric Learning, CPAL 2024.
    """
    embeddings = jnp.asarray(embeddings)
    dtype = jnp.result_type(embeddings, jnp.float32)
    point = plm_point_loss(embeddings, targets.points, delta=delta)
    zero = jnp.zeros((), dtype)
    proxy = (
        zero
        if proxies is None
        else plm_proxy_loss(embeddings, proxies, targets.proxies, delta=delta)
    )
    if neighbour_embeddings is None:
        neighbourhood = zero
    else:
        if neighbour_mask is None:
            raise ValueError("plm_loss: neighbour_mask is required with neighbour_embeddings.")
        neighbourhood = plm_neighbourhood_loss(
            embeddings, neighbour_embeddings, targets.neighbours, neighbour_mask, delta=delta
        )
    loss = point + proxy_weight * proxy + neighbourhood_weight * neighbourhood
    return PLMTerms(loss=loss, point=point, proxy=proxy, neighbourhood=neighbourhood)
