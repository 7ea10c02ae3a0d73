"""On-device sampling of examples by group: the batches of metric learning.

Everything here is label-agnostic: a *group* is any partition of the training examples
(classes for P×K batches of triplet/pair losses, flat cluster ids ``c * K + k`` for the
Magnet loss's neighbourhoods, pseudo-labels in label-free training). A
:class:`GroupTable` sorts the example indices by group once, so that drawing D examples
from a group costs O(D²) per step whatever the group's size, inside a jitted step, with
no host round trip.

The neighbourhood sampler of the Magnet loss lives in :mod:`magnet_jax.index`, next to
the cluster index it reads.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from magnet_jax._checks import check_integer_vector, concrete

__all__ = [
    "GroupTable",
    "ClassBalancedBatch",
    "group_table",
    "sample_from_groups",
    "class_balanced_batch",
    "uniform_batch",
]


class GroupTable(NamedTuple):
    """Example indices sorted by group, for O(1)-lookup sampling (a pytree).

    Group ``g`` holds the examples ``members[offsets[g] : offsets[g] + counts[g]]``.

    Attributes:
        members: [N] int32, example indices sorted by group id (stable, so ascending inside
            a group). Examples with a negative group id ("unassigned") come last.
        offsets: [G] int32, start of each group in ``members``.
        counts: [G] int32, size of each group (0 = empty).
    """

    members: jax.Array
    offsets: jax.Array
    counts: jax.Array

    @property
    def num_groups(self) -> int:
        return self.counts.shape[0]


class ClassBalancedBatch(NamedTuple):
    """A P×K batch: P distinct classes, K examples each (unpacks as ``indices, labels``).

    Attributes:
        indices: [P * K] int32, example indices; the K examples of a class are adjacent.
        labels: [P * K] int32, the class (group id) of each example.
    """

    indices: jax.Array
    labels: jax.Array


def group_table(group_ids: jax.typing.ArrayLike, *, num_groups: int) -> GroupTable:
    """Sorts the examples by group for :func:`sample_from_groups`.

    Args:
        group_ids: [N] int, the group of every example, in ``[0, num_groups)``. A negative id
            means "in no group" (e.g. an example no cluster claims); such examples are never
            sampled.
        num_groups: G, the number of groups (static). Groups without examples are allowed
            and get ``counts == 0``.

    Returns:
        A :class:`GroupTable` with ``members`` [N], ``offsets`` [G] and ``counts`` [G].

    Raises:
        ValueError: if ``group_ids`` is not an integer vector, ``num_groups < 1``, or (when
            ``group_ids`` is concrete) an id is ``>= num_groups``. Under tracing such ids are
            treated as "in no group".

    Example:
        >>> table = group_table(jnp.array([2, 0, 2, 1]), num_groups=3)
        >>> table.members.tolist(), table.offsets.tolist(), table.counts.tolist()
        ([1, 3, 0, 2], [0, 1, 2], [1, 1, 2])
    """
    check_integer_vector("group_ids", group_ids)
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    concrete_ids = concrete(group_ids)
    if concrete_ids is not None and concrete_ids.size and concrete_ids.max() >= num_groups:
        raise ValueError(
            f"group_ids must be < num_groups={num_groups}, got max id {concrete_ids.max()}"
        )
    return _group_table(jnp.asarray(group_ids), num_groups=num_groups)


@partial(jax.jit, static_argnames="num_groups")
def _group_table(group_ids: jax.Array, *, num_groups: int) -> GroupTable:
    in_a_group = (group_ids >= 0) & (group_ids < num_groups)
    # The sort key puts examples in no group after every real group.
    sort_key = jnp.where(in_a_group, group_ids, num_groups).astype(jnp.int32)
    members = jnp.argsort(sort_key, stable=True).astype(jnp.int32)
    counts = jax.ops.segment_sum(
        in_a_group.astype(jnp.int32), sort_key, num_segments=num_groups + 1
    )[:num_groups]
    offsets = (jnp.cumsum(counts) - counts).astype(jnp.int32)
    return GroupTable(members=members, offsets=offsets, counts=counts.astype(jnp.int32))


def _sample_positions(key: jax.Array, sizes: jax.Array, per_group: int) -> jax.Array:
    """D positions in ``[0, size)`` for every size: distinct when ``size >= D``.

    Without replacement this is Floyd's algorithm, run for all groups at once: for
    ``j = n - D, ..., n - 1`` draw ``t`` uniform in ``[0, j]`` and keep ``t``, or ``j`` if
    ``t`` was already kept. That yields a uniform D-subset in O(D²) for a *traced* n. The
    D slots are then shuffled so that every slot on its own is uniform too.

    Args:
        key: a PRNG key.
        sizes: [G] int, the group sizes (may be traced).
        per_group: D (static).

    Returns:
        [G, D] int32 positions; 0 for groups of size 0.
    """
    num_groups = sizes.shape[0]
    sizes = sizes.astype(jnp.int32)
    # One call for all the random bits: a single threefry site compiles much faster than
    # one per draw. A uniform integer in [0, m) is bits % m, whose bias (at most m / 2**32
    # relative) is immaterial for group sizes below many millions.
    floyd_bits, shuffle_bits, replacement_bits = jax.random.bits(
        key, (3, num_groups, per_group), jnp.uint32
    )
    slots = jnp.arange(per_group)

    def uniform_below(bits, bound):
        return (bits % jnp.maximum(bound, 1).astype(jnp.uint32)).astype(jnp.int32)

    def floyd_step(step, chosen):
        candidate_max = sizes - per_group + step  # j in the algorithm
        drawn = uniform_below(floyd_bits[:, step], candidate_max + 1)
        already_kept = jnp.any((chosen == drawn[:, None]) & (slots < step)[None, :], axis=1)
        return chosen.at[:, step].set(jnp.where(already_kept, candidate_max, drawn))

    chosen = jax.lax.fori_loop(
        0, per_group, floyd_step, jnp.zeros((num_groups, per_group), jnp.int32)
    )
    shuffle = jnp.argsort(shuffle_bits, axis=1)
    without_replacement = jnp.take_along_axis(chosen, shuffle, axis=1)
    with_replacement = uniform_below(replacement_bits, sizes[:, None])
    big_enough = (sizes >= per_group)[:, None]
    return jnp.where(big_enough, without_replacement, with_replacement).astype(jnp.int32)


def sample_from_groups(
    table: GroupTable,
    groups: jax.typing.ArrayLike,
    key: jax.Array,
    *,
    per_group: int,
) -> jax.Array:
    """Draws D examples uniformly from each requested group.

    Without replacement from a group with at least D members (every D-subset equally
    likely, every slot uniform over the group); with replacement from a smaller one, so a
    group of one example gives that example D times. Cost O(D²) per group, independent of
    the group's size; jittable with traced ``groups`` and ``table``.

    Args:
        table: a :class:`GroupTable` over G groups.
        groups: [S] int, the groups to draw from (repeats are drawn independently).
        key: a PRNG key.
        per_group: D >= 1 (static).

    Returns:
        [S, D] int32 example indices; row s holds examples of ``groups[s]``. A group that is
        empty or outside ``[0, G)`` gives -1 (never happens when sampling valid groups).

    Raises:
        ValueError: if ``per_group < 1`` or ``groups`` is not an integer vector.
    """
    if per_group < 1:
        raise ValueError(f"per_group must be >= 1, got {per_group}")
    check_integer_vector("groups", groups)
    return _sample_from_groups(table, jnp.asarray(groups), key, per_group=per_group)


@partial(jax.jit, static_argnames="per_group")
def _sample_from_groups(
    table: GroupTable, groups: jax.Array, key: jax.Array, *, per_group: int
) -> jax.Array:
    in_range = (groups >= 0) & (groups < table.num_groups)
    safe_groups = jnp.where(in_range, groups, 0)
    sizes = jnp.where(in_range, table.counts[safe_groups], 0)
    positions = _sample_positions(key, sizes, per_group)
    examples = table.members[table.offsets[safe_groups][:, None] + positions]
    return jnp.where((sizes > 0)[:, None], examples, -1).astype(jnp.int32)


def class_balanced_batch(
    table: GroupTable,
    key: jax.Array,
    *,
    classes_per_batch: int,
    examples_per_class: int,
) -> ClassBalancedBatch:
    """A P×K batch: P distinct non-empty classes uniformly at random, K examples each.

    The classes are a uniform random P-subset of the non-empty groups of ``table`` (in
    random order); the examples of each class are drawn by :func:`sample_from_groups`
    (without replacement when the class has at least K examples).

    Args:
        table: a :class:`GroupTable` over the classes (``group_table(labels, ...)``).
        key: a PRNG key.
        classes_per_batch: P >= 1 (static).
        examples_per_class: K >= 1 (static).

    Returns:
        A :class:`ClassBalancedBatch` of ``indices`` [P*K] and ``labels`` [P*K].

    Raises:
        ValueError: if P or K < 1, P > G, or (for a concrete table) P exceeds the number of
            non-empty classes. For a traced table that check is skipped, and the
            classes beyond the non-empty ones give indices -1.

    Example:
        >>> table = group_table(labels, num_groups=10)
        >>> indices, batch_labels = class_balanced_batch(
        ...     table, key, classes_per_batch=8, examples_per_class=4)
    """
    if classes_per_batch < 1:
        raise ValueError(f"classes_per_batch must be >= 1, got {classes_per_batch}")
    if examples_per_class < 1:
        raise ValueError(f"examples_per_class must be >= 1, got {examples_per_class}")
    if classes_per_batch > table.num_groups:
        raise ValueError(
            f"classes_per_batch={classes_per_batch} exceeds the number of classes "
            f"{table.num_groups}"
        )
    concrete_counts = concrete(table.counts)
    if concrete_counts is not None:
        non_empty = int((concrete_counts > 0).sum())
        if classes_per_batch > non_empty:
            raise ValueError(
                f"classes_per_batch={classes_per_batch} exceeds the number of non-empty "
                f"classes {non_empty} (of {table.num_groups})"
            )
    return _class_balanced_batch(
        table,
        key,
        classes_per_batch=classes_per_batch,
        examples_per_class=examples_per_class,
    )


@partial(jax.jit, static_argnames=("classes_per_batch", "examples_per_class"))
def _class_balanced_batch(
    table: GroupTable, key: jax.Array, *, classes_per_batch: int, examples_per_class: int
) -> ClassBalancedBatch:
    class_key, example_key = jax.random.split(key)
    # Top P of i.i.d. uniform scores is a uniform random P-subset; empty classes score
    # below every non-empty one.
    scores = jax.random.uniform(class_key, (table.num_groups,))
    scores = jnp.where(table.counts > 0, scores, -1.0)
    _, classes = jax.lax.top_k(scores, classes_per_batch)
    classes = classes.astype(jnp.int32)
    indices = _sample_from_groups(table, classes, example_key, per_group=examples_per_class)
    labels = jnp.repeat(classes, examples_per_class, total_repeat_length=indices.size)
    return ClassBalancedBatch(indices=indices.reshape(-1), labels=labels)


def uniform_batch(
    key: jax.Array, num_examples: int | jax.typing.ArrayLike, *, batch_size: int
) -> jax.Array:
    """``batch_size`` example indices uniformly from ``[0, num_examples)``.

    Distinct when ``batch_size <= num_examples`` (Floyd's algorithm, O(batch_size²), so
    no O(N) permutation per step), with replacement otherwise.

    Args:
        key: a PRNG key.
        num_examples: N, the dataset size (an int or a scalar array, may be traced).
        batch_size: B >= 1 (static).

    Returns:
        [B] int32 example indices.

    Raises:
        ValueError: if ``batch_size < 1`` or (concrete) ``num_examples < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    concrete_size = concrete(num_examples)
    if concrete_size is not None:
        if concrete_size.shape != ():
            raise ValueError(f"num_examples must be a scalar, got shape {concrete_size.shape}")
        if concrete_size < 1:
            raise ValueError(f"num_examples must be >= 1, got {concrete_size}")
    return _uniform_batch(key, jnp.asarray(num_examples, jnp.int32), batch_size=batch_size)


@partial(jax.jit, static_argnames="batch_size")
def _uniform_batch(key: jax.Array, num_examples: jax.Array, *, batch_size: int) -> jax.Array:
    return _sample_positions(key, num_examples.reshape(1), batch_size)[0]
