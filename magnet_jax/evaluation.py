"""Evaluation of embeddings: kNC (the Magnet Loss paper's rule), kNN, retrieval metrics.

Everything runs on the default JAX device in query chunks of static size: one jitted
function per (chunk size, reference shape, k), the last chunk padded, so the memory in
use is ``O(chunk_size * reference_chunk)`` floats and never a ``[Q, N]`` matrix. A
100,000 x 100,000 gallery is evaluated without ever holding the 40 GB distance matrix.
Every chunk is split over all local devices (``shard_map`` over query rows, the
reference replicated). On CPU, XLA runs a top-k (and often a matmul) on one thread per
device, so setting ``jax.config.update("jax_num_cpu_devices", os.cpu_count())`` before
JAX starts uses every core (as benchmarks/retrieval.py does).

Distances are squared Euclidean throughout (``||q||^2 - 2 q.r + ||r||^2``, clamped at
0, matmul at ``Precision.HIGHEST``). Ties in distance are broken by the lower reference
index, everywhere (``lax.top_k`` keeps the lower index first among equal values). On a
GPU the nearest references are selected through the maxima of bins of columns instead of
``lax.top_k``'s sort of every row (:func:`_select_top_k`), with exactly the same result.

Retrieval metrics follow pytorch-metric-learning's ``AccuracyCalculator`` (version 2.9)
exactly; see :func:`retrieval_metrics`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax import finite

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_NUM_NEAREST_CLUSTERS",
    "clustering_scores",
    "knc_error",
    "knc_predict",
    "knn_error",
    "knn_predict",
    "knn_vote",
    "nearest_neighbours",
    "retrieval_metrics",
]

#: Queries per chunk. A chunk's distance block is ``chunk_size x reference_chunk``.
DEFAULT_CHUNK_SIZE = 256
#: The paper's L (number of nearest clusters kNC looks at).
DEFAULT_NUM_NEAREST_CLUSTERS = 128
# Largest distance block (elements) before the reference is chunked too: 2**25 float32
# = 128 MiB. With the default chunk size a reference of up to 131,072 rows is one block.
_MAX_BLOCK_ELEMENTS = 2**25
# On a GPU, _top_k selects through the maxima of bins of _GPU_TOP_K_BIN columns
# (benchmarks/top_k.py compares bin sizes and lax.top_k).
_GPU_TOP_K_BIN = 16


# --------------------------------------------------------------------------- helpers


def _float_dtype(dtype) -> jnp.dtype:
    """At least float32: distances of bf16/f16 embeddings are computed in float32."""
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(dtype, jnp.float32)


def _check_matrix(name: str, x) -> None:
    """``x`` is ``[num, dim]``."""
    if x.ndim != 2:
        raise ValueError(f"{name} must be [num, dim], got shape {x.shape}.")


def _check_finite(name: str, x) -> None:
    """``x`` holds no NaN or inf, unless traced (non-finite keys would rank neighbours
    differently on each platform's top-k, silently). One pass and one host read."""
    if not isinstance(x, jax.core.Tracer) and jnp.issubdtype(x.dtype, jnp.inexact):
        finite.check_embeddings(x, name)


def _check_chunk(chunk_size) -> int:
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}.")
    return int(chunk_size)


def _matmul_precision():
    # Full float32 products on GPU/TPU (their default would round to bf16/tf32 and
    # reorder neighbours); on CPU the default already is float32, and HIGHEST takes a
    # slower dot path there.
    return None if jax.default_backend() == "cpu" else jax.lax.Precision.HIGHEST


def _squared_distances(query, reference, reference_sq_norms):
    """[q, d], [n, d], [n] -> [q, n] squared Euclidean distances, clamped at 0."""
    query_sq_norms = jnp.sum(query * query, axis=-1)
    cross = jnp.matmul(query, reference.T, precision=_matmul_precision())
    return jnp.maximum(query_sq_norms[:, None] - 2.0 * cross + reference_sq_norms[None, :], 0.0)


