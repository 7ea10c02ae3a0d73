"""Tests for magnet_jax.sampling: group tables, per-group draws, P×K and uniform batches."""

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from magnet_jax.sampling import (
    GroupTable,
    class_balanced_batch,
    group_table,
    sample_from_groups,
    uniform_batch,
)

# Chi-square tests run at fixed keys, so they are deterministic; the threshold only
# guards against a biased sampler, which gives p-values many orders smaller.
P_VALUE_FLOOR = 1e-3


def _keys(count, seed=0):
    return jax.random.split(jax.random.key(seed), count)


def _draws(sample, count, seed, *arguments):
    """``sample(key, *arguments)`` for ``count`` keys at once, in one compiled call, with
    the arguments traced (not baked in as constants)."""
    in_axes = (0,) + (None,) * len(arguments)
    return jax.jit(jax.vmap(sample, in_axes=in_axes))(_keys(count, seed), *arguments)


@pytest.fixture(scope="module")
def group_ids():
    # Group sizes: 0 -> 7, 1 -> 0 (empty), 2 -> 1, 3 -> 3, 4 -> 12; two unassigned (-1).
    sizes = {0: 7, 2: 1, 3: 3, 4: 12}
    ids = np.concatenate([np.full(size, group) for group, size in sizes.items()] + [[-1, -1]])
    return np.random.default_rng(0).permutation(ids).astype(np.int32)


@pytest.fixture(scope="module")
def table(group_ids):
    return group_table(group_ids, num_groups=5)


def test_group_table_matches_numpy(group_ids, table):
    assert isinstance(table, GroupTable)
    assert table.members.shape == (group_ids.size,) and table.members.dtype == jnp.int32
    np.testing.assert_array_equal(table.counts, np.bincount(group_ids[group_ids >= 0], minlength=5))
    np.testing.assert_array_equal(
        table.offsets, np.concatenate([[0], np.cumsum(table.counts)[:-1]])
    )
    members = np.asarray(table.members)
    for group in range(5):
        start, count = int(table.offsets[group]), int(table.counts[group])
        np.testing.assert_array_equal(
            members[start : start + count], np.flatnonzero(group_ids == group)
        )
    # Unassigned examples come last.
    np.testing.assert_array_equal(np.sort(members[-2:]), np.flatnonzero(group_ids == -1))


def test_group_table_docstring_example():
    table = group_table(jnp.array([2, 0, 2, 1]), num_groups=3)
    assert table.members.tolist() == [1, 3, 0, 2]
    assert table.offsets.tolist() == [0, 1, 2]
    assert table.counts.tolist() == [1, 1, 2]


def test_group_table_under_jit(group_ids, table):
    jitted = jax.jit(partial(group_table, num_groups=5))(group_ids)
    jax.tree.map(np.testing.assert_array_equal, jitted, table)


GROUPS = [0, 1, 2, 3, 4, 4, 7, -3]  # sizes 7, 0, 1, 3, 12, 12, out of range, out of range
PER_GROUP = 4
NUM_DRAWS = 20_000


@pytest.fixture(scope="module")
def group_draws(table):
    """[NUM_DRAWS, len(GROUPS), PER_GROUP] draws, sampled under jit + vmap with the
    table and the groups traced."""
    sample = partial(sample_from_groups, per_group=PER_GROUP)
    draws = _draws(
        lambda key, table, groups: sample(table, groups, key),
        NUM_DRAWS,
        1,
        table,
        jnp.array(GROUPS, jnp.int32),
    )
    return np.asarray(draws)


def test_sample_from_groups_membership_and_replacement(group_ids, table, group_draws):
    assert group_draws.shape == (NUM_DRAWS, len(GROUPS), PER_GROUP)
    assert group_draws.dtype == np.int32
    for row, group in enumerate(GROUPS):
        drawn = group_draws[:, row]
        if group in (1, 7, -3):  # empty or out of range
            assert (drawn == -1).all()
            continue
        assert (group_ids[drawn] == group).all()
        size = int(table.counts[group])
        distinct = np.array([len(set(draw)) for draw in drawn[:2000]])
        if size >= PER_GROUP:
            assert (distinct == PER_GROUP).all(), "must draw without replacement"
        elif size == 1:
            assert (distinct == 1).all()
        else:  # 3 members, 4 draws: with replacement, every member seen
            assert set(drawn.ravel()) == set(np.flatnonzero(group_ids == group))
    # The two rows of group 4 are independent draws.
    assert (group_draws[:, 4] != group_draws[:, 5]).any()
    # Eager calls agree with the jitted, vmapped ones.
    np.testing.assert_array_equal(
        sample_from_groups(
            table, jnp.array(GROUPS, jnp.int32), _keys(NUM_DRAWS, 1)[0], per_group=PER_GROUP
        ),
        group_draws[0],
    )


