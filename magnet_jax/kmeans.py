"""k-means inside every class at once, on device.

The cluster index of the Magnet Loss (Rippel et al., ICLR 2016, §3) splits every class
into up to ``k`` clusters with k-means. Classes have very different sizes (1 to 10,000
examples is the normal case), so this module never pads classes to the largest one and
never loops over classes in Python: every class is clustered in one jitted computation on
flat arrays, with per-class reductions done by ``jax.ops.segment_*`` over the labels.
Distances to per-class centroids are computed on the examples laid out once per call in
blocks of rows of a single class (a class padded to whole blocks of a power of two up to
its mean size; see :class:`_ClassBlocks`), so every block needs one ``[k, d]`` table and
a matrix product, never an ``[N, k, d]`` gather of centroids; per-example minima over the
slots are taken in that layout, and only ``[N]`` results are gathered back into example
order. Where the labels are concrete, the layout (a stable sort by label) is computed with
NumPy before the jitted call; traced labels get the same layout inside it. Memory is
O(N·d + C·k·d).

On the CPU, with concrete labels and more data than fits in a core's cache, consecutive
classes are packed into groups of about ``_GROUP_FLOATS`` rows × dimensions (see
:class:`_Groups`). A jitted call clusters its groups one after another (``lax.map``), so
a group's data stays in the cache through all of its passes and its loops stop as soon
as its own classes have converged; the groups are split into one such call per core, run
side by side from threads. Every class is still its own problem: from the same start (a
warm start) the result is the same as all classes at once; k-means++ draws with one key
per group, whatever the number of cores.

The algorithm follows scikit-learn's ``KMeans(init="k-means++", algorithm="lloyd")``
class by class:

* **Warm start** (``initial_centroids``): Lloyd starts from given centroids (e.g. the
  previous refresh's) instead of k-means++; slots without a valid centroid are
  re-seeded like clusters that empty during Lloyd (below).
* **k-means++ initialisation** with greedy local trials (``2 + log k`` candidates per
  round, keep the one that lowers the class potential most), all classes simultaneously.
  A per-class draw with probability ∝ D² takes one uniform number per class and
  inverts the class's cumulative D² in the block layout.
* **Lloyd iterations** in a ``jax.lax.while_loop``: assign every example to the nearest
  centroid of its own class, recompute centroids with ``segment_sum`` over the flat
  cluster ids ``label * k + assignment``.
* **Convergence** per class as in scikit-learn: a class has converged when its
  assignments did not change, or when the squared shift of its centroids is at most
  ``tolerance`` times the mean per-dimension variance of the class. The loop stops when
  every class has converged or after ``max_iterations``.
* **Hartigan refinement** (``refine_steps``, default 5; 0 turns it off; not in
  scikit-learn): points are moved to another cluster of their class while that lowers
  the class's inertia, counting the shift of both means (see
  :func:`_hartigan_refine`). Lloyd's fixed points include many poor partitions of
  small classes in high dimension (e.g. a singleton cluster beside one holding all the
  rest), and k-means++ starts land in them often (benchmarks/README.md has the
  measurements). Refinement only lowers the inertia; once no class can improve, the
  partition is again a Lloyd fixed point.
* **Exact tiny classes** (``k == 2``, ``exhaustive_max_points``, default 12; not in
  scikit-learn): a class of ``n <= 12`` examples has only ``2^(n−1) − 1`` two-part
  partitions, so they are all scored and the optimum taken where it is lower than the
  local search's (see :func:`_exact_two_means`). This runs once after the restarts,
  for every such class at once in the same jitted call, from sufficient statistics
  (the per-class Gram matrix, never ``[partitions, d]`` arrays), so no class of that
  size ends above its optimum.
* A final assignment step makes assignments, counts and inertia consistent with the
  returned centroids.

Every class is clustered relative to its first example (translation invariance), so
distances by the expansion ``‖x‖² − 2x·c + ‖c‖²``, used in the Lloyd steps when there
are few classes, do not cancel on data with a large common offset.

Empty clusters. A slot of class ``c`` is *empty* when ``counts[c, j] == 0``; downstream
code uses ``counts > 0`` as the valid mask, and the centroid of an empty slot is zeros.

* A class with fewer than ``k`` distinct points (in particular fewer than ``k`` examples)
  gets only as many clusters as it has distinct points; the remaining slots are empty.
  k-means++ never picks a point twice: an already-chosen point has D² = 0, hence
  probability 0; when all remaining D² are 0 the round picks nothing and the slot stays
  empty (no NaN is produced).
* A cluster that becomes empty during the Lloyd iterations is re-seeded, like
  scikit-learn does, on the example of its class that is farthest from its assigned
  centroid (the next farthest for a second empty cluster of the same class, and so on);
  that example is moved out of its old cluster. If every remaining example of the class
  already sits exactly on its centroid, the slot is retired and reported empty.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import math
import os
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax._checks import is_concrete

__all__ = [
    "KMeansResult",
    "assign_to_centroids",
    "centroids_from_assignments",
    "kmeans_per_class",
]


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans_per_class`.

    Attributes:
      centroids: ``[C, k, d]`` cluster centres per class; zeros for empty slots.
      assignments: ``[N]`` int32, the cluster of every example *within its own class*,
        in ``[0, k)``; always a non-empty slot of that class.
      counts: ``[C, k]`` int32, number of examples per cluster; ``counts > 0`` is the
        valid mask (0 = empty slot).
      inertia: ``[C]`` sum of squared distances of each class's examples to their
        centroid.
      iterations: ``[]`` int32, Lloyd iterations run (the maximum over restarts).
      converged: ``[]`` bool, whether every class converged before ``max_iterations``
        (in every restart). The refinement (``refine_steps``) is a bounded polish
        after that and does not enter.
    """

    centroids: jax.Array
    assignments: jax.Array
    counts: jax.Array
    inertia: jax.Array
    iterations: jax.Array
    converged: jax.Array


# --------------------------------------------------------------------------- helpers


def _compute_dtype(dtype) -> jnp.dtype:
    """float32 for low-precision or integer inputs, float64 kept when x64 is on."""
    return jnp.promote_types(dtype, jnp.float32)


# Elements processed together per chunk of classes by :func:`_exact_two_means`: bounds
# the memory of its ``[chunk, L, H]`` partition scores.
_CHUNK_FLOATS = 1 << 22

# Smallest and largest rows per block of :class:`_ClassBlocks`.
_MIN_BLOCK_ROWS = 4
_MAX_BLOCK_ROWS = 256

# From this many rows per block, distances by the expansion ``‖x‖² − 2x·c + ‖c‖²`` (a
# batched matmul over the transposed blocks, see :class:`_ClassBlocks`) beat the
# difference form on XLA:CPU; below it the matmuls are too small.
_EXPANSION_MIN_BLOCK_ROWS = 32


class _ClassBlocks(NamedTuple):
    """The examples laid out in blocks of rows of a single class.

    Distances to per-class tables then need one ``[m, d]`` table per block, not one
    per example: gathering ``[N, m, d]`` centroids is what per-example distances cost.
    Classes are padded to a whole number of blocks with zero rows; unused trailing
    blocks are zero too. Distances come out slot-major, ``[B, m, rows]``: the table
    times the transposed block is a product whose output rows are as long as a block,
    which XLA:CPU computes (and reduces over the slots) about twice as fast as the
    ``[B, rows, m]`` product, whose rows are only ``m`` long.

    Attributes:
      points: ``[B, rows, d]`` examples; padding rows are zero.
      points_t: ``[B, d, rows]`` the same, transposed, for the expansion; None where
        blocks are too small for it (fewer than :data:`_EXPANSION_MIN_BLOCK_ROWS` rows).
      sq_norms: ``[B, rows]`` their squared norms.
      block_class: ``[B]`` int32 class of every block.
      position: ``[N]`` int32 row of every example in ``points.reshape(-1, d)``.
      source: ``[B, rows]`` int32 example of every row; ``N`` on padding rows.
    """

    points: jax.Array
    points_t: jax.Array | None
    sq_norms: jax.Array
    block_class: jax.Array
    position: jax.Array
    source: jax.Array


def _block_rows(n: int, num_classes: int) -> int:
    """Rows per block: the largest power of two up to the mean class size (between
    :data:`_MIN_BLOCK_ROWS` and :data:`_MAX_BLOCK_ROWS`), so padding adds at most
    ``C · rows <= N`` rows."""
    rows = _MIN_BLOCK_ROWS
    while rows * 2 <= min(_MAX_BLOCK_ROWS, n / num_classes):
        rows *= 2
    return rows