def _select_top_k(x, k, bin_size):
    """``lax.top_k(x, k)`` of ``[c, n]`` through the maxima of bins of ``bin_size`` columns.

    Only the ``k`` bins with the largest maxima can hold the top ``k``: with ties broken
    by the lower column (bins are contiguous, so a lower bin holds lower columns), every
    element of another bin ranks below that bin's maximum, which ranks below the ``k``
    chosen bins' maxima. So the result is the top ``k`` of the chosen bins' ``k *
    bin_size`` columns, gathered in column order so that ties still go to the lower
    column: exactly ``lax.top_k``'s result, ties included. Both smaller top-ks (of the
    ``n / bin_size`` maxima and of the candidates) recurse while that shortens the rows.
    Padding columns are ``-inf`` after every real column, never chosen while ``k <= n``.

    On a GPU this replaces a sort of every whole row (XLA's top-k for k above 16) or a
    top-k kernel over whole rows by one pass for the maxima and two short top-ks.

    Args:
      x: [c, n] floating keys.

    Returns:
      ``(keys [c, k], indices [c, k] int32)``, largest first.
    """
    num_rows, width = x.shape
    num_bins = -(-width // bin_size)
    if not (k < num_bins and k * bin_size < width):
        return tuple(jax.lax.top_k(x, k))
    x = jnp.pad(x, ((0, 0), (0, num_bins * bin_size - width)), constant_values=-jnp.inf)
    bins = x.reshape(num_rows, num_bins, bin_size)
    _, chosen = _select_top_k(jnp.max(bins, axis=2), k, bin_size)
    chosen = jnp.sort(chosen, axis=1)  # column order among the candidates
    candidates = jnp.take_along_axis(bins, chosen[:, :, None], axis=1)
    keys, position = _select_top_k(candidates.reshape(num_rows, k * bin_size), k, bin_size)
    columns = chosen[:, :, None] * bin_size + jnp.arange(bin_size, dtype=chosen.dtype)
    return keys, jnp.take_along_axis(columns.reshape(num_rows, k * bin_size), position, axis=1)


def _top_k(x, k):
    """``lax.top_k(x, k)`` of ``[c, n]``; on a GPU through :func:`_select_top_k`.

    The platform is chosen when the function is lowered (``lax.platform_dependent``), so a
    jitted caller compiles only its own platform's branch.
    """
    select = functools.partial(_select_top_k, k=k, bin_size=_GPU_TOP_K_BIN)
    return jax.lax.platform_dependent(
        x, cuda=select, rocm=select, default=lambda x: tuple(jax.lax.top_k(x, k))
    )


def _reference_chunk(num_reference: int, chunk_size: int, reference_chunk_size: int | None) -> int:
    if reference_chunk_size is None:
        if chunk_size * num_reference <= _MAX_BLOCK_ELEMENTS:
            return num_reference
        reference_chunk_size = max(_MAX_BLOCK_ELEMENTS // chunk_size, 1)
    reference_chunk_size = _check_chunk(reference_chunk_size)
    return min(reference_chunk_size, num_reference)


def _augment_reference(reference: jax.Array, reference_chunk: int) -> jax.Array:
    """[N, d] -> [N_pad, d + 1] rows ``[2 r, -||r||²]``; padding rows ``[0, -inf]``.

    With a query row ``[q, 1]`` one matmul gives the ranking key
    ``2 q.r - ||r||² = ||q||² - ||q - r||²`` (larger = nearer): the top-k runs directly
    on the matmul output, with no elementwise pass over the ``[c, N]`` block.
    """
    num = reference.shape[0]
    padded = -(-num // reference_chunk) * reference_chunk
    rows = jnp.concatenate(
        [2.0 * reference, -jnp.sum(reference * reference, axis=1, keepdims=True)], axis=1
    )
    padding = jnp.zeros((padded - num, rows.shape[1]), rows.dtype).at[:, -1].set(-jnp.inf)
    return jnp.concatenate([rows, padding], axis=0)


def _top_k_block(query, row_ids, reference_aug, *, k, reference_chunk, exclude_self):
    """The k nearest references of every row of a query block.

    Args:
      query: [c, d] query block.
      row_ids: [c] int32, the global index of every query row (for ``exclude_self``).
      reference_aug: [N_pad, d + 1] from :func:`_augment_reference`.

    Returns:
      ``(sq_distances [c, k], indices [c, k])``, nearest first, ties by lower index.
    """
    query_aug = jnp.concatenate([query, jnp.ones((query.shape[0], 1), query.dtype)], axis=1)
    num_chunks = reference_aug.shape[0] // reference_chunk
    # Self-exclusion as pytorch-metric-learning does it: take k + 1 and drop the query's
    # own index, or the last one if (among exact duplicates) it is not there. This keeps
    # the [c, N] block a bare matmul output.
    kk = k + int(exclude_self)
    precision = _matmul_precision()

    if num_chunks == 1:
        keys, indices = _top_k(jnp.matmul(query_aug, reference_aug.T, precision=precision), kk)
    else:
        chunks = reference_aug.reshape(num_chunks, reference_chunk, reference_aug.shape[1])

        def step(carry, inputs):
            best_keys, best_indices = carry
            start, chunk = inputs
            keys, local = _top_k(
                jnp.matmul(query_aug, chunk.T, precision=precision), min(kk, reference_chunk)
            )
            # Running best first: among equal keys top_k keeps the lower position, and
            # every running entry has a lower index than this chunk's.
            merged_keys = jnp.concatenate([best_keys, keys], axis=1)
            merged_indices = jnp.concatenate([best_indices, start + local], axis=1)
            keys, order = jax.lax.top_k(merged_keys, kk)
            return (keys, jnp.take_along_axis(merged_indices, order, axis=1)), None

        init = (
            jnp.full((query.shape[0], kk), -jnp.inf, query.dtype),
            jnp.full((query.shape[0], kk), -1, jnp.int32),
        )
        starts = jnp.arange(num_chunks, dtype=jnp.int32) * reference_chunk
        (keys, indices), _ = jax.lax.scan(step, init, (starts, chunks))

    if exclude_self:
        is_self = indices == row_ids[:, None]
        drop = jnp.where(jnp.any(is_self, axis=1), jnp.argmax(is_self, axis=1), k)
        source = jnp.arange(k)[None, :]
        source = source + (source >= drop[:, None])
        keys = jnp.take_along_axis(keys, source, axis=1)
        indices = jnp.take_along_axis(indices, source, axis=1)
    distances = jnp.maximum(jnp.sum(query * query, axis=1, keepdims=True) - keys, 0.0)
    return distances, indices


_QUERY_AXIS = "queries"


@functools.lru_cache(maxsize=128)
def _compiled(kernel, static: tuple, num_sharded: int, num_replicated: int, devices: tuple):
    """jit(kernel) for one device; jit(shard_map(kernel)) over query rows for several.

    Cached so that repeated calls with the same static arguments reuse the executable.
    """
    fn = functools.partial(kernel, **dict(static))
    if len(devices) == 1:
        return jax.jit(fn)
    mesh = jax.sharding.Mesh(np.asarray(devices), (_QUERY_AXIS,))
    specs = (jax.sharding.PartitionSpec(_QUERY_AXIS),) * num_sharded + (
        jax.sharding.PartitionSpec(),
    ) * num_replicated
    return jax.jit(
        jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=specs,
            out_specs=jax.sharding.PartitionSpec(_QUERY_AXIS),
            check_vma=False,
        )
    )


def process_local(x):
    """``x`` as an array this process can address on its own.

    With several processes (``jax.distributed``), the trainer's arrays span every
    process's devices; evaluation runs on the local devices only, each process on the
    same values. A replicated global array gives its local copy; a sharded one is
    gathered from all processes (a collective: every process must call this together).
    Anything else (NumPy, tracers, single-process arrays) is returned unchanged.
    """
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer) or x.is_fully_addressable:
        return x
    if x.sharding.is_fully_replicated:
        return x.addressable_data(0)
    from jax.experimental import multihost_utils

    return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))