def test_sample_from_groups_uniform_subsets_and_slots(group_ids, group_draws):
    # Group 0 has 7 members; draws of 4 must hit all 35 subsets equally often and every
    # slot must be uniform over the members on its own.
    samples = group_draws[:, 0]
    members = np.flatnonzero(group_ids == 0)
    subsets = {subset: i for i, subset in enumerate(itertools.combinations(members, PER_GROUP))}
    subset_counts = np.bincount(
        [subsets[tuple(sorted(draw))] for draw in samples], minlength=len(subsets)
    )
    assert stats.chisquare(subset_counts).pvalue > P_VALUE_FLOOR
    position = np.zeros(group_ids.size, np.int64)
    position[members] = np.arange(members.size)
    for slot in range(PER_GROUP):
        slot_counts = np.bincount(position[samples[:, slot]], minlength=len(members))
        assert stats.chisquare(slot_counts).pvalue > P_VALUE_FLOOR


def test_sample_from_groups_with_replacement_is_uniform(group_ids, group_draws):
    # Group 3 has 3 members < 4 draws: independent uniform draws.
    samples = group_draws[:, 3]
    members = np.flatnonzero(group_ids == 3)
    counts = np.array([(samples == m).sum() for m in members])
    assert counts.sum() == samples.size
    assert stats.chisquare(counts).pvalue > P_VALUE_FLOOR
    # Group 4 (12 members): uniform over members too.
    counts = np.bincount(group_draws[:, 4].ravel(), minlength=group_ids.size)[group_ids == 4]
    assert stats.chisquare(counts).pvalue > P_VALUE_FLOOR


def test_class_balanced_batch(group_ids, table):
    sample = partial(class_balanced_batch, classes_per_batch=3, examples_per_class=2)
    batches = _draws(lambda key, table: sample(table, key), 6000, 4, table)
    indices, labels = np.asarray(batches.indices), np.asarray(batches.labels)
    assert indices.shape == labels.shape == (6000, 6)
    np.testing.assert_array_equal(group_ids[indices], labels)
    classes = labels[:, ::2]
    np.testing.assert_array_equal(labels[:, 1::2], classes)
    assert all(len(set(row)) == 3 for row in classes), "classes must be distinct"
    assert not np.isin(classes, [1]).any(), "empty class drawn"
    # Every one of the 4 non-empty classes is in a batch with probability 3/4.
    class_counts = np.bincount(classes.ravel(), minlength=5)[[0, 2, 3, 4]]
    assert stats.chisquare(class_counts).pvalue > P_VALUE_FLOOR
    # Class 2 has a single example, drawn twice.
    rows, columns = np.nonzero(classes == 2)
    assert (indices[rows, 2 * columns] == indices[rows, 2 * columns + 1]).all()
    # Unpacks as (indices, labels).
    indices, labels = batches
    assert indices.shape == (6000, 6)


def test_uniform_batch():
    # Dataset size traced.
    samples = np.asarray(
        _draws(lambda key, size: uniform_batch(key, size, batch_size=4), 5000, 6, jnp.int32(10))
    )
    assert samples.shape == (5000, 4) and samples.dtype == np.int32
    assert ((samples >= 0) & (samples < 10)).all()
    assert all(len(set(row)) == 4 for row in samples)
    assert stats.chisquare(np.bincount(samples.ravel(), minlength=10)).pvalue > P_VALUE_FLOOR
    # More than the dataset: with replacement.
    oversized = np.asarray(uniform_batch(jax.random.key(0), 3, batch_size=12))
    assert set(oversized.tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: group_table(np.zeros((2, 2), np.int32), num_groups=3), "vector"),
        (lambda t: group_table(np.zeros(4, np.float32), num_groups=3), "integer dtype"),
        (lambda t: group_table(np.array([0, 3]), num_groups=3), "num_groups=3"),
        (lambda t: group_table(np.array([0]), num_groups=0), "num_groups must be >= 1"),
        (
            lambda t: sample_from_groups(t, jnp.array([0]), jax.random.key(0), per_group=0),
            "per_group",
        ),
        (
            lambda t: sample_from_groups(t, jnp.array([0.0]), jax.random.key(0), per_group=2),
            "integer dtype",
        ),
        (
            lambda t: class_balanced_batch(
                t, jax.random.key(0), classes_per_batch=0, examples_per_class=2
            ),
            "classes_per_batch",
        ),
        (
            lambda t: class_balanced_batch(
                t, jax.random.key(0), classes_per_batch=2, examples_per_class=0
            ),
            "examples_per_class",
        ),
        (
            lambda t: class_balanced_batch(
                t, jax.random.key(0), classes_per_batch=6, examples_per_class=2
            ),
            "number of classes 5",
        ),
        (
            lambda t: class_balanced_batch(
                t, jax.random.key(0), classes_per_batch=5, examples_per_class=2
            ),
            "non-empty classes 4",
        ),
        (lambda t: uniform_batch(jax.random.key(0), 10, batch_size=0), "batch_size"),
        (lambda t: uniform_batch(jax.random.key(0), 0, batch_size=2), "num_examples"),
    ],
)
def test_errors(table, call, message):
    with pytest.raises(ValueError, match=message):
        call(table)
