"""Piecewise-linear manifold model of an embedded, unlabelled data set.

The numerics of Bhatnagar & Ahuja, *Piecewise-Linear Manifolds for Deep Metric Learning*
(CPAL 2024, arXiv:2403.14977): around every point a low-dimensional linear piece is fitted
(PCA) to a neighbourhood grown from its nearest neighbours while the piece still
reconstructs it well ("subset selection"); the similarity of two points decays with the
distance of one from the other's piece, faster orthogonally to the piece than along it.
No code of the paper is public and its text gives the idea, not every formula, so every
choice made here is stated in the docstring where it is made.

Everything that runs per training step (:func:`piece_similarity`,
:func:`sample_anchor_batch`, :func:`ema_update`) is a pure, jittable function with static
shapes. :func:`fit_linear_pieces` is jittable too and runs chunk by chunk over the points,
so its memory is ``O(chunk · K · (d + K²))`` for neighbourhoods of at most ``K`` points,
never ``O(N²)``. The similarity-quality metrics of the paper
(:func:`neighbourhood_purity`, :func:`assignment_purity`, :func:`similarity_correlation`)
let k-means, hierarchical clustering and the linear pieces be compared on labelled data.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.evaluation import nearest_neighbours

__all__ = [
    "LinearPieces",
    "assignment_purity",
    "ema_update",
    "fit_linear_pieces",
    "neighbour_table",
    "neighbourhood_purity",
    "pair_similarities",
    "piece_members",
    "piece_similarity",
    "sample_anchor_batch",
    "similarity_correlation",
]

SimilarityMode = Literal["continuous", "binary", "orthogonal_only"]
_MODES = ("continuous", "binary", "orthogonal_only")
# Pieces whose points all coincide have radius 0; this floor keeps 0/0 out of the
# similarity (such a piece is then similar only to points at its anchor).
_RADIUS_FLOOR = 1e-12


class LinearPieces(NamedTuple):
    """One linear piece per point (the piece fitted around that point).

    Attributes:
      centres: ``[n, d]`` mean of the piece's neighbourhood.
      bases: ``[n, d, max_rank]`` orthonormal columns spanning the piece, principal
        directions first; columns at or beyond ``ranks[i]`` are zero, so
        ``bases[i] @ bases[i].T`` is the projector onto the piece.
      ranks: ``[n]`` int32 dimension of each piece, in ``[1, max_rank]``.
      sizes: ``[n]`` int32 points in each neighbourhood: the point itself and its
        ``sizes[i] - 1`` nearest neighbours (the first entries of its neighbour table).
      radii: ``[n]`` root-mean-square distance of the neighbourhood's points from its
        centre: the piece's length scale.
      errors: ``[n]`` relative reconstruction error of the neighbourhood by its piece (the
        share of its variance about the centre that lies off the piece).
    """

    centres: jax.Array
    bases: jax.Array
    ranks: jax.Array
    sizes: jax.Array
    radii: jax.Array
    errors: jax.Array


def neighbour_table(
    embeddings: jax.typing.ArrayLike, *, num_neighbours: int, chunk_size: int = 1024
) -> jax.Array:
    """Exact nearest neighbours of every point, itself excluded, nearest first.

    The table the pieces are grown from and the batches are drawn from. Chunked over the
    points (see :func:`magnet_jax.evaluation.nearest_neighbours`), never ``N x N``.

    Args:
      embeddings: ``[N, d]``.
      num_neighbours: ``k``, in ``[1, N - 1]``.
      chunk_size: points per chunk.

    Returns:
      ``[N, k]`` int32 indices into ``embeddings``, on the first local device; ties go to
      the lower index.
    """
    _, indices = nearest_neighbours(
        embeddings, embeddings, k=num_neighbours, chunk_size=chunk_size, exclude_self=True
    )
    # The search shards its chunks over the local devices; the table is small and is
    # indexed inside jitted steps, so it is handed back whole on one device.
    return jax.device_put(indices, jax.local_devices()[0])


def _check_fit_arguments(embeddings, neighbours, max_rank, error_threshold, min_size):
    if embeddings.ndim != 2 or neighbours.ndim != 2:
        raise ValueError(
            "fit_linear_pieces expects embeddings [N, d] and neighbours [N, k]; got "
            f"embeddings.shape={embeddings.shape}, neighbours.shape={neighbours.shape}."
        )
    if neighbours.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"neighbours must have one row per embedding; got neighbours.shape="
            f"{neighbours.shape} for embeddings.shape={embeddings.shape}."
        )
    if not jnp.issubdtype(neighbours.dtype, jnp.integer):
        raise ValueError(f"neighbours must be integer indices; got dtype {neighbours.dtype}.")
    size_limit = neighbours.shape[1] + 1
    if not 1 <= max_rank <= min(size_limit - 1, embeddings.shape[1]):
        raise ValueError(
            f"max_rank must be in [1, min(k, d)] = [1, {min(size_limit - 1, embeddings.shape[1])}]"
            f" for neighbours.shape={neighbours.shape}, embeddings.shape={embeddings.shape}; "
            f"got {max_rank}."
        )
    if not 0.0 <= error_threshold <= 1.0:
        raise ValueError(f"error_threshold must be in [0, 1]; got {error_threshold}.")
    if not max_rank + 1 <= min_size <= size_limit:
        raise ValueError(
            f"min_size must be in [max_rank + 1, k + 1] = [{max_rank + 1}, {size_limit}]; "
            f"got {min_size}."
        )


def _relative_errors(offsets: jax.Array, max_rank: int) -> jax.Array:
    """Relative rank-r reconstruction errors of every prefix neighbourhood.

    Args:
      offsets: ``[c, K, d]`` neighbourhood points minus the point itself (row 0 is 0).

    Returns:
      ``[c, K, max_rank]``: entry ``[., m - 1, r - 1]`` is the share of the variance of the
      first ``m`` points (about their mean) not explained by their top ``r`` principal
      directions (0 for a neighbourhood with no variance).
    """
    size_limit = offsets.shape[1]
    # Offsets from the point itself rather than raw coordinates: points far from the origin
    # relative to their spread would otherwise lose the centred Gram matrix to cancellation.
    gram = jnp.einsum("cad,cbd->cab", offsets, offsets, precision=jax.lax.Precision.HIGHEST)
    counts = jnp.arange(1, size_limit + 1, dtype=gram.dtype)
    # Centring the first m points: G_m = A - p 1ᵀ - 1 pᵀ + q on the m×m block, with
    # p_a = mean_{j<m} A_aj and q = mean_{j,l<m} A_jl; cumulative sums give every m at once.
    row_means = jnp.cumsum(gram, axis=2) / counts  # [c, a, m]
    grand = jnp.diagonal(jnp.cumsum(jnp.cumsum(gram, axis=1), axis=2), axis1=1, axis2=2)
    grand = grand / counts**2  # [c, m]
    p = jnp.swapaxes(row_means, 1, 2)  # [c, m, a]
    centred = gram[:, None] - p[:, :, :, None] - p[:, :, None, :] + grand[:, :, None, None]
    inside = jnp.arange(size_limit)[None, :] < counts[:, None]  # [m, a]
    block = inside[:, :, None] & inside[:, None, :]
    centred = jnp.where(block[None], centred, 0.0)
    eigenvalues = jnp.clip(jnp.linalg.eigvalsh(centred), 0.0, None)[..., ::-1]  # descending
    total = jnp.sum(eigenvalues, axis=-1)
    explained = jnp.cumsum(eigenvalues[..., :max_rank], axis=-1)
    safe_total = jnp.where(total > 0, total, 1.0)
    return jnp.where(total[..., None] > 0, 1.0 - explained / safe_total[..., None], 0.0)


def _fit_chunk(embeddings, point_ids, neighbours, *, max_rank, error_threshold, min_size, grow):
    size_limit = neighbours.shape[1] + 1
    members = jnp.concatenate([point_ids[:, None], neighbours], axis=1)  # [c, K]
    points = embeddings[point_ids]
    offsets = embeddings[members] - points[:, None, :]  # [c, K, d]
    errors = _relative_errors(offsets, max_rank)  # [c, K, max_rank]
    sizes_all = jnp.arange(1, size_limit + 1)
    if grow == "largest":
        fits = (errors[:, :, max_rank - 1] <= error_threshold) & (sizes_all >= min_size)[None]
        sizes = jnp.max(jnp.where(fits, sizes_all[None], min_size), axis=1)
    elif grow == "first_failure":
        fits = errors[:, :, max_rank - 1] <= error_threshold
        beyond_min = sizes_all > min_size
        accepted = jnp.cumprod(jnp.where(beyond_min[None], fits, True), axis=1)
        sizes = jnp.sum(accepted * beyond_min[None], axis=1) + min_size
    else:
        sizes = jnp.full(point_ids.shape, size_limit)
    final_errors = jnp.take_along_axis(errors, (sizes - 1)[:, None, None], axis=1)[:, 0]
    # The rank is the smallest that meets the threshold on the final neighbourhood, or
    # max_rank if none does; never more than the size - 1 directions m points can span.
    meets = final_errors <= error_threshold
    ranks = jnp.where(jnp.any(meets, axis=1), jnp.argmax(meets, axis=1) + 1, max_rank)
    ranks = jnp.minimum(ranks, sizes - 1).astype(jnp.int32)
    inside = sizes_all[None, :] <= sizes[:, None]  # [c, K]
    weights = inside.astype(offsets.dtype)
    mean_offset = jnp.sum(offsets * weights[..., None], axis=1) / sizes[:, None]
    centred = (offsets - mean_offset[:, None, :]) * weights[..., None]
    _, _, right = jnp.linalg.svd(centred, full_matrices=False)  # [c, min(K, d), d]
    keep = jnp.arange(max_rank)[None, :] < ranks[:, None]
    bases = jnp.swapaxes(right[:, :max_rank, :], 1, 2) * keep[:, None, :]
    radii = jnp.sqrt(jnp.sum(centred**2, axis=(1, 2)) / sizes)
    error = jnp.take_along_axis(final_errors, (ranks - 1)[:, None], axis=1)[:, 0]
    return LinearPieces(
        centres=points + mean_offset,
        bases=bases,
        ranks=ranks,
        sizes=sizes.astype(jnp.int32),
        radii=radii,
        errors=error,
    )


def fit_linear_pieces(
    embeddings: jax.typing.ArrayLike,
    neighbours: jax.typing.ArrayLike,
    *,
    max_rank: int,
    error_threshold: float,
    min_size: int | None = None,
    subset_selection: bool = True,
    growth: Literal["largest", "first_failure"] = "largest",
    chunk_size: int = 256,
) -> LinearPieces:
    r"""Fits a linear piece to a neighbourhood of every point, grown while it stays linear.

    For point :math:`i` with neighbour table row :math:`n_{i1}, n_{i2}, \dots, n_{ik}`
    (nearest first), the candidate neighbourhoods are the prefixes
    :math:`\mathcal N_i(m) = \{x_i, x_{n_{i1}}, \dots, x_{n_{i,m-1}}\}`, ``m`` in
    ``[min_size, k + 1]``. Their relative rank-``r`` reconstruction error is the share of
    their variance about their mean :math:`\mu` that lies off their top ``r`` principal
    directions :math:`U_r` (PCA):

    .. math::
      E_r(m) = \frac{\sum_{x \in \mathcal N_i(m)} \|(I - U_r U_r^\top)(x - \mu)\|^2}
                    {\sum_{x \in \mathcal N_i(m)} \|x - \mu\|^2}.

    Subset selection (the paper grows a neighbourhood while a linear model still fits it;
    the exact rule is not public, so this is the choice made here): the neighbourhood is
    the largest prefix, at least ``min_size`` points, whose error
    :math:`E_{r_{\max}}(m) \le \tau` (``min_size`` points if none is). The literal rule,
    "take the next neighbour while the error stays within :math:`\tau`", is
    ``growth="first_failure"``: it stops at the first neighbour that breaks the threshold.
    It is not the default because at the scale of a few points noise, not curvature,
    decides the error, and the relative error of noisy points along a piece *falls* as the
    neighbourhood grows along it, so the literal rule stops too early wherever the noise
    is comparable to the spacing of the points. The error is relative so the threshold
    does not depend on the scale of the embedding, which changes during training. The piece's rank is then
    the smallest :math:`r \le r_{\max}` with :math:`E_r \le \tau` on the final
    neighbourhood (``max_rank`` if none), so one threshold sets both the size and the
    dimension. ``subset_selection=False`` (the paper's ablation) keeps all ``k + 1``
    points. The piece passes through the neighbourhood's mean; its basis comes from an SVD
    of the centred neighbourhood, its eigenvalue criterion from the ``K x K`` centred Gram
    matrices of all prefixes at once, so the cost does not grow with ``d`` beyond the
    Gram products.

    Not differentiable (eigen- and singular-value decompositions of possibly degenerate
    matrices): the inputs are wrapped in ``stop_gradient``. The paper fits pieces on the
    momentum encoder's embeddings, which carry no gradient anyway. Called outside
    ``jit``, it runs on the first local device whatever the inputs' sharding.

    Args:
      embeddings: ``[N, d]`` embeddings of the (unlabelled) data.
      neighbours: ``[N, k]`` int indices of each point's nearest neighbours, nearest first,
        itself excluded (:func:`neighbour_table`).
      max_rank: :math:`r_{\max}`, the largest piece dimension, in ``[1, min(k, d)]``.
      error_threshold: :math:`\tau` in ``[0, 1]``.
      min_size: neighbourhood size always accepted, in ``[max_rank + 1, k + 1]``;
        ``None`` = ``max_rank + 2`` (one point more than a piece of full rank passes
        through exactly).
      subset_selection: grow the neighbourhood (default) or use all ``k + 1`` points.
      growth: ``"largest"`` (default) or ``"first_failure"``, see above.
      chunk_size: points per chunk; memory is ``O(chunk_size · K · (d + K²))``,
        ``K = k + 1``.

    Returns:
      A :class:`LinearPieces` with one piece per point.

    Raises:
      ValueError: on wrong shapes or hyperparameters out of range.

    References:
      Bhatnagar & Ahuja, Piecewise-Linear Manifolds for Deep Metric Learning, CPAL 2024.
    """
    embeddings = jax.lax.stop_gradient(jnp.asarray(embeddings))
    neighbours = jnp.asarray(neighbours)
    if min_size is None:
        min_size = min(max_rank + 2, neighbours.shape[1] + 1) if neighbours.ndim == 2 else 0
    _check_fit_arguments(embeddings, neighbours, max_rank, error_threshold, min_size)
    if growth not in ("largest", "first_failure"):
        raise ValueError(f"growth must be 'largest' or 'first_failure'; got {growth!r}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
    dtype = jnp.result_type(embeddings.dtype, jnp.float32)
    embeddings, neighbours = embeddings.astype(dtype), neighbours.astype(jnp.int32)
    if not any(isinstance(a, jax.core.Tracer) for a in (embeddings, neighbours)):
        # Arrays sharded over several devices (the neighbour table comes back sharded
        # from the chunked search) would make XLA partition the chunk loop, with a
        # collective in every iteration; on CPU that was seen to hang. The fit is a
        # refresh, not a step: one device does it.
        device = jax.local_devices()[0]
        embeddings, neighbours = jax.device_put((embeddings, neighbours), device)
    return _fit_all(
        embeddings,
        neighbours,
        max_rank=max_rank,
        error_threshold=float(error_threshold),
        min_size=min_size,
        grow=growth if subset_selection else None,
        chunk_size=chunk_size,
    )


@functools.partial(
    jax.jit, static_argnames=("max_rank", "error_threshold", "min_size", "grow", "chunk_size")
)
def _fit_all(embeddings, neighbours, *, max_rank, error_threshold, min_size, grow, chunk_size):
    num_points = embeddings.shape[0]
    chunk = min(chunk_size, num_points)
    padded = -(-num_points // chunk) * chunk
    point_ids = jnp.arange(padded, dtype=jnp.int32) % num_points
    # Padding rows repeat the first points; their pieces are computed and dropped.
    padded_neighbours = jnp.concatenate([neighbours, neighbours[: padded - num_points]])

    def fit(args):
        ids, table = args
        return _fit_chunk(
            embeddings,
            ids,
            table,
            max_rank=max_rank,
            error_threshold=error_threshold,
            min_size=min_size,
            grow=grow,
        )

    pieces = jax.lax.map(
        fit,
        (point_ids.reshape(-1, chunk), padded_neighbours.reshape(-1, chunk, neighbours.shape[1])),
    )
    return jax.tree.map(lambda a: a.reshape(padded, *a.shape[2:])[:num_points], pieces)


def piece_members(pieces: LinearPieces, neighbours: jax.typing.ArrayLike) -> jax.Array:
    """``[N, k]`` bool: which entries of the neighbour table belong to each piece."""
    neighbours = jnp.asarray(neighbours)
    return jnp.arange(neighbours.shape[1])[None, :] < (pieces.sizes[:, None] - 1)


def _decay(sq_distance: jax.Array, sq_scale: jax.Array, exponent: float) -> jax.Array:
    """``1 / (1 + (d / scale)^exponent)`` from squared quantities, finite at d = 0."""
    ratio = sq_distance / sq_scale
    positive = ratio > 0
    # (d/scale)^N = (d²/scale²)^(N/2); the inner where keeps the power's derivative finite
    # at 0 for exponents below 2, where it would be infinite.
    powered = jnp.where(positive, jnp.power(jnp.where(positive, ratio, 1.0), exponent / 2), 0.0)
    return 1.0 / (1.0 + powered)


def piece_similarity(
    points: jax.typing.ArrayLike,
    anchors: jax.typing.ArrayLike,
    bases: jax.typing.ArrayLike,
    scales: jax.typing.ArrayLike,
    *,
    orthogonal_exponent: float = 3.0,
    inplane_exponent: float = 0.5,
    mode: SimilarityMode = "continuous",
) -> jax.Array:
    r"""Similarity of every point to every anchor, measured by the anchor's linear piece.

    With :math:`v = x - a_b` (point minus anchor), :math:`U_b` the anchor's basis and
    :math:`\sigma_b` its length scale, :math:`d_\parallel = \|U_b^\top v\|` is the in-plane
    distance between the anchor and the point's projection on the piece and
    :math:`d_\perp = \|(I - U_b U_b^\top) v\|` the point's orthogonal distance from it:

    .. math::
      s(x, a_b) = \frac{1}{1 + (d_\perp / \sigma_b)^{N_\alpha}}
                  \cdot \frac{1}{1 + (d_\parallel / \sigma_b)^{N_\beta}} \in (0, 1].

    Choices where the paper is silent: the piece is taken through the anchor itself (the
    project page measures the projections of :math:`x_1 - x_2`), so every point is fully
    similar to itself; the two decays are reciprocal powers and multiply; both use one
    length scale per piece (:attr:`LinearPieces.radii` by default, see
    :func:`pair_similarities`), so the similarity does not depend on the embedding's
    scale. With the paper's best exponents (:math:`N_\alpha = 3`, :math:`N_\beta = 0.5`)
    the similarity falls much faster orthogonally than in-plane beyond one length scale
    (at one length scale both factors are 1/2). It is not symmetric.

    Ablations (``mode``): ``"binary"`` is 1 where both factors are at least 1/2
    (:math:`d_\perp \le \sigma_b` and :math:`d_\parallel \le \sigma_b`), else 0;
    ``"orthogonal_only"`` (one-directional decay) drops the in-plane factor.

    Args:
      points: ``[M, d]`` the :math:`x`.
      anchors: ``[B, d]`` the points whose pieces are used.
      bases: ``[B, d, r]`` orthonormal (or zero) columns of each anchor's piece.
      scales: ``[B]`` positive length scale of each piece.
      orthogonal_exponent: :math:`N_\alpha > 0`.
      inplane_exponent: :math:`N_\beta > 0`.
      mode: ``"continuous"`` (default), ``"binary"`` or ``"orthogonal_only"``.

    Returns:
      ``[M, B]`` similarities; entry ``[m, b]`` is :math:`s(x_m, a_b)`.

    Raises:
      ValueError: on mismatched shapes, non-positive exponents or an unknown mode.

    References:
      Bhatnagar & Ahuja, Piecewise-Linear Manifolds for Deep Metric Learning, CPAL 2024.
    """
    points, anchors = jnp.asarray(points), jnp.asarray(anchors)
    bases, scales = jnp.asarray(bases), jnp.asarray(scales)
    if (
        points.ndim != 2
        or anchors.ndim != 2
        or bases.ndim != 3
        or scales.shape != anchors.shape[:1]
        or bases.shape[:2] != anchors.shape
        or points.shape[1] != anchors.shape[1]
    ):
        raise ValueError(
            "piece_similarity expects points [M, d], anchors [B, d], bases [B, d, r], "
            f"scales [B]; got points.shape={points.shape}, anchors.shape={anchors.shape}, "
            f"bases.shape={bases.shape}, scales.shape={scales.shape}."
        )
    if orthogonal_exponent <= 0 or inplane_exponent <= 0:
        raise ValueError(
            "orthogonal_exponent and inplane_exponent must be > 0; got "
            f"{orthogonal_exponent} and {inplane_exponent}."
        )
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got {mode!r}.")
    dtype = jnp.result_type(points, anchors, bases, scales, jnp.float32)
    offsets = points.astype(dtype)[:, None, :] - anchors.astype(dtype)[None, :, :]  # [M, B, d]
    coefficients = jnp.einsum(
        "mbd,bdr->mbr", offsets, bases.astype(dtype), precision=jax.lax.Precision.HIGHEST
    )
    sq_inplane = jnp.sum(coefficients**2, axis=-1)
    sq_orthogonal = jnp.maximum(jnp.sum(offsets**2, axis=-1) - sq_inplane, 0.0)
    sq_scales = jnp.maximum(scales.astype(dtype), _RADIUS_FLOOR)[None, :] ** 2
    if mode == "binary":
        inside = (sq_orthogonal <= sq_scales) & (sq_inplane <= sq_scales)
        return inside.astype(dtype)
    similarity = _decay(sq_orthogonal, sq_scales, orthogonal_exponent)
    if mode == "continuous":
        similarity = similarity * _decay(sq_inplane, sq_scales, inplane_exponent)
    return similarity


def pair_similarities(
    embeddings: jax.typing.ArrayLike,
    pieces: LinearPieces,
    rows: jax.typing.ArrayLike,
    cols: jax.typing.ArrayLike,
    *,
    scale_factor: float = 1.0,
    orthogonal_exponent: float = 3.0,
    inplane_exponent: float = 0.5,
    mode: SimilarityMode = "continuous",
) -> jax.Array:
    """Similarities ``s(x_rows[p], x_cols[p])`` of given index pairs, by ``cols``' pieces.

    The length scale of a piece is ``scale_factor`` times its radius.

    Args:
      embeddings: ``[N, d]`` the embeddings the pieces were fitted to.
      pieces: their :class:`LinearPieces`.
      rows: ``[P]`` int indices of the first points.
      cols: ``[P]`` int indices of the points whose pieces are used.
      scale_factor: multiplies :attr:`LinearPieces.radii`.
      orthogonal_exponent, inplane_exponent, mode: as :func:`piece_similarity`.

    Returns:
      ``[P]`` similarities.
    """
    embeddings = jnp.asarray(embeddings)
    rows, cols = jnp.asarray(rows), jnp.asarray(cols)
    if rows.shape != cols.shape or rows.ndim != 1:
        raise ValueError(
            f"rows and cols must be [P] of the same length; got {rows.shape} and {cols.shape}."
        )

    def one(row, col):
        return piece_similarity(
            embeddings[row][None],
            embeddings[col][None],
            pieces.bases[col][None],
            scale_factor * pieces.radii[col][None],
            orthogonal_exponent=orthogonal_exponent,
            inplane_exponent=inplane_exponent,
            mode=mode,
        )[0, 0]

    return jax.vmap(one)(rows, cols)


def sample_anchor_batch(
    neighbours: jax.typing.ArrayLike,
    key: jax.Array,
    *,
    num_anchors: int,
    neighbours_per_anchor: int,
) -> jax.Array:
    """Batch indices: random anchors, each followed by its nearest neighbours.

    The paper draws a random point and its nearest neighbours, so that a batch holds points
    that share a linear piece (a uniformly random batch almost never does). Anchors are
    drawn uniformly with replacement; several anchors may bring the same point twice,
    which the PLM losses tolerate (a pair of copies has target and distance 0).

    Args:
      neighbours: ``[N, k]`` neighbour table (:func:`neighbour_table`).
      key: PRNG key.
      num_anchors: anchors per batch.
      neighbours_per_anchor: ``n`` in ``[0, k]``; the first ``n`` neighbours of each anchor.

    Returns:
      ``[num_anchors * (1 + n)]`` int32 indices, anchor by anchor, each anchor first.
    """
    neighbours = jnp.asarray(neighbours)
    if neighbours.ndim != 2 or not 0 <= neighbours_per_anchor <= neighbours.shape[1]:
        raise ValueError(
            f"neighbours_per_anchor must be in [0, k] for neighbours [N, k]; got "
            f"{neighbours_per_anchor} for neighbours.shape={neighbours.shape}."
        )
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1; got {num_anchors}.")
    anchors = jax.random.randint(key, (num_anchors,), 0, neighbours.shape[0], dtype=jnp.int32)
    group = jnp.concatenate(
        [anchors[:, None], neighbours[anchors, :neighbours_per_anchor].astype(jnp.int32)], axis=1
    )
    return group.reshape(-1)


def ema_update(ema_params, params, *, momentum: float = 0.999):
    """Momentum-encoder update ``ema ← momentum · ema + (1 − momentum) · params``.

    Leaf by leaf over matching pytrees (e.g. the ``nnx.State`` of the network and of its
    copy). The paper computes the similarity targets from a momentum encoder; its momentum
    is not public, 0.999 is MoCo's.

    Args:
      ema_params: pytree of the momentum encoder's parameters.
      params: pytree of the online network's parameters, same structure.
      momentum: in ``[0, 1]``; 0 copies ``params``, 1 keeps ``ema_params``.

    Returns:
      The updated pytree of ``ema_params``' structure and dtypes.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1]; got {momentum}.")
    return jax.tree.map(
        lambda ema, new: (momentum * ema + (1.0 - momentum) * new).astype(ema.dtype),
        ema_params,
        params,
    )


# --------------------------------------------------------------------------------------
# Similarity quality against ground truth (the paper's comparison with clustering)
# --------------------------------------------------------------------------------------


def neighbourhood_purity(
    neighbours: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> float:
    """Label purity of neighbourhoods: the mean share of a point's neighbours of its class.

    Points whose neighbourhood is empty are left out. For linear pieces pass the neighbour
    table and :func:`piece_members`; for a clustering see :func:`assignment_purity`.

    Args:
      neighbours: ``[N, k]`` int indices of each point's neighbours.
      mask: ``[N, k]`` bool, which of them belong to its neighbourhood.
      labels: ``[N]`` ground-truth labels (any integers).

    Returns:
      The mean purity (NaN if every neighbourhood is empty).
    """
    neighbours, mask = np.asarray(neighbours), np.asarray(mask, dtype=bool)
    labels = np.asarray(labels)
    if neighbours.shape != mask.shape or neighbours.shape[:1] != labels.shape:
        raise ValueError(
            f"neighbours [N, k], mask [N, k] and labels [N] must agree; got "
            f"{neighbours.shape}, {mask.shape}, {labels.shape}."
        )
    same = (labels[neighbours] == labels[:, None]) & mask
    counts = mask.sum(axis=1)
    valid = counts > 0
    if not valid.any():
        return float("nan")
    return float(np.mean(same.sum(axis=1)[valid] / counts[valid]))


def assignment_purity(assignments: jax.typing.ArrayLike, labels: jax.typing.ArrayLike) -> float:
    """Label purity of a clustering, as :func:`neighbourhood_purity` with clusters.

    A point's neighbourhood is the rest of its cluster: the result is the mean over points
    of the share of the other members of its cluster with its label (singletons left out),
    computed from cluster × label counts in ``O(N)``.

    Args:
      assignments: ``[N]`` cluster of every point (any integers).
      labels: ``[N]`` ground-truth labels (any integers).

    Returns:
      The mean purity (NaN if every cluster is a singleton).
    """
    assignments, labels = np.asarray(assignments).ravel(), np.asarray(labels).ravel()
    if assignments.shape != labels.shape:
        raise ValueError(
            f"assignments and labels must be [N]; got {assignments.shape}, {labels.shape}."
        )
    _, cluster = np.unique(assignments, return_inverse=True)
    _, label = np.unique(labels, return_inverse=True)
    joint = np.zeros((cluster.max() + 1, label.max() + 1), dtype=np.int64)
    np.add.at(joint, (cluster, label), 1)
    others = joint.sum(axis=1)[cluster] - 1
    same = joint[cluster, label] - 1
    valid = others > 0
    if not valid.any():
        return float("nan")
    return float(np.mean(same[valid] / others[valid]))


def similarity_correlation(
    similarities: jax.typing.ArrayLike, same_class: jax.typing.ArrayLike
) -> float:
    """Pearson correlation of estimated similarities with the same-class indicator.

    The paper's measure of how well a similarity estimate agrees with the ground truth;
    the caller picks the pairs (all pairs of a subset, or the pairs of sampled batches).

    Args:
      similarities: ``[P]`` estimated similarities (binary for a clustering).
      same_class: ``[P]`` bool, whether each pair shares a label.

    Returns:
      The correlation (NaN if either is constant).
    """
    similarities = np.asarray(similarities, dtype=np.float64).ravel()
    same_class = np.asarray(same_class, dtype=np.float64).ravel()
    if similarities.shape != same_class.shape:
        raise ValueError(
            f"similarities and same_class must be [P]; got {similarities.shape}, "
            f"{same_class.shape}."
        )
    s = similarities - similarities.mean()
    t = same_class - same_class.mean()
    denominator = np.sqrt(np.sum(s * s) * np.sum(t * t))
    if denominator == 0:
        return float("nan")
    return float(np.sum(s * t) / denominator)