def _replicate_like(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` replicated on the devices that hold ``like`` (whatever its sharding)."""
    devices = sorted(like.sharding.device_set, key=lambda device: device.id)
    if len(devices) == 1:
        return jax.device_put(x, devices[0])
    mesh = jax.sharding.Mesh(np.asarray(devices), (_QUERY_AXIS,))
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _run_chunks(
    kernel,
    static: dict,
    sharded: Sequence[jax.Array],
    replicated: Sequence[jax.Array],
    num_queries: int,
    chunk_size: int,
) -> list[jax.Array]:
    """Runs ``kernel(row_ids, *sharded_chunks, *replicated, **static)`` chunk by chunk.

    A chunk is ``chunk_size`` query rows per local device (clipped to what the queries
    need); with several devices the chunk is split over them with ``shard_map`` and the
    ``replicated`` arrays (the reference) are copied to every device once. The last
    chunk is zero-padded so the kernel compiles once per chunk size. Outputs are
    concatenated along the query axis with the padding dropped.
    """
    sharded = [process_local(a) for a in sharded]
    replicated = [process_local(a) for a in replicated]
    traced = any(isinstance(a, jax.core.Tracer) for a in (*sharded, *replicated))
    devices = (jax.devices()[0],) if traced else tuple(jax.local_devices())
    per_device = min(chunk_size, -(-num_queries // len(devices)))
    block = per_device * len(devices)
    padded = -(-num_queries // block) * block
    sharded = [jnp.pad(a, [(0, padded - num_queries)] + [(0, 0)] * (a.ndim - 1)) for a in sharded]
    sharded = [jnp.arange(padded, dtype=jnp.int32)] + sharded
    place_block = lambda block_array: block_array  # noqa: E731
    if len(devices) > 1:
        # Inputs may be committed anywhere (e.g. to the trainer's mesh over a subset of
        # the devices): put every block and the reference on this function's own mesh.
        mesh = jax.sharding.Mesh(np.asarray(devices), (_QUERY_AXIS,))
        replicated = [
            jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            for a in replicated
        ]
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(_QUERY_AXIS))
        place_block = lambda block_array: jax.device_put(block_array, rows)  # noqa: E731
    fn = _compiled(kernel, tuple(sorted(static.items())), len(sharded), len(replicated), devices)
    outputs = [
        fn(*[place_block(a[start : start + block]) for a in sharded], *replicated)
        for start in range(0, padded, block)
    ]
    return [jnp.concatenate(parts, axis=0)[:num_queries] for parts in zip(*outputs)]


def _nearest_kernel(row_ids, query, reference_aug, *, k, reference_chunk, exclude_self):
    return _top_k_block(
        query,
        row_ids,
        reference_aug,
        k=k,
        reference_chunk=reference_chunk,
        exclude_self=exclude_self,
    )


def _prepare_pair(query, reference, exclude_self):
    query = jnp.asarray(query)
    reference = jnp.asarray(reference)
    _check_matrix("query", query)
    _check_matrix("reference", reference)
    _check_finite("query", query)
    if reference is not query:  # a self-gallery is checked once
        _check_finite("reference", reference)
    if query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"query [Q, d] and reference [N, d] must have the same d, got "
            f"shapes {query.shape} and {reference.shape}."
        )
    if exclude_self and query.shape[0] != reference.shape[0]:
        raise ValueError(
            f"exclude_self needs query row i to be reference row i, so "
            f"the same number of rows; got shapes {query.shape} and "
            f"{reference.shape}."
        )
    dtype = _float_dtype(jnp.result_type(query, reference))
    return query.astype(dtype), reference.astype(dtype)


# --------------------------------------------------------------------------- kNN


def nearest_neighbours(
    query: jax.typing.ArrayLike,
    reference: jax.typing.ArrayLike,
    *,
    k: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reference_chunk_size: int | None = None,
    exclude_self: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Exact k nearest references of every query, by squared Euclidean distance.

    Chunked over queries (``chunk_size`` rows at a time) and, when a block
    ``chunk_size x N`` would exceed 2**25 elements, over the reference too (a running
    top-k merged chunk by chunk), so memory is bounded by the chunk sizes, never
    ``Q x N``.

    Args:
      query: ``[Q, d]`` query embeddings.
      reference: ``[N, d]`` reference (gallery) embeddings.
      k: number of neighbours, ``1 <= k <= N`` (``N - 1`` with ``exclude_self``).
      chunk_size: queries per chunk (static).
      reference_chunk_size: references per chunk; ``None`` picks one (the whole
        reference when ``chunk_size * N <= 2**25``).
      exclude_self: query row ``i`` is reference row ``i`` (needs ``Q == N``) and is
        never its own neighbour.

    Returns:
      ``(sq_distances [Q, k], indices [Q, k] int32)``, nearest first; equal distances
      are ordered by lower reference index.

    Raises:
      ValueError: on wrong ranks, mismatched shapes, or ``k`` out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.], [1.], [3.]])
      >>> d, i = nearest_neighbours(x, x, k=1, exclude_self=True)
      >>> i[:, 0].tolist(), d[:, 0].tolist()
      ([1, 0, 1], [1.0, 1.0, 4.0])
    """
    query, reference = _prepare_pair(query, reference, exclude_self)
    chunk_size = _check_chunk(chunk_size)
    available = reference.shape[0] - int(exclude_self)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= available:
        raise ValueError(
            f"k must be an integer in [1, {available}] for a reference of "
            f"shape {reference.shape} (exclude_self={exclude_self}), got "
            f"{k!r}."
        )
    k = int(k)
    if query.shape[0] == 0:
        return (jnp.zeros((0, k), query.dtype), jnp.zeros((0, k), jnp.int32))
    reference_chunk = _reference_chunk(reference.shape[0], chunk_size, reference_chunk_size)
    distances, indices = _run_chunks(
        _nearest_kernel,
        dict(k=k, reference_chunk=reference_chunk, exclude_self=bool(exclude_self)),
        [query],
        [_augment_reference(reference, reference_chunk)],
        query.shape[0],
        chunk_size,
    )
    return distances, indices


def _concrete_labels(name: str, labels, length: int) -> np.ndarray:
    if isinstance(labels, jax.core.Tracer):
        raise ValueError(f"{name} must be concrete (not traced under jax.jit).")
    labels = np.asarray(labels)
    if labels.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {labels.dtype}.")
    return labels


@functools.partial(jax.jit, static_argnames=("num_classes",))
def knn_vote(neighbour_labels: jax.typing.ArrayLike, *, num_classes: int) -> jax.Array:
    """Majority vote of the neighbours' labels, the rule of :func:`knn_predict`.

    Args:
      neighbour_labels: ``[Q, k]`` int labels in ``[0, num_classes)``, nearest first
        (e.g. the first ``k`` columns of a larger neighbour search).
      num_classes: number of classes (static).

    Returns:
      ``[Q]`` int32 majority class; ties go to the tied class whose member ranks first.
    """
    neighbour_labels = jnp.asarray(neighbour_labels)
    k = neighbour_labels.shape[1]
    ranks = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), neighbour_labels.shape)

    def one(labels, rank):
        votes = jax.ops.segment_sum(jnp.ones_like(rank), labels, num_segments=num_classes)
        first = jax.ops.segment_min(rank, labels, num_segments=num_classes)
        first = jnp.minimum(first, k)  # classes without votes: segment_min gives max int
        return jnp.argmax(votes * (k + 1) + (k - first)).astype(jnp.int32)

    return jax.vmap(one)(neighbour_labels, ranks)


def knn_predict(
    query: jax.typing.ArrayLike,
    reference: jax.typing.ArrayLike,
    reference_labels: jax.typing.ArrayLike,
    *,
    k: int = 1,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    exclude_self: bool = False,
) -> jax.Array:
    """k-nearest-neighbour classification by majority vote (squared Euclidean).

    Ties in the vote go to the tied class whose nearest member ranks first (so
    ``k = 2`` with two different labels predicts the nearest neighbour's class).
    scikit-learn's ``KNeighborsClassifier`` instead takes the smallest label.

    Args:
      query: ``[Q, d]`` query embeddings.
      reference: ``[N, d]`` reference embeddings.
      reference_labels: ``[N]`` int labels in ``[0, num_classes)``.
      k: neighbours that vote.
      num_classes: number of classes (static); ``None`` uses
        ``max(reference_labels) + 1`` (labels must then be concrete).
      chunk_size: queries per chunk.
      exclude_self: leave-one-out: query ``i`` is reference ``i`` and does not vote.

    Returns:
      ``[Q]`` int32 predicted labels.

    Raises:
      ValueError: on wrong shapes, ``k`` out of range, or labels out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> ref = jnp.array([[0.], [1.], [10.]])
      >>> knn_predict(jnp.array([[0.2], [9.]]), ref, jnp.array([0, 0, 1])).tolist()
      [0, 1]
    """
    reference_labels = jnp.asarray(reference_labels)
    reference_shape = np.shape(reference)
    if reference_labels.shape != reference_shape[:1] or len(reference_shape) != 2:
        raise ValueError(
            f"reference_labels must be [N] for a reference [N, d], got "
            f"shapes {reference_labels.shape} and {reference_shape}."
        )
    if not jnp.issubdtype(reference_labels.dtype, jnp.integer):
        raise ValueError(f"reference_labels must be integers, got dtype {reference_labels.dtype}.")
    if num_classes is None:
        if isinstance(reference_labels, jax.core.Tracer):
            raise ValueError("num_classes must be given when reference_labels are traced.")
        num_classes = int(jnp.max(reference_labels)) + 1 if reference_labels.size else 1
    if not isinstance(reference_labels, jax.core.Tracer) and reference_labels.size:
        low, high = int(jnp.min(reference_labels)), int(jnp.max(reference_labels))
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"reference_labels must lie in [0, {num_classes}), got [{low}, {high}]."
            )
    _, indices = nearest_neighbours(
        query, reference, k=k, chunk_size=chunk_size, exclude_self=exclude_self
    )
    if not isinstance(reference_labels, jax.core.Tracer):
        # The labels may be committed to other devices (e.g. a trainer's sub-mesh) than the
        # neighbour indices, which live on this module's own query mesh.
        reference_labels = _replicate_like(process_local(reference_labels), indices)
    if k == 1:
        return reference_labels[indices[:, 0]].astype(jnp.int32)
    return knn_vote(reference_labels[indices].astype(jnp.int32), num_classes=int(num_classes))


def knn_error(
    query: jax.typing.ArrayLike,
    query_labels: jax.typing.ArrayLike,
    reference: jax.typing.ArrayLike,
    reference_labels: jax.typing.ArrayLike,
    *,
    k: int = 1,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    exclude_self: bool = False,
) -> float:
    """Error rate of :func:`knn_predict` on labelled queries (a Python float)."""
    predictions = knn_predict(
        query,
        reference,
        reference_labels,
        k=k,
        num_classes=num_classes,
        chunk_size=chunk_size,
        exclude_self=exclude_self,
    )
    query_labels = jnp.asarray(query_labels)
    if query_labels.shape != predictions.shape:
        raise ValueError(
            f"query_labels must be [Q] = {predictions.shape}, got {query_labels.shape}."
        )
    return float(jnp.mean(predictions != query_labels))


# --------------------------------------------------------------------------- kNC


def _knc_kernel(
    row_ids,
    embeddings,
    centroids,
    centroid_sq_norms,
    valid,
    sigma2,
    *,
    num_nearest,
    num_classes,
    num_slots,
):
    del row_ids
    distances = _squared_distances(embeddings, centroids, centroid_sq_norms)
    distances = jnp.where(valid[None, :], distances, jnp.inf)
    negative, nearest = jax.lax.top_k(-distances, num_nearest)
    nearest_distances = -negative
    # exp(-(d - d_min) / 2σ²) lies in (0, 1]: the nearest cluster weighs exactly 1, so the
    # winning score is >= 1 and underflow of far clusters cannot change the argmax.
    # Invalid clusters have d = inf and weigh 0.
    weights = jnp.exp(-(nearest_distances - nearest_distances[:, :1]) / (2.0 * sigma2))
    classes = nearest // num_slots
    scores = jax.vmap(lambda w, c: jax.ops.segment_sum(w, c, num_segments=num_classes))(
        weights, classes
    )
    return (jnp.argmax(scores, axis=1).astype(jnp.int32),)


def knc_predict(
    embeddings: jax.typing.ArrayLike,
    index: Any = None,
    *,
    centroids: jax.typing.ArrayLike | None = None,
    valid: jax.typing.ArrayLike | None = None,
    sigma2: jax.typing.ArrayLike | None = None,
    num_nearest_clusters: int = DEFAULT_NUM_NEAREST_CLUSTERS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """k-nearest-cluster classification, the Magnet Loss paper's evaluation rule (§3.4).

    For a query ``r``, take its ``L`` nearest valid centroids ``μ`` by squared distance;
    the score of class ``c`` is

    .. math::
       s_c(r) = \\sum_{\\mu \\in \\text{L nearest}, C(\\mu) = c}
                \\exp\\left(-\\frac{\\lVert r - \\mu \\rVert^2}{2\\sigma^2}\\right)

    and the prediction is ``argmax_c s_c`` (computed with the nearest distance
    subtracted, so it cannot underflow to a tie; exact ties go to the lower class id).
    Empty (invalid) clusters are never among the ``L``. ``L`` is clipped to the number
    of cluster slots ``C*K``; when fewer than ``L`` clusters are valid, all valid ones
    are used. With ``L = C*K`` and ``K = 1`` this is a soft nearest-class-mean rule.

    As measured for this project, centroids should be recomputed from current
    embeddings (or the index refreshed) before evaluating: stale centroids cost points.

    Args:
      embeddings: ``[Q, d]`` query embeddings.
      index: optional object with ``.centroids [C, K, d]``, ``.valid [C, K]`` and
        ``.variance []`` (e.g. :class:`magnet_jax.index.ClusterIndex`).
      centroids: ``[C, K, d]`` cluster centres, centroid ``[c, k]`` of class ``c``;
        overrides ``index.centroids``.
      valid: ``[C, K]`` bool mask of non-empty clusters; overrides ``index.valid``;
        ``None`` without an index means all valid.
      sigma2: ``[]`` the variance σ² (squared distances); overrides ``index.variance``.
      num_nearest_clusters: ``L``; the default 128 is the paper's value.
      chunk_size: queries per chunk.

    Returns:
      ``[Q]`` int32 predicted classes in ``[0, C)``.

    Raises:
      ValueError: on wrong shapes, a missing σ², ``L < 1``, or no valid cluster.

    Example:
      >>> import jax.numpy as jnp
      >>> centroids = jnp.array([[[0., 0.]], [[4., 0.]]])  # C=2 classes, K=1
      >>> knc_predict(jnp.array([[1., 0.], [3.5, 0.]]), centroids=centroids,
      ...             sigma2=1.0).tolist()
      [0, 1]

    References:
      Rippel, Paluri, Dollar, Bourdev, "Metric Learning with Adaptive Density
      Discrimination", ICLR 2016, §3.4.
    """
    if index is not None:
        centroids = index.centroids if centroids is None else centroids
        valid = index.valid if valid is None else valid
        sigma2 = index.variance if sigma2 is None else sigma2
    if centroids is None:
        raise ValueError("knc_predict needs centroids: pass an index or centroids=.")
    if sigma2 is None:
        raise ValueError("knc_predict needs sigma2: pass an index or sigma2=.")
    embeddings = jnp.asarray(embeddings)
    centroids = jnp.asarray(centroids)
    _check_matrix("embeddings", embeddings)
    _check_finite("embeddings", embeddings)
    if centroids.ndim != 3 or centroids.shape[2] != embeddings.shape[1]:
        raise ValueError(
            f"centroids must be [C, K, d] with d = embeddings.shape[1]; got "
            f"centroids {centroids.shape}, embeddings {embeddings.shape}."
        )
    num_classes, num_slots, dim = centroids.shape
    if valid is None:
        valid = jnp.ones((num_classes, num_slots), bool)
    valid = jnp.asarray(valid)
    if valid.shape != (num_classes, num_slots):
        raise ValueError(f"valid must be [C, K] = {(num_classes, num_slots)}, got {valid.shape}.")
    sigma2 = jnp.asarray(sigma2)
    if sigma2.shape != ():
        raise ValueError(f"sigma2 must be a scalar, got shape {sigma2.shape}.")
    if not isinstance(valid, jax.core.Tracer) and not bool(jnp.any(valid)):
        raise ValueError("valid has no True entry: there is no cluster to vote.")
    if not isinstance(sigma2, jax.core.Tracer) and not float(sigma2) > 0:
        raise ValueError(f"sigma2 must be > 0, got {float(sigma2)}.")
    if not isinstance(num_nearest_clusters, (int, np.integer)) or num_nearest_clusters < 1:
        raise ValueError(
            f"num_nearest_clusters must be an integer >= 1, got {num_nearest_clusters!r}."
        )
    chunk_size = _check_chunk(chunk_size)
    if embeddings.shape[0] == 0:
        return jnp.zeros((0,), jnp.int32)
    dtype = _float_dtype(jnp.result_type(embeddings, centroids))
    flat = centroids.reshape(num_classes * num_slots, dim).astype(dtype)
    (predictions,) = _run_chunks(
        _knc_kernel,
        dict(
            num_nearest=int(min(num_nearest_clusters, num_classes * num_slots)),
            num_classes=num_classes,
            num_slots=num_slots,
        ),
        [embeddings.astype(dtype)],
        [flat, jnp.sum(flat * flat, axis=1), valid.reshape(-1).astype(bool), sigma2.astype(dtype)],
        embeddings.shape[0],
        chunk_size,
    )
    return predictions


def knc_error(
    embeddings: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, index: Any = None, **kwargs
) -> float:
    """Error rate of :func:`knc_predict` (keyword arguments passed on); a Python float."""
    predictions = knc_predict(embeddings, index, **kwargs)
    labels = jnp.asarray(labels)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels must be [Q] = {predictions.shape}, got {labels.shape}.")
    return float(jnp.mean(predictions != labels))


# --------------------------------------------------------------------------- retrieval


def _retrieval_kernel(
    row_ids,
    query,
    query_labels,
    relevant,
    reference_aug,
    reference_labels,
    *,
    k,
    ks,
    reference_chunk,
    exclude_self,
):
    """Per-query [c, 3 + len(ks)]: precision@1, R-precision, AP@R, recall@k hits."""
    _, indices = _top_k_block(
        query,
        row_ids,
        reference_aug,
        k=k,
        reference_chunk=reference_chunk,
        exclude_self=exclude_self,
    )
    same = reference_labels[indices] == query_labels[:, None]  # [c, k]
    ranks = jnp.arange(1, k + 1, dtype=jnp.int32)
    hits = same & (ranks[None, :] <= relevant[:, None])  # same class within the first R
    cumulative = jnp.cumsum(hits, axis=1, dtype=jnp.int32)
    denominator = jnp.maximum(relevant, 1).astype(jnp.float32)
    r_precision = jnp.sum(hits, axis=1, dtype=jnp.float32) / denominator
    average_precision = (
        jnp.sum(
            jnp.where(hits, cumulative.astype(jnp.float32) / ranks.astype(jnp.float32), 0.0), axis=1
        )
        / denominator
    )
    columns = [same[:, 0].astype(jnp.float32), r_precision, average_precision]
    columns += [jnp.any(same[:, : min(kk, k)], axis=1).astype(jnp.float32) for kk in ks]
    return (jnp.stack(columns, axis=1),)


def retrieval_metrics(
    query: jax.typing.ArrayLike,
    query_labels: jax.typing.ArrayLike,
    reference: jax.typing.ArrayLike | None = None,
    reference_labels: jax.typing.ArrayLike | None = None,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reference_chunk_size: int | None = None,
    key: jax.Array | None = None,
    clustering: bool = True,
) -> dict[str, float]:
    """Retrieval metrics with pytorch-metric-learning's definitions, chunked on device.

    With ``reference=None`` the query set is its own gallery and every query's own
    entry is excluded (pml's ``ref_includes_query``). For a query of class ``y``, ``R``
    is the number of gallery items of class ``y`` (minus itself in the self-gallery
    case). Queries with ``R = 0`` (a singleton class in the self-gallery, a class absent
    from a separate gallery) are left out of every neighbour metric, as pml does; if all
    are, those metrics are NaN. The others are plain means over the remaining queries:

    - ``precision_at_1``: the nearest gallery item has the query's class.
    - ``r_precision``: share of the ``R`` nearest with the query's class.
    - ``mean_average_precision_at_r``: ``(1/R) Σ_{i<=R, item i relevant} P@i``.
    - ``recall_at_<k>`` for ``k`` in ``ks``: at least one of the ``k`` nearest has the
      query's class (the "Recall@K" of the deep-metric-learning literature; not in pml).
    - ``nmi``, ``ami``: k-means (:func:`magnet_jax.kmeans.kmeans_per_class`, one class)
      on the *query* embeddings with as many clusters as distinct query labels (or
      ``num_classes``), scored against the labels with scikit-learn's
      ``normalized_mutual_info_score`` / ``adjusted_mutual_info_score``, as pml does
      (pml runs faiss k-means, so these two agree with pml only up to the clustering).

    Neighbours are exact, nearest first, equal distances ordered by lower gallery index
    (pml's faiss path orders exact ties its own way). The top ``max(R, max(ks))`` of
    every query are selected chunk by chunk and reduced to per-query numbers on device,
    so memory is ``O(chunk_size * N + Q)`` whatever ``R`` is.

    Args:
      query: ``[Q, d]`` query embeddings.
      query_labels: ``[Q]`` integer labels (any values; compared for equality).
      reference: ``[N, d]`` gallery embeddings, or ``None`` for the query set itself.
      reference_labels: ``[N]`` integer labels; given exactly when ``reference`` is.
      ks: the ``k`` of ``recall_at_<k>``.
      num_classes: k-means clusters for NMI/AMI; ``None`` = distinct query labels.
      chunk_size: queries per chunk.
      reference_chunk_size: gallery rows per chunk (``None``: automatic, see
        :func:`nearest_neighbours`).
      key: PRNG key for the k-means; ``None`` uses ``jax.random.key(0)``.
      clustering: compute ``nmi`` and ``ami`` (k-means on the queries).

    Returns:
      ``dict`` of Python floats: ``precision_at_1``, ``r_precision``,
      ``mean_average_precision_at_r``, ``recall_at_<k>`` for each ``k``, and ``nmi``,
      ``ami`` when ``clustering``.

    Raises:
      ValueError: on wrong shapes, non-integer labels, ``reference`` without labels
        (or the reverse), or ``ks`` entries below 1.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.], [0.1], [5.], [5.2]])
      >>> m = retrieval_metrics(x, jnp.array([0, 0, 1, 1]), clustering=False)
      >>> m["precision_at_1"], m["mean_average_precision_at_r"]
      (1.0, 1.0)

    References:
      Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020 (MAP@R);
      pytorch-metric-learning ``utils/accuracy_calculator.py``.
    """
    self_gallery = reference is None
    if self_gallery != (reference_labels is None):
        raise ValueError("reference and reference_labels must be given together.")
    query = jnp.asarray(query)
    _check_matrix("query", query)
    if self_gallery:
        reference = query
    query, reference = _prepare_pair(query, reference, False)
    num_queries, num_reference = query.shape[0], reference.shape[0]
    query_labels_np = _concrete_labels("query_labels", query_labels, num_queries)
    reference_labels_np = (
        query_labels_np
        if self_gallery
        else _concrete_labels("reference_labels", reference_labels, num_reference)
    )
    ks = tuple(int(kk) for kk in ks)
    if any(kk < 1 for kk in ks):
        raise ValueError(f"ks must be >= 1, got {ks}.")
    chunk_size = _check_chunk(chunk_size)
    if num_queries == 0:
        raise ValueError(f"query is empty: shape {query.shape}.")

    # Dense label ids shared by queries and gallery.
    _, dense = np.unique(
        np.concatenate([query_labels_np, reference_labels_np]), return_inverse=True
    )
    dense = dense.astype(np.int32)
    query_ids, reference_ids = dense[:num_queries], dense[num_queries:]
    gallery_counts = np.bincount(reference_ids, minlength=int(dense.max()) + 1)
    relevant = gallery_counts[query_ids] - int(self_gallery)  # R of every query
    counted = relevant > 0  # pml's "not lone" queries

    results: dict[str, float] = {}
    names = ["precision_at_1", "r_precision", "mean_average_precision_at_r"] + [
        f"recall_at_{kk}" for kk in ks
    ]
    available = num_reference - int(self_gallery)
    if not counted.any() or available < 1:
        results.update({name: float("nan") for name in names})
    else:
        k = int(min(max(int(relevant.max()), max(ks)), available))
        reference_chunk = _reference_chunk(num_reference, chunk_size, reference_chunk_size)
        reference_aug = _augment_reference(reference, reference_chunk)
        reference_ids = np.pad(
            reference_ids, (0, reference_aug.shape[0] - num_reference), constant_values=-1
        )
        (per_query,) = _run_chunks(
            _retrieval_kernel,
            dict(k=k, ks=ks, reference_chunk=reference_chunk, exclude_self=self_gallery),
            [query, jnp.asarray(query_ids), jnp.asarray(relevant.astype(np.int32))],
            [reference_aug, jnp.asarray(reference_ids)],
            num_queries,
            chunk_size,
        )
        per_query = np.asarray(per_query, dtype=np.float64)[counted]
        for name, column in zip(names, per_query.T):
            results[name] = float(column.mean())

    if clustering:
        results.update(clustering_scores(query, query_labels_np, num_classes=num_classes, key=key))
    return results


def clustering_scores(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    num_classes: int | None = None,
    key: jax.Array | None = None,
) -> dict[str, float]:
    """NMI and AMI of a k-means clustering of the embeddings against their labels.

    k-means (:func:`magnet_jax.kmeans.kmeans_per_class` with a single class, k-means++
    initialisation) with as many clusters as distinct labels (or ``num_classes``);
    scored with scikit-learn's ``normalized_mutual_info_score`` (arithmetic mean) and
    ``adjusted_mutual_info_score``, as pytorch-metric-learning's ``AccuracyCalculator``
    does (it clusters with faiss k-means instead, so values agree only up to the
    clustering found).

    Args:
      embeddings: ``[N, d]`` embeddings.
      labels: ``[N]`` integer labels (concrete).
      num_classes: number of clusters; ``None`` = number of distinct labels.
      key: PRNG key for k-means++; ``None`` uses ``jax.random.key(0)``.

    Returns:
      ``{"nmi": float, "ami": float}``.

    Raises:
      ValueError: on wrong shapes or non-integer labels.
    """
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    from magnet_jax.kmeans import kmeans_per_class

    embeddings = jnp.asarray(embeddings)
    _check_matrix("embeddings", embeddings)
    labels = _concrete_labels("labels", labels, embeddings.shape[0])
    if embeddings.shape[0] == 0:
        raise ValueError(f"embeddings is empty: shape {embeddings.shape}.")
    num_clusters = len(np.unique(labels)) if num_classes is None else int(num_classes)
    if num_clusters < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    key = jax.random.key(0) if key is None else key
    embeddings = embeddings.astype(_float_dtype(embeddings.dtype))
    result = kmeans_per_class(
        embeddings,
        jnp.zeros((embeddings.shape[0],), jnp.int32),
        num_clusters,
        key=key,
        num_classes=1,
    )
    clusters = np.asarray(result.assignments)
    return {
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ami": float(adjusted_mutual_info_score(labels, clusters)),
    }