def _max_blocks(n: int, num_classes: int) -> int:
    """Blocks any labelling of ``n`` examples into ``num_classes`` classes can need:
    ``Σ_c ⌈n_c / rows⌉ <= (N + C·(rows − 1)) / rows``, and no block is empty."""
    rows = _block_rows(n, num_classes)
    return max(1, min(n, (n + num_classes * (rows - 1)) // rows))


def _round_up(value: int, quantum: int) -> int:
    return -(-value // quantum) * quantum


def _class_sizes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[G, C]`` examples of every class in every row of ``[G, N]`` labels."""
    groups = labels.shape[0]
    flat = (labels + num_classes * np.arange(groups)[:, None]).ravel()
    return np.bincount(flat, minlength=groups * num_classes).reshape(groups, num_classes)


def _num_blocks(labels: np.ndarray, num_classes: int) -> int:
    """Blocks that concrete ``[N]`` labels need (``[G, N]``: the most any row needs),
    rounded up to a sixteenth of the bound so that new labels with similar class sizes
    reuse the compiled program."""
    labels = np.atleast_2d(np.asarray(labels, np.int64))
    n = labels.shape[1]
    rows = _block_rows(n, num_classes)
    needed = int(np.max(np.sum(-(-_class_sizes(labels, num_classes) // rows), axis=1)))
    bound = _max_blocks(n, num_classes)
    quantum = max(1, -(-bound // 16))
    return min(bound, _round_up(needed, quantum))


class _Layout(NamedTuple):
    """Where every example goes in :class:`_ClassBlocks` (integers only, no data).

    Attributes:
      source: ``[B, rows]`` int32 example of every row; ``N`` on padding rows.
      block_class: ``[B]`` int32 class of every block.
      position: ``[N]`` int32 row of every example in the flattened blocks.
    """

    source: jax.Array
    block_class: jax.Array
    position: jax.Array


def _layout(labels: jax.Array, num_classes: int, num_blocks: int | None = None) -> _Layout:
    """:class:`_Layout` of traced ``[N]`` labels (jittable).

    Blocks of a class are consecutive, classes in increasing order, examples of a class
    in increasing index order (a stable sort by label). ``num_blocks`` (static) must be
    at least what the labels need (see :func:`_num_blocks`); None takes the bound for
    any labelling. :func:`_layout_host` computes the same arrays with NumPy.
    """
    n = labels.shape[0]
    rows = _block_rows(n, num_classes)
    if num_blocks is None:
        num_blocks = _max_blocks(n, num_classes)
    sizes = jax.ops.segment_sum(jnp.ones_like(labels), labels, num_classes)
    blocks_per_class = (sizes + rows - 1) // rows
    block_end = jnp.cumsum(blocks_per_class)
    class_start = jnp.cumsum(sizes) - sizes
    first_block = block_end - blocks_per_class
    order = jnp.argsort(labels, stable=True)
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    position = (first_block[labels] * rows + rank - class_start[labels]).astype(jnp.int32)
    block_class = jnp.searchsorted(block_end, jnp.arange(num_blocks), side="right")
    block_class = jnp.minimum(block_class, num_classes - 1).astype(jnp.int32)
    within = (jnp.arange(num_blocks) - first_block[block_class])[:, None] * rows + jnp.arange(rows)
    in_class = within < sizes[block_class][:, None]  # [B, rows]; False on padding
    source = jnp.where(
        in_class, order[jnp.minimum(class_start[block_class][:, None] + within, n - 1)], n
    )
    return _Layout(source.astype(jnp.int32), block_class, position)


def _layout_host(labels: np.ndarray, num_classes: int, num_blocks: int) -> _Layout:
    """:func:`_layout` of concrete ``[N]`` labels, computed with NumPy on the host (a
    stable sort there is much cheaper than XLA's on the CPU); the same integers, as
    NumPy arrays."""
    return _Layout(
        *(field[0] for field in _layouts_host(np.asarray(labels)[None], num_classes, num_blocks))
    )


def _layouts_host(labels: np.ndarray, num_classes: int, num_blocks: int) -> _Layout:
    """:func:`_layout_host` of every row of ``[G, N]`` labels at once, stacked ``[G, ...]``
    (every row its own problem of ``num_classes`` classes in ``num_blocks`` blocks)."""
    labels = np.asarray(labels, np.int64)
    groups, n = labels.shape
    rows = _block_rows(n, num_classes)
    sizes = _class_sizes(labels, num_classes)  # [G, C]
    blocks_per_class = -(-sizes // rows)
    block_end = np.cumsum(blocks_per_class, axis=1)
    class_start = np.cumsum(sizes, axis=1) - sizes
    first_block = block_end - blocks_per_class
    # Labels below 2^16 sort as uint16, where NumPy's stable sort is a radix sort.
    keys = labels.astype(np.uint16) if num_classes <= 1 << 16 else labels
    order = np.argsort(keys, axis=1, kind="stable")
    rank = np.empty((groups, n), np.int64)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(n), (groups, n)), axis=1)
    position = (
        np.take_along_axis(first_block, labels, 1) * rows
        + rank
        - np.take_along_axis(class_start, labels, 1)
    )
    # The class of every block: one sorted search over all rows, each row's block ends
    # shifted past the previous row's.
    span = num_blocks + int(block_end.max()) + 1
    shift = span * np.arange(groups)[:, None]
    block_class = (
        np.searchsorted(
            (block_end + shift).ravel(), (np.arange(num_blocks) + shift).ravel(), side="right"
        ).reshape(groups, num_blocks)
        - num_classes * np.arange(groups)[:, None]
    )
    block_class = np.minimum(block_class, num_classes - 1)
    within = (np.arange(num_blocks) - np.take_along_axis(first_block, block_class, 1))[
        ..., None
    ] * rows + np.arange(rows)  # [G, B, rows]
    in_class = within < np.take_along_axis(sizes, block_class, 1)[..., None]
    index = np.minimum(np.take_along_axis(class_start, block_class, 1)[..., None] + within, n - 1)
    source = np.where(
        in_class,
        np.take_along_axis(order, index.reshape(groups, -1), 1).reshape(index.shape),
        n,
    )
    return _Layout(source.astype(np.int32), block_class.astype(np.int32), position.astype(np.int32))


# Rows × dimensions of one group of classes clustered together (see :class:`_Groups`):
# a working set that stays in a core's cache across the passes of k-means.
_GROUP_FLOATS = 1 << 17


class _Groups(NamedTuple):
    """Classes packed into groups that are clustered one after another (concrete labels).

    One pass of k-means over every class at once streams all ``N·d`` floats through the
    cache per step; a group of a few classes stays in the cache for all of its steps, and
    its loops stop when *its* classes have converged. Classes are packed in class order
    into groups of at most ``max(largest class, _GROUP_FLOATS / d)`` rows; every group is
    padded to the same shape: ``R`` rows and ``M`` classes, plus a padding class ``M``
    that holds the padding rows (zero points) and is dropped from the result.

    Attributes (NumPy, computed on the host):
      rows: ``[G, R]`` example of every row; ``N`` on padding rows.
      labels: ``[G, R]`` class within the group, in ``[0, M]``; ``M`` on padding rows.
      classes: ``[G, M + 1]`` class of every class slot of the group; ``C`` on unused
        slots and on the padding class.
      class_group, class_slot: ``[C]`` group and slot of every class.
      example_group, example_row: ``[N]`` group and row of every example.
      layouts: the :class:`_Layout` of every group's labels, stacked ``[G, ...]``.
      num_blocks: blocks per group (static).
      num_groups: the groups that hold classes; ``G`` rounds it up to a multiple of
        ``num_parts`` with empty groups (every row padding, every slot unused).
      num_parts: the parts the groups are clustered in, side by side (``G / num_parts``
        groups each).
    """

    rows: np.ndarray
    labels: np.ndarray
    classes: np.ndarray
    class_group: np.ndarray
    class_slot: np.ndarray
    example_group: np.ndarray
    example_row: np.ndarray
    layouts: _Layout
    num_blocks: int
    num_groups: int
    num_parts: int


def _groups_host(
    labels: np.ndarray, num_classes: int, dim: int, num_parts: int = 1
) -> _Groups | None:
    """:class:`_Groups` of concrete ``[N]`` labels in up to ``num_parts`` parts of equal
    shape, or None when every class fits in one group (then all classes are clustered at
    once, as for traced labels).

    Rows are rounded up to a multiple of 64, so that new labels with similar class sizes
    reuse the compiled program.
    """
    labels = np.asarray(labels, np.int64)
    n = labels.shape[0]
    sizes = np.bincount(labels, minlength=num_classes)
    capacity = max(int(sizes.max()), _GROUP_FLOATS // max(dim, 1))
    if n <= capacity:
        return None
    # Consecutive classes while the group's rows stay within the capacity.
    ends = np.cumsum(sizes)
    starts = []
    start = 0
    while start < num_classes:
        starts.append(start)
        base = ends[start - 1] if start else 0
        start = max(start + 1, int(np.searchsorted(ends, base + capacity, side="right")))
    first_class = np.asarray(starts)
    num_groups = len(starts)
    if num_groups < 2:
        return None
    class_group = np.repeat(np.arange(num_groups), np.diff(np.append(first_class, num_classes)))
    class_slot = np.arange(num_classes) - first_class[class_group]
    group_sizes = np.bincount(class_group, weights=sizes, minlength=num_groups).astype(np.int64)
    num_rows = _round_up(int(group_sizes.max()), 64)
    slots = int(class_slot.max()) + 1
    num_parts = min(num_parts, num_groups)
    padded_groups = _round_up(num_groups, num_parts)

    order = np.argsort(
        labels.astype(np.uint16) if num_classes <= 1 << 16 else labels, kind="stable"
    )
    example_group = class_group[labels]
    group_start = np.cumsum(group_sizes) - group_sizes
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    example_row = rank - group_start[example_group]
    rows = np.full((padded_groups, num_rows), n, np.int64)
    rows[example_group, example_row] = np.arange(n)
    group_labels = np.full((padded_groups, num_rows), slots, np.int64)
    group_labels[example_group, example_row] = class_slot[labels]
    classes = np.full((padded_groups, slots + 1), num_classes, np.int64)
    classes[class_group, class_slot] = np.arange(num_classes)

    num_blocks = _num_blocks(group_labels, slots + 1)
    return _Groups(
        rows.astype(np.int32),
        group_labels.astype(np.int32),
        classes.astype(np.int32),
        class_group.astype(np.int32),
        class_slot.astype(np.int32),
        example_group.astype(np.int32),
        example_row.astype(np.int32),
        _layouts_host(group_labels, slots + 1, num_blocks),
        num_blocks,
        num_groups,
        num_parts,
    )


# The last few :class:`_Groups` computed, by labels and shape (see :func:`_cached_groups`).
_GROUPS_CACHE: collections.OrderedDict = collections.OrderedDict()
_GROUPS_CACHE_SIZE = 4
_GROUPS_CACHE_LOCK = threading.Lock()  # k-means may be called from several threads


def _cached_groups(
    labels: np.ndarray, num_classes: int, dim: int, num_parts: int
) -> _Groups | None:
    """:func:`_groups_host`, remembered for the last few labellings: a refresh clusters
    the same training labels every time, and packing them costs the host a sort and
    several passes over the labels. Keyed by a digest of the labels' bytes (not their
    identity: arrays are mutable) and everything else the groups depend on; the cached
    NumPy arrays are only read."""
    labels = np.ascontiguousarray(labels)
    key = (
        hashlib.blake2b(labels.tobytes(), digest_size=16).digest(),
        labels.dtype.str,
        labels.shape,
        num_classes,
        dim,
        num_parts,
        _GROUP_FLOATS,
    )
    with _GROUPS_CACHE_LOCK:
        if key in _GROUPS_CACHE:
            _GROUPS_CACHE.move_to_end(key)
            return _GROUPS_CACHE[key]
    groups = _groups_host(labels, num_classes, dim, num_parts)
    with _GROUPS_CACHE_LOCK:
        _GROUPS_CACHE[key] = groups
        while len(_GROUPS_CACHE) > _GROUPS_CACHE_SIZE:
            _GROUPS_CACHE.popitem(last=False)
    return groups


def _class_blocks(x: jax.Array, layout: _Layout) -> _ClassBlocks:
    """Lays ``x`` ``[N, d]`` out as :class:`_ClassBlocks` by ``layout`` (jittable)."""
    n = x.shape[0]
    source = layout.source
    # Rows gathered from x (a gather of rows is much cheaper than a scatter on the CPU).
    points = jnp.where((source < n)[..., None], x[jnp.minimum(source, n - 1)], 0)
    expandable = points.shape[1] >= _EXPANSION_MIN_BLOCK_ROWS
    return _ClassBlocks(
        points,
        # Materialised once: without the barrier XLA folds the transpose back into the
        # products outside loops, which then run at the slow row-major speed.
        jax.lax.optimization_barrier(jnp.swapaxes(points, 1, 2)) if expandable else None,
        jnp.sum(jnp.square(points), axis=-1),
        layout.block_class,
        layout.position,
        layout.source,
    )


def _sq_distances_to_class_rows(
    blocks: _ClassBlocks, table: jax.Array, *, expand: bool = False
) -> jax.Array:
    """``[N, m]`` :func:`_block_sq_distances` in example order."""
    num_blocks, rows, _ = blocks.points.shape
    sq = jnp.swapaxes(_block_sq_distances(blocks, table, expand=expand), 1, 2)
    return sq.reshape(num_blocks * rows, table.shape[1])[blocks.position]


def _block_sq_distances(
    blocks: _ClassBlocks, table: jax.Array, *, expand: bool = False
) -> jax.Array:
    """Squared distance of every example to every row of its own class's table.

    Args:
      blocks: the ``N`` examples, see :class:`_ClassBlocks`.
      table: ``[C, m, d]`` points per class (centroids, or k-means++ candidates).
      expand: use ``‖x‖² − 2x·c + ‖c‖²`` (clamped at 0) where blocks are large enough
        for it to be faster (``blocks.points_t`` is set); only for data centred per class
        (see :func:`_kmeans_per_class_core`). It is not exactly 0 for a point on its
        centroid, hence the final assignment uses the difference form (k-means++ zeroes
        the residue).

    Returns:
      ``[B, m, rows]`` with ``‖x_i − table[labels_i, j]‖²`` at ``[:, j]`` in the row of
      example ``i`` (padding rows: the distances of a zero point).
    """
    per_block = table[blocks.block_class]  # [B, m, d]
    if expand and blocks.points_t is not None:
        # −2 is folded into the operand (exact: a power of two) rather than applied to the
        # product: XLA:CPU (jax 0.10) miscompiled `‖x‖² − 2·cross + ‖c‖²` under jit for
        # some shapes (many blocks of 256 rows, 128-d, ~100 centroids: distances wrong by
        # orders of magnitude, k-means collapsed onto one cluster); this form is right
        # there and equal bit for bit to the eager result (tests/test_kmeans.py).
        cross = jnp.einsum("bmd,bdr->bmr", -2 * per_block, blocks.points_t)
        return jnp.maximum(
            blocks.sq_norms[:, None, :] + cross + jnp.sum(jnp.square(per_block), -1)[..., None],
            0,
        )
    # One fused loop: XLA fuses the broadcast difference into the reduction, so the
    # [B, rows, m, d] tensor is never materialised (a lax.map over chunks of blocks
    # gives the same values bit for bit, more slowly). Computed row-major, where the
    # reduction runs along contiguous memory, and transposed for free in the fusion.
    sq = jnp.sum(jnp.square(blocks.points[:, :, None, :] - per_block[:, None]), axis=-1)
    return jnp.swapaxes(sq, 1, 2)


def _min_slot(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(argmin [B, rows] int32, min [B, rows])`` of ``[B, m, rows]`` over the slots;
    ties go to the lowest slot, a row of ``+inf`` to slot 0.

    Taken as the minimum and then the first slot that attains it: elementwise passes
    over the slots, which XLA:CPU vectorises along the rows, where ``argmin``'s
    variadic reduction is several times slower.
    """
    lowest = jnp.min(values, axis=1)
    slots = jnp.arange(values.shape[1], dtype=jnp.int32)[:, None]
    first = jnp.min(jnp.where(values == lowest[:, None], slots, values.shape[1]), axis=1)
    # A NaN row matches no slot; keep the index in range (inputs are checked finite).
    return jnp.minimum(first, values.shape[1] - 1), lowest


def _nearest_slot(
    blocks: _ClassBlocks,
    centroids: jax.Array,
    valid: jax.Array,
    fast: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Nearest valid slot of every example's own class.

    Args:
      blocks: the ``N`` examples, see :class:`_ClassBlocks`.
      centroids: ``[C, k, d]``.
      valid: ``[C, k]`` bool.
      fast: compare the slots by the expansion (see :func:`_block_sq_distances`; only
        for data centred per class). The distance returned is then recomputed in the
        difference form to the chosen slot alone, so it is exact (0 for a point on its
        centroid); the choice between slots within rounding of each other may differ
        from the difference form's.

    Returns:
      ``(slot [N] int32, sq_distance [N])``; slot 0 and ``+inf`` when the class has no
      valid slot. Ties go to the lowest slot. The minimum is taken in the block layout;
      only the ``[N]`` results are gathered into example order.
    """
    block_valid = valid[blocks.block_class]  # [B, k]
    sq_distances = jnp.where(
        block_valid[..., None], _block_sq_distances(blocks, centroids, expand=fast), jnp.inf
    )  # [B, k, rows]
    slot, sq = _min_slot(sq_distances)
    if fast and blocks.points_t is not None:
        own = jnp.take_along_axis(centroids[blocks.block_class], slot[..., None], axis=1)
        exact = jnp.sum(jnp.square(blocks.points - own), axis=-1)  # [B, rows]
        sq = jnp.where(jnp.any(block_valid, axis=1)[:, None], exact, jnp.inf)
    return slot.reshape(-1)[blocks.position], sq.reshape(-1)[blocks.position]


def _class_sq_norms(blocks: _ClassBlocks, num_classes: int) -> jax.Array:
    """``[C]`` Σ‖x‖² over every class's examples, from the blocks' row norms (padding
    rows are zero): a reduction over blocks, not a scatter over examples."""
    return jax.ops.segment_sum(jnp.sum(blocks.sq_norms, axis=1), blocks.block_class, num_classes)


def _segment_argmax(
    scores: jax.Array, segment_ids: jax.Array, num_segments: int
) -> tuple[jax.Array, jax.Array]:
    """Index of the largest finite score in every segment.

    Args:
      scores: ``[N]`` float; ``-inf`` marks examples that may not be picked.
      segment_ids: ``[N]`` int segment of every example.
      num_segments: number of segments ``C``.

    Returns:
      ``(index [C] int32, found [C] bool)``. Ties go to the lowest index; ``found`` is
      False for segments with no finite score, whose index is then 0.
    """
    n = scores.shape[0]
    best = jax.ops.segment_max(scores, segment_ids, num_segments)
    is_best = (scores == best[segment_ids]) & (scores > -jnp.inf)
    positions = jnp.arange(n, dtype=jnp.int32)
    index = jax.ops.segment_min(jnp.where(is_best, positions, n), segment_ids, num_segments)
    found = index < n
    return jnp.where(found, index, 0).astype(jnp.int32), found


def _class_sums(
    x: jax.Array, labels: jax.Array, assignments: jax.Array, num_classes: int, k: int
) -> tuple[jax.Array, jax.Array]:
    """Per-cluster sums ``[C, k, d]`` and counts ``[C, k]`` int32."""
    flat_ids = labels * k + assignments
    sums = jax.ops.segment_sum(x, flat_ids, num_classes * k)
    counts = jax.ops.segment_sum(jnp.ones_like(flat_ids), flat_ids, num_classes * k)
    return (
        sums.reshape(num_classes, k, x.shape[1]),
        counts.reshape(num_classes, k).astype(jnp.int32),
    )


# ------------------------------------------------------------------ public helpers


def _check_embeddings_labels(embeddings, labels):
    if embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must have rank 2 [N, d], got shape {tuple(embeddings.shape)}."
        )
    if labels.ndim != 1:
        raise ValueError(f"labels must have rank 1 [N], got shape {tuple(labels.shape)}.")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels {tuple(labels.shape)} and embeddings {tuple(embeddings.shape)} "
            "disagree on the number of examples N."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")


def assign_to_centroids(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    centroids: jax.typing.ArrayLike,
    valid: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array]:
    """Nearest valid centroid of every example's own class.

    Args:
      embeddings: ``[N, d]`` examples.
      labels: ``[N]`` int class of every example, in ``[0, C)``.
      centroids: ``[C, k, d]`` cluster centres per class.
      valid: ``[C, k]`` bool, which slots exist (e.g. ``counts > 0``).

    Returns:
      ``(assignments [N] int32, sq_distance [N])``: the slot in ``[0, k)`` of the nearest
      valid centroid of the example's class and the squared distance to it. An example
      whose class has no valid slot gets slot 0 and distance ``+inf``.
    """
    embeddings = jnp.asarray(embeddings)
    labels = jnp.asarray(labels)
    centroids = jnp.asarray(centroids)
    valid = jnp.asarray(valid)
    _check_embeddings_labels(embeddings, labels)
    if centroids.ndim != 3 or centroids.shape[2] != embeddings.shape[1]:
        raise ValueError(
            f"centroids must be [C, k, d] with d = {embeddings.shape[1]}, got shape "
            f"{tuple(centroids.shape)}."
        )
    if valid.shape != centroids.shape[:2]:
        raise ValueError(
            f"valid must be [C, k] = {tuple(centroids.shape[:2])}, got shape {tuple(valid.shape)}."
        )
    dtype = _compute_dtype(jnp.result_type(embeddings, centroids))
    labels = labels.astype(jnp.int32)
    blocks = _class_blocks(embeddings.astype(dtype), _layout(labels, centroids.shape[0]))
    return _nearest_slot(blocks, centroids.astype(dtype), valid.astype(bool))


def centroids_from_assignments(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    assignments: jax.typing.ArrayLike,
    *,
    num_classes: int,
    k: int,
) -> tuple[jax.Array, jax.Array]:
    """Mean of every (class, cluster) from given assignments.

    Args:
      embeddings: ``[N, d]`` examples.
      labels: ``[N]`` int class of every example, in ``[0, num_classes)``.
      assignments: ``[N]`` int cluster of every example within its class, in ``[0, k)``.
      num_classes: number of classes ``C`` (static).
      k: number of slots per class (static).

    Returns:
      ``(centroids [C, k, d], counts [C, k] int32)``; the centroid of an empty slot
      (count 0) is zeros.
    """
    embeddings = jnp.asarray(embeddings)
    labels = jnp.asarray(labels)
    assignments = jnp.asarray(assignments)
    _check_embeddings_labels(embeddings, labels)
    if assignments.shape != labels.shape:
        raise ValueError(
            f"assignments must be [N] = {tuple(labels.shape)}, got shape "
            f"{tuple(assignments.shape)}."
        )
    if not jnp.issubdtype(assignments.dtype, jnp.integer):
        raise ValueError(f"assignments must be integers, got dtype {assignments.dtype}.")
    if k < 1 or num_classes < 1:
        raise ValueError(f"k and num_classes must be >= 1, got k={k}, num_classes={num_classes}.")
    x = embeddings.astype(_compute_dtype(embeddings.dtype))
    sums, counts = _class_sums(
        x, labels.astype(jnp.int32), assignments.astype(jnp.int32), num_classes, k
    )
    centroids = jnp.where(
        counts[..., None] > 0, sums / jnp.maximum(counts, 1)[..., None].astype(x.dtype), 0
    )
    return centroids, counts


# ------------------------------------------------------------------------ k-means++


def _draw_rows(
    blocks: _ClassBlocks, weights: jax.Array, uniforms: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Draw a row of every class with probability ∝ ``weights`` (inverse transform).

    Args:
      blocks: the examples, see :class:`_ClassBlocks`.
      weights: ``[B, rows]`` non-negative; 0 on rows that may not be drawn (padding
        rows must be 0).
      uniforms: ``[T, C]`` in ``[0, 1)``, one per draw.
      num_classes: ``C``.

    Returns:
      ``(row [T, C] int32, found [C] bool)``: the row of ``blocks.points.reshape(-1, d)``
      of the first positive-weight row of the class whose cumulative weight exceeds
      ``uniform × total``; ``found`` is False (and the row 0) for a class whose weights
      are all 0. Rows of weight 0 are never drawn, even where rounding puts the target
      past the last cumulative weight (the class's last positive row is drawn then).
    """
    num_blocks, rows = weights.shape
    block_class = blocks.block_class
    within = jnp.cumsum(weights, axis=1)  # [B, rows]
    # Cumulative weight of the class's earlier blocks: a scan that restarts at every
    # class's first block (a class's blocks are consecutive), so a small class's sums
    # never pass through the large totals of the classes before it.
    starts = jnp.concatenate([jnp.ones((1,), bool), block_class[1:] != block_class[:-1]])

    def combine(left, right):
        return jnp.where(right[1], right[0], left[0] + right[0]), left[1] | right[1]

    through, _ = jax.lax.associative_scan(combine, (within[:, -1], starts))
    before = jnp.where(starts, 0, jnp.roll(through, 1))
    cumulative = before[:, None] + within  # [B, rows]
    total = jax.ops.segment_max(through, block_class, num_classes)  # [C]
    target = uniforms * total  # [T, C]
    flat = jnp.arange(num_blocks * rows, dtype=jnp.int32).reshape(num_blocks, rows)
    positive = weights > 0
    past = positive & (cumulative > target[:, block_class][..., None])  # [T, B, rows]
    none = num_blocks * rows
    first = jax.ops.segment_min(
        jnp.min(jnp.where(past, flat, none), axis=2).T, block_class, num_classes
    ).T  # [T, C]
    last = jax.ops.segment_max(
        jnp.max(jnp.where(positive, flat, -1), axis=1), block_class, num_classes
    )
    found = total > 0
    row = jnp.where(first < none, first, last[None])
    return jnp.where(found[None], row, 0).astype(jnp.int32), found


def _kmeans_plusplus(blocks, key, *, num_classes, k, num_local_trials):
    """Greedy k-means++ in every class at once, in the block layout.

    Every draw is one uniform number per class and trial (inverse transform sampling
    on the class's cumulative D², :func:`_draw_rows`), so the random numbers cost
    ``O(k · trials · C)``, not ``O(k · trials · N)``; the class potentials are sums over
    blocks, never scatters over examples.

    Returns:
      ``(centroids [C, k, d], active [C, k] bool)``; inactive slots are zeros and stay
      empty (the class had no more distinct points to seed them with).
    """
    num_blocks, rows, d = blocks.points.shape
    dtype = blocks.points.dtype
    points = blocks.points.reshape(-1, d)
    real = blocks.source < blocks.position.shape[0]  # [B, rows]; False on padding
    first_key, rounds_key = jax.random.split(key)

    # Round 0: uniform within the class.
    index, found = _draw_rows(
        blocks,
        real.astype(dtype),
        jax.random.uniform(first_key, (1, num_classes), dtype),
        num_classes,
    )
    first = jnp.where(found[:, None], points[index[0]], 0)
    centroids = jnp.zeros((num_classes, k, d), dtype).at[:, 0].set(first)
    active = jnp.zeros((num_classes, k), bool).at[:, 0].set(found)
    if k == 1:
        return centroids, active
    # D² to the nearest chosen centre, exact (difference form): a chosen point is at 0.
    min_sq = jnp.where(
        real, jnp.sum(jnp.square(blocks.points - first[blocks.block_class][:, None]), axis=-1), 0
    )  # [B, rows]
    uniforms = jax.random.uniform(rounds_key, (k - 1, num_local_trials, num_classes), dtype)

    def round_fn(slot, carry):
        centroids, active, min_sq = carry
        # Greedy k-means++: draw `num_local_trials` candidates per class ∝ D² (an
        # already-chosen point has D² = 0: never drawn), keep the one that lowers the
        # class potential most.
        index, found = _draw_rows(blocks, min_sq, uniforms[slot - 1], num_classes)
        candidates = jnp.swapaxes(points[index], 0, 1)  # [C, T, d]
        candidate_sq = _block_sq_distances(blocks, candidates, expand=True)  # [B, T, rows]
        # The expansion leaves rounding residue (relative to the norms) where a point
        # sits on a candidate; k-means++ must see exactly 0 there, so that a point or a
        # copy of it is never picked twice.
        scale = (
            blocks.sq_norms[:, None, :]
            + jnp.sum(jnp.square(candidates), axis=-1)[blocks.block_class][..., None]
        )
        candidate_sq = jnp.where(candidate_sq <= 64 * jnp.finfo(dtype).eps * scale, 0, candidate_sq)
        candidate_min_sq = jnp.minimum(min_sq[:, None], candidate_sq)  # [B, T, rows]
        potentials = jax.ops.segment_sum(
            jnp.sum(candidate_min_sq, axis=2), blocks.block_class, num_classes
        )  # [C, T]
        best_trial = jnp.argmin(potentials, axis=1)  # [C]; ties: the earlier trial
        chosen = jnp.take_along_axis(candidates, best_trial[:, None, None], axis=1)[:, 0]
        chosen = jnp.where(found[:, None], chosen, 0)
        chosen_min_sq = jnp.take_along_axis(
            candidate_min_sq, best_trial[blocks.block_class][:, None, None], axis=1
        )[:, 0]
        min_sq = jnp.where(found[blocks.block_class][:, None], chosen_min_sq, min_sq)
        centroids = centroids.at[:, slot].set(chosen)
        active = active.at[:, slot].set(found)
        return centroids, active, min_sq

    centroids, active, _ = jax.lax.fori_loop(1, k, round_fn, (centroids, active, min_sq))
    return centroids, active


# ---------------------------------------------------------------------------- Lloyd


def _relocate_empty(x, labels, assignments, sq_distances, sums, counts, active, *, num_classes, k):
    """Re-seed empty active slots on the farthest examples of their class.

    Mirrors scikit-learn's ``_relocate_empty_clusters``: the example is removed from its
    old cluster's sum and count and becomes the whole of the empty one (its assignment
    too). Slots whose class has no example left at a positive distance are retired
    (``active`` False).

    Returns:
      ``(assignments [N], sums [C, k, d], counts [C, k], active [C, k])``.
    """
    n = x.shape[0]
    empty = active & (counts == 0)
    drop = num_classes * k  # an out-of-range flat id: dropped by the scatters

    def slot_fn(slot, carry):
        assignments, sums, counts, active, scores = carry
        needs_point = empty[:, slot]  # [C]
        # Only examples of classes whose slot needs a point compete.
        index, found = _segment_argmax(
            jnp.where(needs_point[labels], scores, -jnp.inf), labels, num_classes
        )
        moved = needs_point & found & (scores[index] > 0)
        point = x[index]  # [C, d]
        donor = jnp.where(moved, labels[index] * k + assignments[index], drop)
        sums = (
            sums.reshape(num_classes * k, -1).at[donor].add(-point, mode="drop").reshape(sums.shape)
        )
        counts = counts.reshape(-1).at[donor].add(-1, mode="drop").reshape(counts.shape)
        sums = sums.at[:, slot].set(jnp.where(moved[:, None], point, sums[:, slot]))
        counts = counts.at[:, slot].set(jnp.where(moved, 1, counts[:, slot]))
        active = active.at[:, slot].set(active[:, slot] & ~(needs_point & ~moved))
        # A moved example cannot be taken again by a later slot of the same class.
        moved_index = jnp.where(moved, index, n)
        scores = scores.at[moved_index].set(-jnp.inf, mode="drop")
        assignments = assignments.at[moved_index].set(slot, mode="drop")
        return assignments, sums, counts, active, scores

    assignments, sums, counts, active, _ = jax.lax.fori_loop(
        0, k, slot_fn, (assignments, sums, counts, active, sq_distances)
    )
    return assignments, sums, counts, active


def _carried(blocks: _ClassBlocks, points_t: jax.Array | None) -> _ClassBlocks:
    """``blocks`` inside a loop body, with ``points_t`` taken from the loop's carry
    through an optimization barrier.

    The loop returns them, and code after the loop uses its output. Without this, XLA
    sees that the loop passes them through unchanged, and code after the loop that
    reads them gets a second copy of the transposition (the loop's input buffer is the
    loop's to reuse).
    """
    if points_t is None:
        return blocks
    return blocks._replace(points_t=jax.lax.optimization_barrier(points_t))


def _hartigan_refine(x, labels, assignments, *, num_classes, k, max_steps, blocks=None):
    """Hartigan single-point moves after Lloyd, in every class at once.

    Lloyd stops at any partition where every point is nearest to its own centroid. On
    small classes in high dimension many such partitions are poor (e.g. a singleton
    cluster next to one holding all the rest), and a k-means++ start lands in them
    often. Moving point ``i`` from cluster ``a`` (``n_a`` points) to ``j`` changes the
    inertia by exactly

        ``Δ_ij = n_j / (n_j + 1) · ‖x_i − μ_j‖²  −  n_a / (n_a − 1) · ‖x_i − μ_a‖²``

    (both means move). Every step computes, for every point, its best ``Δ`` and then,
    per class, either makes *all* improving moves at once (when the inertia of that
    partition, ``Σ‖x‖² − Σ_j ‖S_j‖² / n_j``, is at least as low as the best single move
    gives, and no cluster is emptied) or only the class's best single move. So the
    inertia never rises, and mid-size classes with many improving moves need few steps.
    It stops when no class has a move that lowers its inertia by more than a relative
    ``1e-6``, or after ``max_steps`` steps. A partition without improving moves is also a
    Lloyd fixed point (a point nearer to another centroid always has ``Δ < 0``).

    ``blocks`` is ``x`` as :class:`_ClassBlocks` (built here when None).

    Returns:
      ``(assignments [N] int32, steps [] int32, finished [] bool, blocks)``: ``blocks``
      as the loop returns them (see :func:`_carried`), for what follows the loop.
    """
    n = x.shape[0]
    if blocks is None:
        blocks = _class_blocks(x, _layout(labels, num_classes))
    class_sq_norms = _class_sq_norms(blocks, num_classes)

    def partition_inertia(sums, counts):
        # Σ_i ‖x_i‖² − Σ_j ‖S_j‖² / n_j per class (x is centred per class, so this does
        # not cancel badly).
        per_slot = jnp.sum(jnp.square(sums), axis=-1) / jnp.maximum(counts, 1).astype(x.dtype)
        return class_sq_norms - jnp.sum(per_slot, axis=1)

    def step_fn(carry):
        assignments, step, _, points_t = carry
        blocks_in = _carried(blocks, points_t)
        sums, counts = _class_sums(x, labels, assignments, num_classes, k)
        centroids = sums / jnp.maximum(counts, 1)[..., None].astype(x.dtype)
        # Per example, in the block layout (one [k] row of counts per block, no [N, k]
        # gathers by label); only the [N] results are gathered into example order.
        sq = _block_sq_distances(blocks_in, centroids, expand=True)  # [B, k, rows]
        own = jnp.where(blocks.source < n, assignments[jnp.minimum(blocks.source, n - 1)], 0)[
            :, None, :
        ]  # [B, 1, rows]
        block_counts = counts[blocks.block_class][..., None]  # [B, k, 1]
        sizes = block_counts.astype(x.dtype)
        own_size = jnp.take_along_axis(sizes, own, axis=1)  # [B, 1, rows]
        own_sq = jnp.take_along_axis(sq, own, axis=1)
        removal = own_size / jnp.maximum(own_size - 1, 1) * own_sq
        addition = sizes / (sizes + 1) * sq
        allowed = (block_counts > 0) & (jnp.arange(k)[:, None] != own) & (own_size > 1)
        change = jnp.where(allowed, addition - removal, jnp.inf)
        target, best = _min_slot(change)
        target = target.reshape(-1)[blocks.position]
        best = best.reshape(-1)[blocks.position]
        own_sq = own_sq.reshape(-1)[blocks.position]
        class_inertia = jax.ops.segment_sum(own_sq, labels, num_classes)
        improves = best < -1e-6 * class_inertia[labels]
        index, found = _segment_argmax(jnp.where(improves, -best, -jnp.inf), labels, num_classes)
        one_move = assignments.at[jnp.where(found, index, n)].set(target[index], mode="drop")
        all_moves = jnp.where(improves, target, assignments)
        all_sums, all_counts = _class_sums(x, labels, all_moves, num_classes, k)
        keeps_clusters = ~jnp.any((counts > 0) & (all_counts == 0), axis=1)
        best_single = jnp.where(found, best[index], 0)
        take_all = keeps_clusters & (
            partition_inertia(all_sums, all_counts) <= partition_inertia(sums, counts) + best_single
        )
        assignments = jnp.where(take_all[labels], all_moves, one_move)
        return assignments, step + 1, jnp.any(found), blocks_in.points_t

    def cond_fn(carry):
        _, step, moved, _ = carry
        return moved & (step < max_steps)

    assignments, steps, moved, points_t = jax.lax.while_loop(
        cond_fn, step_fn, (assignments, jnp.zeros((), jnp.int32), jnp.array(True), blocks.points_t)
    )
    return assignments, steps, ~moved, blocks._replace(points_t=points_t)


def _warm_start(x, labels, blocks, centroids, valid, *, num_classes, k):
    """Lloyd's first step from given centroids instead of k-means++.

    Examples go to their nearest ``valid`` centroid; every slot then counts as active,
    so the slots that got no example (the invalid ones among them) are re-seeded on
    the farthest examples of their class by :func:`_relocate_empty`, or retired when
    the class has no example left off its centroid. A class without a valid slot
    starts from its mean.

    Returns:
      ``(centroids [C, k, d], active [C, k] bool)``, as :func:`_kmeans_plusplus`.
    """
    assignments, _ = _nearest_slot(blocks, centroids, valid, fast=True)
    sums, counts = _class_sums(x, labels, assignments, num_classes, k)
    own = jnp.where(valid[labels, assignments][:, None], centroids[labels, assignments], 0)
    _, sums, counts, active = _relocate_empty(
        x,
        labels,
        assignments,
        jnp.sum(jnp.square(x - own), axis=-1),
        sums,
        counts,
        jnp.ones((num_classes, k), bool),
        num_classes=num_classes,
        k=k,
    )
    centroids = jnp.where(
        (counts > 0)[..., None], sums / jnp.maximum(counts, 1)[..., None].astype(x.dtype), 0
    )
    return centroids, active


class _LloydState(NamedTuple):
    centroids: jax.Array  # [C, k, d]
    active: jax.Array  # [C, k] bool
    prev_assignments: jax.Array  # [N] int32, the last assignment step's
    partition: jax.Array  # [N] int32, the same after re-seeding; centroids are its means
    iteration: jax.Array  # [] int32
    class_converged: jax.Array  # [C] bool
    points_t: jax.Array | None  # blocks.points_t, carried (see _carried)


def _kmeans_single(
    x,
    labels,
    blocks,
    key,
    tolerance,
    *,
    num_classes,
    k,
    max_iterations,
    num_local_trials,
    refine_steps,
    initial=None,
):
    """One restart: k-means++ (or ``initial``, see :func:`_warm_start`) then Lloyd;
    returns a KMeansResult (unreduced)."""
    n, d = x.shape
    if initial is None:
        centroids, active = _kmeans_plusplus(
            blocks, key, num_classes=num_classes, k=k, num_local_trials=num_local_trials
        )
    else:
        centroids, active = _warm_start(x, labels, blocks, *initial, num_classes=num_classes, k=k)

    # scikit-learn scales tol by the mean per-dimension variance of the data; per class
    # here, since every class is its own k-means problem.
    # From sums over the blocks (x is centred per class, so Σ‖x‖² − ‖Σx‖²/n does not
    # cancel badly; the tolerance needs no more than a few digits anyway).
    class_sizes = jax.ops.segment_sum(jnp.ones((n,), x.dtype), labels, num_classes)
    class_sums = jax.ops.segment_sum(
        jnp.sum(blocks.points, axis=1), blocks.block_class, num_classes
    )
    class_sq_norms = _class_sq_norms(blocks, num_classes)
    sizes = jnp.maximum(class_sizes, 1)
    class_variance = (
        jnp.maximum(class_sq_norms - jnp.sum(jnp.square(class_sums), axis=-1) / sizes, 0)
        / sizes
        / d
    )
    class_tolerance = tolerance * class_variance

    def cond_fn(state: _LloydState):
        return (state.iteration < max_iterations) & ~jnp.all(state.class_converged)

    def body_fn(state: _LloydState):
        blocks_in = _carried(blocks, state.points_t)
        assignments, _ = _nearest_slot(blocks_in, state.centroids, state.active, fast=True)
        sums, counts = _class_sums(x, labels, assignments, num_classes, k)
        any_empty = jnp.any(state.active & (counts == 0))

        def relocate():
            # Exact distances (difference form): a point on its centroid must be at 0.
            own = state.centroids[labels, assignments]
            sq_distances = jnp.sum(jnp.square(x - own), axis=-1)
            return _relocate_empty(
                x,
                labels,
                assignments,
                sq_distances,
                sums,
                counts,
                state.active,
                num_classes=num_classes,
                k=k,
            )

        partition, sums, counts, active = jax.lax.cond(
            any_empty, relocate, lambda: (assignments, sums, counts, state.active)
        )
        new_centroids = jnp.where(
            counts[..., None] > 0,
            sums / jnp.maximum(counts, 1)[..., None].astype(x.dtype),
            state.centroids,
        )
        new_centroids = jnp.where(active[..., None], new_centroids, 0)
        shift = jnp.sum(jnp.square(new_centroids - state.centroids), axis=(1, 2))
        changed = (
            jax.ops.segment_max(
                (assignments != state.prev_assignments).astype(jnp.int32), labels, num_classes
            )
            > 0
        )
        class_converged = ~changed | (shift <= class_tolerance)
        return _LloydState(
            new_centroids,
            active,
            assignments,
            partition,
            state.iteration + 1,
            class_converged,
            blocks_in.points_t,
        )

    state = _LloydState(
        centroids,
        active,
        jnp.full((n,), -1, jnp.int32),
        jnp.zeros((n,), jnp.int32),
        jnp.zeros((), jnp.int32),
        jnp.zeros((num_classes,), bool),
        blocks.points_t,
    )
    state = jax.lax.while_loop(cond_fn, body_fn, state)
    blocks = blocks._replace(points_t=state.points_t)

    converged = jnp.all(state.class_converged)
    centroids = state.centroids
    if refine_steps > 0:
        # From the partition whose means the centroids are: a point nearer to another
        # centroid has an improving move, so the refinement subsumes a reassignment.
        assignments, _, _, blocks = _hartigan_refine(
            x,
            labels,
            state.partition,
            num_classes=num_classes,
            k=k,
            max_steps=refine_steps,
            blocks=blocks,
        )
        sums, counts = _class_sums(x, labels, assignments, num_classes, k)
        centroids = sums / jnp.maximum(counts, 1)[..., None].astype(x.dtype)
    # Final assignment step so that assignments, counts and inertia all refer to the
    # returned centroids.
    assignments, sq_distances = _nearest_slot(blocks, centroids, state.active, fast=True)
    _, counts = _class_sums(x, labels, assignments, num_classes, k)
    inertia = jax.ops.segment_sum(sq_distances, labels, num_classes)
    centroids = jnp.where(counts[..., None] > 0, centroids, 0)
    return KMeansResult(centroids, assignments, counts, inertia, state.iteration, converged)


# ------------------------------------------------------------ exact tiny classes


# Largest `exhaustive_max_points`: 2^19 partitions scored per class of the call.
_EXHAUSTIVE_MAX_POINTS_LIMIT = 20


def _exact_two_means(
    x: jax.Array, labels: jax.Array, *, num_classes: int, max_points: int
) -> tuple[jax.Array, jax.Array]:
    """Optimal 2-means partition of every class of 2 to ``max_points`` examples.

    A class of ``n`` points has ``2^(n−1) − 1`` partitions into two non-empty parts;
    for ``n ≤ max_points`` all of them are scored at once (every such class of the call
    together, in chunks of classes with ``lax.map``), so the result is the exact optimum,
    which no local search (Lloyd, Hartigan, restarts) guarantees.

    Sufficient statistics, no ``[partitions, d]`` arrays: with the class centred on its
    mean (``S_B = −S_A`` for the sums of the two parts) and the Gram matrix
    ``G = X Xᵀ`` ``[m, m]`` of its padded block of ``m`` points,

        ``inertia(A, B) = tr G − ‖S_A‖² · n / (|A| · |B|)``,  ``‖S_A‖² = a G aᵀ``

    for the 0/1 indicator ``a`` of ``A``. The class's first example always stays in
    ``B`` (slot 0; this removes the A/B symmetry), the other ``m − 1`` bits split into a
    low half (``2^l`` masks) and a high half (``2^h`` masks, ``l + h = m − 1``), and
    ``a G aᵀ`` of all ``2^(m−1)`` combinations is ``q_low[:, None] + q_high[None, :] +
    2 · low G highᵀ``: ``O(2^(m−1))`` work per class instead of ``O(2^(m−1) · m²)``.
    Padding rows of the block are zero (they add nothing to ``G``) and are not counted
    in ``|A|``. The score is a difference of two float sums (``tr G`` and the between-
    part term), so partitions within about ``1e-7 · tr G`` of the optimum (float32) may
    be taken for it.

    Args:
      x: ``[N, d]`` examples (any per-class translation).
      labels: ``[N]`` int32 class of every example, in ``[0, num_classes)``.
      num_classes: number of classes ``C`` (static).
      max_points: largest class enumerated, ``m`` (static); cost ``O(C · 2^(m−1))``
        time, ``O(chunk · 2^(m−1))`` memory.

    Returns:
      ``(assignments [N] int32, exact [C] bool)``: ``exact`` marks the classes with
      ``2 <= size <= max_points``; for their examples, the slot (0 or 1) in an optimal
      partition (the class's first example in slot 0). 0 for every other example.
      Duplicate points are not special: a class with one distinct point gets a
      partition of inertia 0 with both parts non-empty (the caller keeps its own
      single cluster then).
    """
    n, d = x.shape
    width = min(max_points, n)  # block size: no class can be larger than N
    sizes = jax.ops.segment_sum(jnp.ones_like(labels), labels, num_classes)
    exact = (sizes >= 2) & (sizes <= width)
    # Static bound on the number of such classes (each has >= 2 examples).
    capacity = min(num_classes, n // 2)
    if capacity == 0:
        return jnp.zeros((n,), jnp.int32), exact

    # Blocks [capacity, width] of example indices; padding (and unused rows) is `n`.
    (classes,) = jnp.nonzero(exact, size=capacity, fill_value=num_classes)
    used = classes < num_classes
    classes = jnp.minimum(classes, num_classes - 1)
    block_sizes = jnp.where(used, sizes[classes], 0)
    by_class = jnp.argsort(labels, stable=True)
    starts = (jnp.cumsum(sizes) - sizes)[classes]
    positions = starts[:, None] + jnp.arange(width)
    in_block = jnp.arange(width) < block_sizes[:, None]
    members = jnp.where(in_block, by_class[jnp.minimum(positions, n - 1)], n)

    # Indicators of A over the block's positions; position 0 is never in A.
    low_bits = (width - 1) // 2
    high_bits = width - 1 - low_bits

    def indicators(num_bits, first):
        bits = (np.arange(2**num_bits)[:, None] >> np.arange(num_bits)) & 1
        masks = np.zeros((2**num_bits, width))
        masks[:, first : first + num_bits] = bits
        return jnp.asarray(masks, x.dtype)

    low = indicators(low_bits, 1)  # [L, m]
    high = indicators(high_bits, 1 + low_bits)  # [H, m]

    def one_class(block):
        index, valid = block  # [m], [m] bool
        points = jnp.where(valid[:, None], x[jnp.minimum(index, n - 1)], 0)
        valid = valid.astype(x.dtype)
        count = jnp.maximum(jnp.sum(valid), 1)
        centred = (points - jnp.sum(points, axis=0) / count) * valid[:, None]
        gram = centred @ centred.T  # [m, m]
        low_gram = low @ gram  # [L, m]
        sq_sum_a = (
            jnp.sum(low_gram * low, axis=1)[:, None]
            + jnp.sum((high @ gram) * high, axis=1)[None, :]
            + 2 * (low_gram @ high.T)
        )  # ‖S_A‖², [L, H]
        size_a = (low @ valid)[:, None] + (high @ valid)[None, :]
        size_b = count - size_a
        inertia = jnp.where(
            (size_a > 0) & (size_b > 0),
            jnp.trace(gram) - sq_sum_a * count / jnp.maximum(size_a * size_b, 1),
            jnp.inf,
        )
        best = jnp.argmin(inertia)  # ties: the first mask
        return (low[best // high.shape[0]] + high[best % high.shape[0]]).astype(jnp.int32)  # [m]

    # Chunks of classes keep the [chunk, L, H] scores at about _CHUNK_FLOATS.
    chunk = int(min(capacity, max(1, _CHUNK_FLOATS // (2 ** (width - 1) + width * d))))
    sides = jax.lax.map(one_class, (members, in_block), batch_size=chunk)
    assignments = (
        jnp.zeros((n,), jnp.int32).at[members.reshape(-1)].set(sides.reshape(-1), mode="drop")
    )
    return assignments, exact


def _prefer_exact_two_means(
    x, labels, blocks, result: KMeansResult, *, num_classes, max_points
) -> KMeansResult:
    """Replace the k=2 result of every tiny class by its exact optimum when lower.

    :func:`_exact_two_means` gives the partition; centroids, the final assignment,
    counts and inertia are then computed as for the local-search result, and a class
    takes them only where its inertia is strictly lower. So the result is never worse,
    and a class with a single distinct point keeps its one cluster.
    """
    candidate, exact = _exact_two_means(x, labels, num_classes=num_classes, max_points=max_points)
    sums, counts = _class_sums(x, labels, candidate, num_classes, 2)
    centroids = sums / jnp.maximum(counts, 1)[..., None].astype(x.dtype)
    assignments, sq_distances = _nearest_slot(blocks, centroids, counts > 0)
    _, counts = _class_sums(x, labels, assignments, num_classes, 2)
    inertia = jax.ops.segment_sum(sq_distances, labels, num_classes)
    centroids = jnp.where(counts[..., None] > 0, centroids, 0)
    better = exact & (inertia < result.inertia)
    return result._replace(
        centroids=jnp.where(better[:, None, None], centroids, result.centroids),
        assignments=jnp.where(better[labels], assignments, result.assignments),
        counts=jnp.where(better[:, None], counts, result.counts),
        inertia=jnp.where(better, inertia, result.inertia),
    )


def _default_local_trials(k: int) -> int:
    # scikit-learn's default for greedy k-means++.
    return 2 + int(math.log(k))


def _kmeans_per_class_core(
    embeddings,
    labels,
    key,
    tolerance,
    initial_centroids,
    initial_valid,
    layout,
    *,
    k,
    num_classes,
    max_iterations,
    num_restarts,
    num_local_trials,
    refine_steps,
    exhaustive_max_points,
    num_blocks,
):
    x = embeddings.astype(_compute_dtype(embeddings.dtype))
    labels = labels.astype(jnp.int32)
    tolerance = jnp.asarray(tolerance, x.dtype)
    # k-means is translation invariant: cluster every class relative to one of its own
    # examples (the first). Distances by the expansion ‖x‖² − 2x·c + ‖c‖²
    # (`_block_sq_distances(expand=True)`) then cancel only O(spread²), not
    # O(offset²), and the
    # centroid sums carry no large common offset. A data point (rather than the class
    # mean) keeps exact duplicates of it exactly at 0. It is added back to the
    # returned centroids.
    n = x.shape[0]
    first = jax.ops.segment_min(jnp.arange(n, dtype=jnp.int32), labels, num_classes)
    offsets = jnp.where((first < n)[:, None], x[jnp.minimum(first, n - 1)], 0)
    x = x - offsets[labels]
    if layout is None:
        layout = _layout(labels, num_classes, num_blocks)
    blocks = _class_blocks(x, layout)
    initial = None
    if initial_centroids is not None:
        initial = (initial_centroids.astype(x.dtype) - offsets[:, None, :], initial_valid)
    result = _kmeans_restarts(
        x,
        labels,
        blocks,
        key,
        tolerance,
        k=k,
        num_classes=num_classes,
        max_iterations=max_iterations,
        num_restarts=num_restarts,
        num_local_trials=num_local_trials,
        refine_steps=refine_steps,
        initial=initial,
    )
    if k == 2 and exhaustive_max_points >= 2:
        result = _prefer_exact_two_means(
            x, labels, blocks, result, num_classes=num_classes, max_points=exhaustive_max_points
        )
    centroids = jnp.where(result.counts[..., None] > 0, result.centroids + offsets[:, None, :], 0)
    return result._replace(centroids=centroids)


def _kmeans_restarts(
    x,
    labels,
    blocks,
    key,
    tolerance,
    *,
    k,
    num_classes,
    max_iterations,
    num_restarts,
    num_local_trials,
    refine_steps,
    initial,
):
    run = functools.partial(
        _kmeans_single,
        x,
        labels,
        blocks,
        tolerance=tolerance,
        num_classes=num_classes,
        k=k,
        max_iterations=max_iterations,
        num_local_trials=num_local_trials,
        refine_steps=refine_steps,
        initial=initial,
    )
    if num_restarts == 1:
        return run(key)
    # Restarts run one after the other (`lax.map`), not under `jax.vmap`: on the CPU a
    # vmapped segment_sum becomes a batched scatter over a broadcast copy of the data,
    # measured 16x slower than three unbatched ones, and 3 vmapped restarts took twice
    # as long as 3 sequential ones. Sequential restarts also keep the memory at one
    # restart's working set and keep the empty-cluster `cond` a real branch.
    results = jax.lax.map(run, jax.random.split(key, num_restarts))
    # Best restart per class, by that class's inertia.
    best = jnp.argmin(results.inertia, axis=0)  # [C]
    classes = jnp.arange(num_classes)
    return KMeansResult(
        centroids=results.centroids[best, classes],
        assignments=results.assignments[best[labels], jnp.arange(x.shape[0])],
        counts=results.counts[best, classes],
        inertia=results.inertia[best, classes],
        iterations=jnp.max(results.iterations),
        converged=jnp.all(results.converged),
    )


def _kmeans_groups_core(
    embeddings,
    rows,
    labels,
    layouts,
    keys,
    classes,
    tolerance,
    initial_centroids,
    initial_valid,
    *,
    k,
    num_blocks,
    **options,
):
    """:func:`_kmeans_per_class_core` on every group of classes in turn (``lax.map``).

    Args: ``embeddings [N, d]``; the groups' ``rows``, ``labels``, ``layouts`` and
    ``classes`` (``[G, ...]``, see :class:`_Groups`); ``keys`` ``[G]``, one per group.

    Returns:
      A :class:`KMeansResult` per group, stacked ``[G, ...]``, in group slot and row
      order.
    """
    n = embeddings.shape[0]
    inputs = {
        "rows": rows,
        "labels": labels,
        "layout": layouts,
        "key": keys,
    }
    if initial_centroids is not None:
        # Unused slots and the padding class start from one valid zero centroid.
        used = (classes < initial_centroids.shape[0])[..., None]
        last = jnp.minimum(classes, initial_centroids.shape[0] - 1)
        inputs["initial_centroids"] = jnp.where(used[..., None], initial_centroids[last], 0)
        inputs["initial_valid"] = jnp.where(used, initial_valid[last], jnp.arange(k) == 0)

    def one_group(group):
        # Gathered group by group, not all at once: the group's rows are read into the
        # cache where its passes use them, and no [G, R, d] copy is written.
        rows = group["rows"]
        x = jnp.where((rows < n)[:, None], embeddings[jnp.minimum(rows, n - 1)], 0)
        return _kmeans_per_class_core(
            x,
            group["labels"],
            group["key"],
            tolerance,
            group.get("initial_centroids"),
            group.get("initial_valid"),
            group["layout"],
            k=k,
            num_classes=classes.shape[1],
            num_blocks=num_blocks,
            **options,
        )

    return jax.lax.map(one_group, inputs)


# The static arguments of the jitted k-means calls (besides ``num_classes``).
_STATIC_OPTIONS = (
    "k",
    "max_iterations",
    "num_restarts",
    "num_local_trials",
    "refine_steps",
    "exhaustive_max_points",
    "num_blocks",
)

_kmeans_groups_jit = jax.jit(_kmeans_groups_core, static_argnames=_STATIC_OPTIONS)


@jax.jit
def _ungroup(parts, class_group, class_slot, example_group, example_row):
    """The results of the parts (each ``[G_p, ...]``, groups in order) in class and
    example order."""
    results = jax.tree.map(lambda *fields: jnp.concatenate(fields), *parts)
    by_class = (class_group, class_slot)
    return KMeansResult(
        centroids=results.centroids[by_class],
        assignments=results.assignments[example_group, example_row],
        counts=results.counts[by_class],
        inertia=results.inertia[by_class],
        iterations=jnp.max(results.iterations),
        converged=jnp.all(results.converged),
    )


def _on_cpu(array) -> bool:
    """Whether ``array`` is concrete data on this process's CPU devices only (calls from
    several threads must not hold collectives that other processes join in another
    order)."""
    if not is_concrete(array) or not array.is_fully_addressable:
        return False
    return all(device.platform == "cpu" for device in array.devices())


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _kmeans_in_groups(
    embeddings, key, tolerance, initial_centroids, initial_valid, groups: _Groups, *, k, options
) -> KMeansResult:
    """Clusters the groups of :class:`_Groups` on the CPU, each of its parts one call of
    :func:`_kmeans_groups_core` from its own thread: XLA:CPU runs calls from different
    threads at the same time, while one call's groups run one after another. The parts
    have equal shapes, so one program serves them all; every group draws with its own
    key whatever the number of parts (the empty padding groups reuse the first)."""
    per_part = groups.rows.shape[0] // groups.num_parts
    keys = jax.random.split(key, groups.num_groups)
    extra = groups.rows.shape[0] - groups.num_groups
    if extra:
        keys = jnp.concatenate([keys, jnp.repeat(keys[:1], extra, axis=0)])

    def part(index):
        window = slice(index * per_part, (index + 1) * per_part)
        return jax.block_until_ready(
            _kmeans_groups_jit(
                embeddings,
                groups.rows[window],
                groups.labels[window],
                _Layout(*(field[window] for field in groups.layouts)),
                keys[window],
                groups.classes[window],
                tolerance,
                initial_centroids,
                initial_valid,
                k=k,
                num_blocks=groups.num_blocks,
                **options,
            )
        )

    if groups.num_parts == 1:
        parts = [part(0)]
    else:
        with concurrent.futures.ThreadPoolExecutor(groups.num_parts) as pool:
            parts = list(pool.map(part, range(groups.num_parts)))
    return _ungroup(
        parts, groups.class_group, groups.class_slot, groups.example_group, groups.example_row
    )


_kmeans_per_class_jit = jax.jit(
    _kmeans_per_class_core, static_argnames=_STATIC_OPTIONS + ("num_classes",)
)


def kmeans_per_class(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    k: int,
    *,
    key: jax.Array,
    num_classes: int | None = None,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
    num_restarts: int = 1,
    num_local_trials: int | None = None,
    refine_steps: int = 5,
    exhaustive_max_points: int = 12,
    initial_centroids: jax.typing.ArrayLike | None = None,
    initial_valid: jax.typing.ArrayLike | None = None,
) -> KMeansResult:
    """k-means (k-means++ initialisation) inside every class, all classes at once.

    Every class ``c`` is clustered independently into at most ``k`` clusters,
    minimising its inertia

    .. math::
       \\sum_{i : y_i = c} \\min_j \\lVert r_i - \\mu^c_j \\rVert^2 ,

    in one jitted computation over flat arrays (no Python loop over classes, no padding
    of classes to a common size; memory O(N·d + C·k·d)). On the CPU, with concrete
    labels and much data, groups of classes that fit in a core's cache are clustered one
    after another instead, one sequence of groups per core (see the module docstring).
    See the module docstring for the empty-cluster policy: a class with fewer than ``k``
    distinct points leaves the extra slots empty (``counts == 0``, centroid zeros).

    Args:
      embeddings: ``[N, d]`` float examples.
      labels: ``[N]`` int class of every example, in ``[0, num_classes)``.
      k: clusters per class (static).
      key: PRNG key for the k-means++ draws.
      num_classes: number of classes ``C`` (static). ``None`` computes
        ``labels.max() + 1`` from concrete labels, which must then be at most ``N``
        (labels such as ``{0, 2·10⁸}`` would allocate ``[2·10⁸, k, d]`` centroids for
        absent classes: remap them to ``0..C−1`` first, e.g. with
        ``np.unique(labels, return_inverse=True)``); under ``jax.jit`` it must be
        given. Classes without examples get only empty slots.
      max_iterations: most Lloyd iterations per restart (static).
      tolerance: a class has converged when its squared centroid shift is at most
        ``tolerance`` times its mean per-dimension variance (scikit-learn's ``tol``),
        or when its assignments no longer change.
      num_restarts: independent k-means++ initialisations (split keys, run one after
        the other with ``lax.map``); every class keeps the restart with its lowest
        inertia (static).
      num_local_trials: candidates per greedy k-means++ round (static); ``None`` uses
        scikit-learn's ``2 + int(log(k))``; 1 is plain k-means++.
      refine_steps: after Lloyd, at most this many steps of Hartigan moves (points moved
        to another cluster of their class while that lowers the inertia; see the module
        docstring; static). Only ever lowers the inertia; each step costs about one
        Lloyd iteration, and the steps stop early once no class can improve. 0 is
        scikit-learn's plain Lloyd.
      exhaustive_max_points: with ``k == 2``, every class of 2 to this many examples
        gets its exact optimal partition: all ``2^(n−1)`` two-part partitions are
        scored (sufficient statistics, in the same jitted call; see the module
        docstring) and the optimum replaces the local-search result where it is lower.
        Cost ``O(C · 2^(m−1))`` for ``m`` = this value, whatever the class sizes (static;
        0 to 20; 0 or 1 turns it off; ignored for ``k != 2``).
      initial_centroids: ``[C, k, d]`` centroids to start Lloyd from instead of
        k-means++ (a warm start, e.g. the previous refresh's centroids of a slowly
        moving embedding, which then needs few iterations); ``key`` is unused and
        ``num_restarts`` must be 1.
      initial_valid: ``[C, k]`` bool, which slots of ``initial_centroids`` exist
        (e.g. ``counts > 0``; default all). The others start empty and are re-seeded
        on the farthest examples of their class, as a cluster that empties during
        Lloyd is.

    Returns:
      A :class:`KMeansResult`: ``centroids [C, k, d]``, ``assignments [N]`` (slot within
      the class), ``counts [C, k]``, ``inertia [C]``, ``iterations []``,
      ``converged []``.

    Raises:
      ValueError: on wrong ranks or shapes, non-integer or out-of-range labels, or
        hyperparameters out of range.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.array([[0., 0.], [0., 1.], [9., 9.], [5., 5.]])
      >>> y = jnp.array([0, 0, 0, 1])
      >>> result = kmeans_per_class(x, y, 2, key=jax.random.key(0))
      >>> sorted(result.counts[0].tolist()), sorted(result.counts[1].tolist())
      ([1, 2], [0, 1])

    References:
      Rippel, Paluri, Dollar, Bourdev, "Metric Learning with Adaptive Density
      Discrimination", ICLR 2016. Arthur & Vassilvitskii, "k-means++: the advantages of
      careful seeding", SODA 2007.
    """
    embeddings = jnp.asarray(embeddings)
    labels = jnp.asarray(labels)
    _check_embeddings_labels(embeddings, labels)
    if not jnp.issubdtype(embeddings.dtype, jnp.floating):
        raise ValueError(f"embeddings must be floating point, got dtype {embeddings.dtype}.")
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings has no examples (N = 0).")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}.")
    if not isinstance(max_iterations, (int, np.integer)) or max_iterations < 1:
        raise ValueError(f"max_iterations must be an integer >= 1, got {max_iterations!r}.")
    if not isinstance(num_restarts, (int, np.integer)) or num_restarts < 1:
        raise ValueError(f"num_restarts must be an integer >= 1, got {num_restarts!r}.")
    if num_local_trials is None:
        num_local_trials = _default_local_trials(int(k))
    if not isinstance(num_local_trials, (int, np.integer)) or num_local_trials < 1:
        raise ValueError(f"num_local_trials must be an integer >= 1, got {num_local_trials!r}.")
    if not isinstance(refine_steps, (int, np.integer)) or refine_steps < 0:
        raise ValueError(f"refine_steps must be an integer >= 0, got {refine_steps!r}.")
    if (
        not isinstance(exhaustive_max_points, (int, np.integer))
        or not 0 <= exhaustive_max_points <= _EXHAUSTIVE_MAX_POINTS_LIMIT
    ):
        raise ValueError(
            f"exhaustive_max_points must be an integer in [0, "
            f"{_EXHAUSTIVE_MAX_POINTS_LIMIT}], got {exhaustive_max_points!r}."
        )
    if is_concrete(tolerance) and not float(tolerance) >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}.")

    labels_concrete = is_concrete(labels)
    if labels_concrete:
        labels_host = np.asarray(labels)
        low, high = int(labels_host.min()), int(labels_host.max())
        if low < 0:
            raise ValueError(f"labels must be >= 0, got a minimum of {low}.")
    if num_classes is None:
        if not labels_concrete:
            raise ValueError(
                "num_classes must be given when labels are traced "
                "(e.g. under jax.jit): it fixes the output shape [C, k, d]."
            )
        num_classes = high + 1
        if num_classes > labels.shape[0]:
            raise ValueError(
                f"labels reach {high} with only N={labels.shape[0]} examples: without "
                "num_classes the result has labels.max() + 1 classes, most of them "
                "absent. Remap the labels to 0..C-1 (np.unique(labels, "
                "return_inverse=True)) or pass num_classes."
            )
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}.")
    if labels_concrete and high >= num_classes:
        raise ValueError(f"labels must be < num_classes = {num_classes}, got a maximum of {high}.")
    if initial_centroids is not None:
        initial_centroids = jnp.asarray(initial_centroids)
        expected = (int(num_classes), int(k), embeddings.shape[1])
        if initial_centroids.shape != expected:
            raise ValueError(
                f"initial_centroids must be [C, k, d] = {expected}, got shape "
                f"{tuple(initial_centroids.shape)}."
            )
        if num_restarts != 1:
            raise ValueError(
                f"num_restarts must be 1 with initial_centroids (a warm start draws "
                f"nothing), got {num_restarts}."
            )
        if initial_valid is None:
            initial_valid = jnp.ones(expected[:2], bool)
        initial_valid = jnp.asarray(initial_valid)
        if initial_valid.shape != expected[:2]:
            raise ValueError(
                f"initial_valid must be [C, k] = {expected[:2]}, got shape "
                f"{tuple(initial_valid.shape)}."
            )
        initial_valid = initial_valid.astype(bool)
    elif initial_valid is not None:
        raise ValueError("initial_valid needs initial_centroids.")

    options = dict(
        max_iterations=int(max_iterations),
        num_restarts=int(num_restarts),
        num_local_trials=int(num_local_trials),
        refine_steps=int(refine_steps),
        exhaustive_max_points=int(exhaustive_max_points),
    )
    # Groups of classes only pay on the CPU (a GPU runs all classes at once in parallel),
    # and need concrete data of this process to be run from several threads.
    groups = (
        _cached_groups(labels_host, int(num_classes), embeddings.shape[1], _available_cpus())
        if labels_concrete and _on_cpu(embeddings)
        else None
    )
    if groups is not None:
        return _kmeans_in_groups(
            embeddings,
            key,
            tolerance,
            initial_centroids,
            initial_valid,
            groups,
            k=int(k),
            options=options,
        )
    num_blocks = _num_blocks(labels_host, int(num_classes)) if labels_concrete else None
    return _kmeans_per_class_jit(
        embeddings,
        labels,
        key,
        tolerance,
        initial_centroids,
        initial_valid,
        # Concrete labels: the layout is computed on the host and passed in; traced
        # labels get it inside the jitted call (the same integers).
        _layout_host(labels_host, int(num_classes), num_blocks) if labels_concrete else None,
        k=int(k),
        num_classes=int(num_classes),
        num_blocks=num_blocks,
        **options,
    )
