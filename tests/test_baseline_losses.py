"""Tests of the baseline losses: triplet, contrastive, multi-similarity, ProxyNCA,
normalised softmax, ArcFace, and the shared distance helpers.

Every loss gets a hand-computed value, an independent NumPy (float64, loops) reference on
random data, a gradient check in float64, jit == eager, vmap, degenerate batches, and an
optional comparison with pytorch-metric-learning (skipped when it is not installed).
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from magnet_jax.losses.distances import pairwise_distances
from magnet_jax.losses.pairs import (
    contrastive_loss,
    multi_similarity_loss,
    multi_similarity_miner,
)
from magnet_jax.losses.proxies import arcface_loss, normalized_softmax_loss, proxy_nca_loss
from magnet_jax.losses.triplet import triplet_loss

MININGS = ("batch_all", "batch_hard", "semi_hard")


@functools.cache
def _compiled(fn, hyperparameters):
    return jax.jit(functools.partial(fn, **dict(hyperparameters)))


def jitted(fn):
    """``fn`` under ``jax.jit``, hyperparameters static: one compilation per configuration.

    Eager execution compiles every primitive separately, which is what made this file slow;
    ``jit == eager`` is tested once per loss below.
    """

    @functools.wraps(fn)
    def call(*arrays, **hyperparameters):
        return _compiled(fn, tuple(sorted(hyperparameters.items())))(*arrays)

    return call


j_triplet_loss = jitted(triplet_loss)
j_contrastive_loss = jitted(contrastive_loss)
j_multi_similarity_loss = jitted(multi_similarity_loss)
j_multi_similarity_miner = jitted(multi_similarity_miner)
j_proxy_nca_loss = jitted(proxy_nca_loss)
j_normalized_softmax_loss = jitted(normalized_softmax_loss)
j_arcface_loss = jitted(arcface_loss)


# --------------------------------------------------------------------------------------
# NumPy references: float64, explicit loops, written from the papers' definitions.
# --------------------------------------------------------------------------------------


def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_dist(x, i, j, squared):
    sq = float(np.sum((x[i] - x[j]) ** 2))
    return sq if squared else math.sqrt(sq)


def np_triplet(x, y, *, margin, mining, squared, normalize):
    x = np.asarray(x, np.float64)
    if normalize:
        x = np_normalize(x)
    n = len(y)
    d = [[np_dist(x, i, j, squared) for j in range(n)] for i in range(n)]
    pos = lambda a: [p for p in range(n) if p != a and y[p] == y[a]]  # noqa: E731
    neg = lambda a: [k for k in range(n) if y[k] != y[a]]  # noqa: E731
    if mining == "batch_all":
        losses = [
            max(0.0, d[a][p] - d[a][k] + margin) for a in range(n) for p in pos(a) for k in neg(a)
        ]
        nonzero = [v for v in losses if v > 0]
        return sum(nonzero) / len(nonzero) if nonzero else 0.0
    if mining == "batch_hard":
        losses = [
            max(0.0, max(d[a][p] for p in pos(a)) - min(d[a][k] for k in neg(a)) + margin)
            for a in range(n)
            if pos(a) and neg(a)
        ]
        return sum(losses) / len(losses) if losses else 0.0
    losses = []  # semi_hard, TF-Addons semantics
    for a in range(n):
        if not neg(a):
            continue
        for p in pos(a):
            farther = [d[a][k] for k in neg(a) if d[a][k] > d[a][p]]
            chosen = min(farther) if farther else max(d[a][k] for k in neg(a))
            losses.append(max(0.0, d[a][p] - chosen + margin))
    return sum(losses) / len(losses) if losses else 0.0


def np_contrastive(x, y, *, pos_margin, neg_margin, squared, normalize):
    x = np.asarray(x, np.float64)
    if normalize:
        x = np_normalize(x)
    pos_losses, neg_losses = [], []
    for i, j in itertools.permutations(range(len(y)), 2):
        d = np_dist(x, i, j, squared)
        if y[i] == y[j]:
            pos_losses.append(max(0.0, d - pos_margin))
        else:
            neg_losses.append(max(0.0, neg_margin - d))
    mean_nz = lambda v: np.mean([u for u in v if u > 0]) if any(u > 0 for u in v) else 0.0  # noqa: E731
    return mean_nz(pos_losses) + mean_nz(neg_losses)


def np_ms_pairs(s, y, i, epsilon, mine):
    n = len(y)
    pos = [j for j in range(n) if j != i and y[j] == y[i]]
    neg = [j for j in range(n) if y[j] != y[i]]
    if not mine:
        return pos, neg
    if not pos or not neg:
        return [], []
    hardest_neg = max(s[i][j] for j in neg)
    hardest_pos = min(s[i][j] for j in pos)
    return (
        [j for j in pos if s[i][j] - epsilon < hardest_neg],
        [j for j in neg if s[i][j] + epsilon > hardest_pos],
    )


def np_multi_similarity(x, y, *, alpha, beta, base, epsilon, mine):
    x = np_normalize(np.asarray(x, np.float64))
    s = x @ x.T
    losses = []
    for i in range(len(y)):
        pos, neg = np_ms_pairs(s, y, i, epsilon, mine)
        pos_term = math.log(1 + sum(math.exp(-alpha * (s[i][j] - base)) for j in pos)) / alpha
        neg_term = math.log(1 + sum(math.exp(beta * (s[i][j] - base)) for j in neg)) / beta
        losses.append(pos_term + neg_term)
    return float(np.mean(losses))


def np_cross_entropy(logits, y):
    losses = []
    for row, label in zip(logits, y):
        m = max(row)
        losses.append(m + math.log(sum(math.exp(v - m) for v in row)) - row[label])
    return float(np.mean(losses))


def np_proxy_nca(x, y, proxies, *, scale, normalize=True, exclude_positive=False):
    x, proxies = np.asarray(x, np.float64), np.asarray(proxies, np.float64)
    if normalize:
        x, proxies = np_normalize(x), np_normalize(proxies)
    losses = []
    for i in range(len(y)):
        logits = [-scale * np.sum((x[i] - p) ** 2) for p in proxies]
        others = [v for c, v in enumerate(logits) if not (exclude_positive and c == y[i])]
        losses.append(-logits[y[i]] + math.log(sum(math.exp(v) for v in others)))
    return float(np.mean(losses))


def np_normalized_softmax(x, y, weights, *, temperature):
    cos = np_normalize(np.asarray(x, np.float64)) @ np_normalize(np.asarray(weights, np.float64)).T
    return np_cross_entropy(cos / temperature, y)


def np_arcface(x, y, weights, *, margin, scale):
    cos = np_normalize(np.asarray(x, np.float64)) @ np_normalize(np.asarray(weights, np.float64)).T
    logits = cos.copy()
    for i, label in enumerate(y):
        theta = math.acos(min(1.0, max(-1.0, cos[i, label])))
        if theta <= math.pi - margin:
            logits[i, label] = math.cos(theta + margin)
        else:
            logits[i, label] = math.cos(theta) - margin * math.sin(margin)
    return np_cross_entropy(scale * logits, y)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def random_batch(seed, batch=12, dim=5, classes=4, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim)) * scale
    y = rng.permutation(np.arange(batch) % classes)
    return x.astype(np.float32), y.astype(np.int32)


def triplet_away_from_kinks(x, y, margin, squared, normalize, gap):
    """True if no triplet sits within ``gap`` of a hinge, a mining switch or a tie."""
    x = np.asarray(x, np.float64)
    if normalize:
        x = np_normalize(x)
    n = len(y)
    d = np.array([[np_dist(x, i, j, squared) for j in range(n)] for i in range(n)])
    for a in range(n):
        others = [d[a][j] for j in range(n) if j != a]
        if np.min(np.abs(np.subtract.outer(others, others)) + np.eye(n - 1)) < gap:
            return False
        for p, k in itertools.product(range(n), range(n)):
            if p != a and y[p] == y[a] and y[k] != y[a]:
                if abs(d[a][p] - d[a][k] + margin) < gap:
                    return False
    return True


def kink_free_batch(margin, squared, normalize, batch=6, dim=3, classes=2, gap=2e-2):
    for seed in range(1000):
        x, y = random_batch(seed, batch=batch, dim=dim, classes=classes)
        if triplet_away_from_kinks(x, y, margin, squared, normalize, gap):
            return x.astype(np.float64), y
    raise AssertionError("no kink-free batch found")


# --------------------------------------------------------------------------------------
# pairwise_distances
# --------------------------------------------------------------------------------------


def test_pairwise_distances_values_and_shapes():
    a = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]], np.float32)
    b = np.array([[0.0, 0.0], [0.0, 1.0]], np.float32)
    expected_sq = np.array([[0.0, 1.0], [25.0, 18.0], [2.0, 1.0]])
    np.testing.assert_allclose(pairwise_distances(a, b), expected_sq, rtol=1e-6)
    np.testing.assert_allclose(
        pairwise_distances(a, b, squared=False), np.sqrt(expected_sq), rtol=1e-6
    )
    assert pairwise_distances(a, b).shape == (3, 2)


def test_pairwise_distances_clamped_and_safe_gradient_at_zero():
    # Large, nearly equal points: the expansion cancels; results must stay >= 0.
    x = jnp.array([[1000.0, 1000.0], [1000.0, 1000.0001], [1000.0, 1000.0]])
    assert bool(jnp.all(pairwise_distances(x, x) >= 0))
    for squared in (True, False):
        grad = jax.jit(
            jax.grad(lambda z, squared=squared: jnp.sum(pairwise_distances(z, z, squared=squared)))
        )(x)
        assert bool(jnp.all(jnp.isfinite(grad)))
    # Exactly zero distances (diagonal, duplicates): zero, finite gradient of the sqrt.
    z = jnp.array([[1.0, 2.0], [1.0, 2.0]])
    g = jax.jit(jax.grad(lambda v: jnp.sum(pairwise_distances(v, v, squared=False))))(z)
    np.testing.assert_array_equal(g, np.zeros((2, 2)))


def test_pairwise_distances_errors():
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(4, 3\)"):
        pairwise_distances(np.zeros((3, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="dim"):
        pairwise_distances(np.zeros(3), np.zeros((4, 3)))


# --------------------------------------------------------------------------------------
# Triplet loss
# --------------------------------------------------------------------------------------

# Points 0, 1, 3, 5 on a line, labels 0, 0, 1, 1, plain distances, margin 1.5:
#   d01 = 1, d02 = 3, d03 = 5, d12 = 2, d13 = 4, d23 = 2.
LINE_X = np.array([[0.0], [1.0], [3.0], [5.0]], np.float32)
LINE_Y = np.array([0, 0, 1, 1], np.int32)


def test_triplet_hand_computed():
    kw = dict(margin=1.5, squared=False)
    # batch_all, (a, p, n): (1,0,2): 1-2+1.5 = 0.5; (2,3,0): 2-3+1.5 = 0.5;
    # (2,3,1): 2-2+1.5 = 1.5; every other triplet <= 0. Mean over non-zero: 2.5 / 3.
    np.testing.assert_allclose(
        j_triplet_loss(LINE_X, LINE_Y, mining="batch_all", **kw), 2.5 / 3, rtol=1e-6
    )
    np.testing.assert_allclose(
        j_triplet_loss(LINE_X, LINE_Y, mining="batch_all", reduction="sum", **kw), 2.5, rtol=1e-6
    )
    # batch_hard, per anchor (hardest pos, nearest neg): a0 (1, 3) -> 0; a1 (1, 2) -> 0.5;
    # a2 (2, 2) -> 1.5; a3 (2, 4) -> 0. Mean over the 4 anchors: 0.5.
    np.testing.assert_allclose(
        j_triplet_loss(LINE_X, LINE_Y, mining="batch_hard", **kw), 0.5, rtol=1e-6
    )
    np.testing.assert_allclose(
        j_triplet_loss(LINE_X, LINE_Y, mining="batch_hard", reduction="none", **kw),
        [0.0, 0.5, 1.5, 0.0],
        rtol=1e-6,
    )
    # semi_hard, per pair (a, p): nearest negative strictly farther than d_ap.
    # (0,1): d=1, negs 3, 5 -> 3: 1-3+1.5 < 0 -> 0;  (1,0): d=1, negs 2, 4 -> 2: 0.5;
    # (2,3): d=2, negs 3, 2 -> 3 (2 is not farther): 0.5;  (3,2): d=2, negs 5, 4 -> 4: 0.
    # Mean over the 4 pairs: 0.25.
    np.testing.assert_allclose(
        j_triplet_loss(LINE_X, LINE_Y, mining="semi_hard", **kw), 0.25, rtol=1e-6
    )
    # Squared distances, batch_all, margin 1.5: d01 = 1, d02 = 9, d03 = 25, d12 = 4,
    # d13 = 16, d23 = 4. Violations: (1,0,2): 1-4+1.5 < 0 ... (2,3,1): 4-4+1.5 = 1.5,
    # (3,2,1): 4-16+1.5 < 0, (2,3,0): 4-9+1.5 < 0. Only one: mean 1.5.
    np.testing.assert_allclose(j_triplet_loss(LINE_X, LINE_Y, margin=1.5), 1.5, rtol=1e-6)


def test_triplet_semi_hard_fallback_to_farthest_negative():
    # Points 0, 3 (class 0) and 1 (class 1); no negative is farther than the positive.
    # (0,1): d_ap = 3, only negative d = 1 -> fallback to it: 3 - 1 + 0.5 = 2.5.
    # (1,0): d_ap = 3, only negative d = 2 -> 3 - 2 + 0.5 = 1.5.  Mean 2.0.
    x = np.array([[0.0], [3.0], [1.0]], np.float32)
    y = np.array([0, 0, 1], np.int32)
    loss = j_triplet_loss(x, y, margin=0.5, mining="semi_hard", squared=False)
    np.testing.assert_allclose(loss, 2.0, rtol=1e-6)


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("squared,normalize", [(True, False), (False, False), (False, True)])
def test_triplet_matches_numpy_reference(mining, squared, normalize):
    margin = 0.3 if normalize else 1.0
    for seed in range(3):
        x, y = random_batch(seed, batch=10, classes=3)
        expected = np_triplet(
            x, y, margin=margin, mining=mining, squared=squared, normalize=normalize
        )
        with jax.enable_x64(True):
            got64 = j_triplet_loss(
                x.astype(np.float64),
                y,
                margin=margin,
                mining=mining,
                squared=squared,
                normalize=normalize,
            )
        np.testing.assert_allclose(got64, expected, rtol=1e-10, atol=1e-12)
        got32 = j_triplet_loss(
            x, y, margin=margin, mining=mining, squared=squared, normalize=normalize
        )
        assert got32.dtype == jnp.float32
        np.testing.assert_allclose(got32, expected, rtol=2e-5, atol=1e-6)


# Reverse mode everywhere (that is what training uses); forward mode once per loss family,
# to keep the file fast.
@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("squared", [True, False])
def test_triplet_gradients(mining, squared):
    margin = 0.5
    x, y = kink_free_batch(margin, squared, normalize=False)
    with jax.enable_x64(True):
        fn = functools.partial(
            triplet_loss, labels=y, margin=margin, mining=mining, squared=squared
        )
        assert float(fn(x)) > 0
        modes = ("rev", "fwd") if (mining, squared) == ("batch_all", True) else ("rev",)
        check_grads(jax.jit(fn), (x,), order=1, modes=modes, eps=1e-4)


@pytest.mark.parametrize("mining", MININGS)
def test_triplet_jit_vmap(mining):
    x, y = random_batch(0, batch=8, classes=3)
    fn = functools.partial(triplet_loss, margin=0.5, mining=mining)
    np.testing.assert_allclose(jax.jit(fn)(x, y), fn(x, y), rtol=1e-6)
    xs = np.stack([random_batch(s, batch=8, classes=3)[0] for s in range(3)])
    ys = np.stack([random_batch(s, batch=8, classes=3)[1] for s in range(3)])
    batched = jax.vmap(fn)(xs, ys)
    np.testing.assert_allclose(batched, [jax.jit(fn)(a, b) for a, b in zip(xs, ys)], rtol=1e-6)


_rng = np.random.default_rng(0)
# All [6, 3] except the last, so that one compilation serves every case of a configuration.
DEGENERATE = {
    "single_class": (_rng.normal(size=(6, 3)), np.zeros(6, np.int32)),
    "all_distinct_labels": (_rng.normal(size=(6, 3)), np.arange(6, dtype=np.int32)),
    "all_equal_embeddings": (np.ones((6, 3)), np.array([0, 0, 1, 1, 2, 2], np.int32)),
    "all_zero_embeddings": (np.zeros((6, 3)), np.array([0, 0, 1, 1, 2, 2], np.int32)),
    "duplicates": (
        np.repeat(_rng.normal(size=(3, 3)), 2, axis=0),
        np.array([0, 0, 1, 1, 0, 1], np.int32),
    ),
    "single_example": (np.ones((1, 3)), np.zeros(1, np.int32)),
}


def _assert_finite_value_and_grad(fn, x, *args):
    x = jnp.asarray(x, jnp.float32)
    value, grad = jax.value_and_grad(fn)(x, *args)
    assert np.isfinite(value), value
    assert np.all(np.isfinite(grad)), grad
    return float(value)


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("squared,normalize", [(True, False), (False, True)])
def test_triplet_degenerate_batches(mining, squared, normalize):
    fn = jax.jit(
        functools.partial(
            triplet_loss, margin=0.2, mining=mining, squared=squared, normalize=normalize
        )
    )
    for case, (x, y) in DEGENERATE.items():
        value = _assert_finite_value_and_grad(fn, x, y)
        if case in ("single_class", "all_distinct_labels", "single_example"):
            assert value == 0.0, case  # no valid triplet
        if case in ("all_equal_embeddings", "all_zero_embeddings"):
            np.testing.assert_allclose(
                value, 0.2, rtol=1e-6, err_msg=case
            )  # each triplet costs the margin


def test_triplet_errors():
    x, y = random_batch(0)
    with pytest.raises(ValueError, match=r"\(1, 12, 5\)"):
        triplet_loss(x[None], y)
    with pytest.raises(ValueError, match=r"labels.shape=\(11,\).*\(12, 5\)"):
        triplet_loss(x, y[:-1])
    with pytest.raises(ValueError, match="integers"):
        triplet_loss(x, y.astype(np.float32))
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(x, y, mining="hardest")
    with pytest.raises(ValueError, match="reduction"):
        triplet_loss(x, y, reduction="avg")


# --------------------------------------------------------------------------------------
# Contrastive loss
# --------------------------------------------------------------------------------------


def test_contrastive_hand_computed():
    # Points 0, 0.5 (class 0), 0.8 (class 1): d01 = 0.5, d02 = 0.8, d12 = 0.3.
    x = np.array([[0.0], [0.5], [0.8]], np.float32)
    y = np.array([0, 0, 1], np.int32)
    # Positive pairs (0,1), (1,0): 0.5 each -> mean 0.5.
    # Negative pairs, neg_margin 1: (0,2), (2,0): 0.2; (1,2), (2,1): 0.7 -> mean 0.45.
    np.testing.assert_allclose(j_contrastive_loss(x, y), 0.95, rtol=1e-5)
    # pos_margin 0.6 silences the positives; neg_margin 0.5 leaves only (1,2), (2,1): 0.2.
    np.testing.assert_allclose(
        j_contrastive_loss(x, y, pos_margin=0.6, neg_margin=0.5), 0.2, rtol=1e-5
    )
    # Squared: d01 = 0.25, d02 = 0.64, d12 = 0.09 -> 0.25 + (0.36 + 0.91) / 2 = 0.885.
    np.testing.assert_allclose(j_contrastive_loss(x, y, squared=True), 0.885, rtol=1e-5)
    # Sum over ordered pairs: 2 * 0.5 + 2 * 0.2 + 2 * 0.7 = 2.8.
    np.testing.assert_allclose(j_contrastive_loss(x, y, reduction="sum"), 2.8, rtol=1e-5)
    per_pair = j_contrastive_loss(x, y, reduction="none")
    np.testing.assert_allclose(
        per_pair, [[0, 0.5, 0.2], [0.5, 0, 0.7], [0.2, 0.7, 0]], rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("squared,normalize", [(False, False), (True, False), (False, True)])
def test_contrastive_matches_numpy_reference(squared, normalize):
    for seed in range(3):
        x, y = random_batch(seed, batch=10, classes=3)
        kw = dict(
            pos_margin=0.5,
            neg_margin=2.0 if not normalize else 1.0,
            squared=squared,
            normalize=normalize,
        )
        expected = np_contrastive(x, y, **kw)
        with jax.enable_x64(True):
            np.testing.assert_allclose(
                j_contrastive_loss(x.astype(np.float64), y, **kw), expected, rtol=1e-10
            )
        np.testing.assert_allclose(j_contrastive_loss(x, y, **kw), expected, rtol=2e-5)


def test_contrastive_gradients_jit_vmap():
    x, y = random_batch(4, batch=6, dim=3, classes=2)
    x = x.astype(np.float64)
    with jax.enable_x64(True):
        # Margins chosen so that no pair is near its hinge (checked, not assumed).
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        assert np.min(np.abs(d - 0.5) + np.eye(6)) > 1e-2 and np.min(np.abs(d - 2.0)) > 1e-2
        fn = functools.partial(contrastive_loss, labels=y, pos_margin=0.5, neg_margin=2.0)
        check_grads(jax.jit(fn), (x,), order=1, modes=("rev", "fwd"), eps=1e-4)
    x32 = x.astype(np.float32)
    fn = functools.partial(contrastive_loss, pos_margin=0.5, neg_margin=2.0)
    np.testing.assert_allclose(jax.jit(fn)(x32, y), fn(x32, y), rtol=1e-6)
    xs, ys = np.stack([x32, x32[::-1], 2 * x32]), np.stack([y, y, y])
    np.testing.assert_allclose(
        jax.vmap(fn)(xs, ys), [jax.jit(fn)(a, b) for a, b in zip(xs, ys)], rtol=1e-6
    )


@pytest.mark.parametrize("squared", [True, False])
def test_contrastive_degenerate_batches(squared):
    fn = jax.jit(functools.partial(contrastive_loss, squared=squared))
    for x, y in DEGENERATE.values():
        _assert_finite_value_and_grad(fn, x, y)


def test_contrastive_errors():
    x, y = random_batch(0)
    with pytest.raises(ValueError, match=r"labels.shape=\(12, 1\)"):
        contrastive_loss(x, y[:, None])
    with pytest.raises(ValueError, match="reduction"):
        contrastive_loss(x, y, reduction="max")


# --------------------------------------------------------------------------------------
# Multi-similarity loss and miner
# --------------------------------------------------------------------------------------


def test_multi_similarity_hand_computed():
    # Unit vectors: S01 = 0.6, S02 = 0.8, S12 = 0.48 + 0.48 = 0.96; labels 0, 0, 1.
    x = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]], np.float32)
    y = np.array([0, 0, 1], np.int32)
    alpha, beta, base = 2.0, 50.0, 0.5
    pos_01 = math.log(1 + math.exp(-alpha * (0.6 - base))) / alpha
    a0 = pos_01 + math.log(1 + math.exp(beta * (0.8 - base))) / beta
    a1 = pos_01 + math.log(1 + math.exp(beta * (0.96 - base))) / beta
    # Anchor 2 has no positive; without mining its negatives (S = 0.8, 0.96) still count.
    a2 = math.log(1 + math.exp(beta * 0.3) + math.exp(beta * 0.46)) / beta
    np.testing.assert_allclose(
        j_multi_similarity_loss(x, y, mine=False), (a0 + a1 + a2) / 3, rtol=1e-5
    )
    # Mining (eps 0.1): anchors 0 and 1 keep both their pairs (0.6 - 0.1 < 0.8 or 0.96,
    # 0.8/0.96 + 0.1 > 0.6); anchor 2 has no positive, so it keeps no negative.
    np.testing.assert_allclose(j_multi_similarity_loss(x, y), (a0 + a1) / 3, rtol=1e-5)
    pos, neg = j_multi_similarity_miner(x, y)
    np.testing.assert_array_equal(pos, [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(neg, [[0, 0, 1], [0, 0, 1], [0, 0, 0]])
    # An easy batch mines nothing: x2 = (0, -1) gives S02 = 0, S12 = -0.8. Negatives:
    # 0 + 0.1 > 0.6 and -0.8 + 0.1 > 0.6 are false; positive: 0.6 - 0.1 < 0 (anchor 0's
    # hardest negative) and < -0.8 (anchor 1's) are false. Loss 0.
    x_easy = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]], np.float32)
    pos, neg = j_multi_similarity_miner(x_easy, y)
    assert not bool(jnp.any(pos)) and not bool(jnp.any(neg))
    np.testing.assert_allclose(j_multi_similarity_loss(x_easy, y), 0.0, atol=1e-7)


@pytest.mark.parametrize("mine", [True, False])
def test_multi_similarity_matches_numpy_reference(mine):
    kw = dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1)
    for seed in range(4):
        x, y = random_batch(seed, batch=12, dim=4, classes=3)
        expected = np_multi_similarity(x, y, mine=mine, **kw)
        with jax.enable_x64(True):
            np.testing.assert_allclose(
                j_multi_similarity_loss(x.astype(np.float64), y, mine=mine, **kw),
                expected,
                rtol=1e-10,
            )
        np.testing.assert_allclose(
            j_multi_similarity_loss(x, y, mine=mine, **kw), expected, rtol=2e-5
        )


def test_multi_similarity_miner_matches_numpy_reference():
    for seed in range(4):
        x, y = random_batch(seed, batch=12, dim=4, classes=3)
        xn = np_normalize(x.astype(np.float64))
        s = xn @ xn.T
        pos, neg = j_multi_similarity_miner(x, y, epsilon=0.1)
        for i in range(len(y)):
            p_ref, n_ref = np_ms_pairs(s, y, i, 0.1, True)
            assert sorted(np.flatnonzero(pos[i])) == p_ref
            assert sorted(np.flatnonzero(neg[i])) == n_ref


def test_multi_similarity_gradients_jit_vmap():
    # The mined masks are piecewise constant: check at a batch where no pair is within 0.02
    # of a mining switch (S_ij -/+ epsilon against the anchor's hardest negative/positive),
    # and where the miner keeps some pairs but not all.
    for seed in range(1000):
        x, y = random_batch(seed, batch=6, dim=3, classes=2)
        x = x.astype(np.float64)
        s = np_normalize(x) @ np_normalize(x).T
        same, diff = y[:, None] == y[None], y[:, None] != y[None]
        np.fill_diagonal(same, False)
        hardest_neg = np.where(diff, s, -np.inf).max(1, keepdims=True)
        hardest_pos = np.where(same, s, np.inf).min(1, keepdims=True)
        gap_pos = np.abs(s - 0.1 - hardest_neg)[same].min()
        gap_neg = np.abs(s + 0.1 - hardest_pos)[diff].min()
        kept = sum(len(p) + len(n) for p, n in (np_ms_pairs(s, y, i, 0.1, True) for i in range(6)))
        if min(gap_pos, gap_neg) > 2e-2 and 0 < kept < same.sum() + diff.sum():
            break
    with jax.enable_x64(True):
        for mine in (False, True):
            fn = functools.partial(multi_similarity_loss, labels=y, mine=mine)
            check_grads(jax.jit(fn), (x,), order=1, modes=("rev",), eps=1e-4)
    x32 = x.astype(np.float32)
    fn = multi_similarity_loss
    np.testing.assert_allclose(jax.jit(fn)(x32, y), fn(x32, y), rtol=1e-6)
    xs, ys = np.stack([x32, -x32, x32[::-1]]), np.stack([y, y, y])
    np.testing.assert_allclose(
        jax.vmap(fn)(xs, ys), [jax.jit(fn)(a, b) for a, b in zip(xs, ys)], rtol=1e-6
    )


@pytest.mark.parametrize("mine", [True, False])
def test_multi_similarity_degenerate_batches(mine):
    fn = jax.jit(functools.partial(multi_similarity_loss, mine=mine))
    for x, y in DEGENERATE.values():
        _assert_finite_value_and_grad(fn, x, y)


def test_multi_similarity_errors():
    x, y = random_batch(0)
    with pytest.raises(ValueError, match=r"\(12, 5, 1\)"):
        multi_similarity_loss(x[..., None], y)
    with pytest.raises(ValueError, match=r"labels.shape=\(3,\)"):
        multi_similarity_miner(x, y[:3])


# --------------------------------------------------------------------------------------
# ProxyNCA, normalised softmax, ArcFace
# --------------------------------------------------------------------------------------


def random_proxies(seed, classes=4, dim=5):
    return np.random.default_rng(100 + seed).normal(size=(classes, dim)).astype(np.float32)


def test_proxy_losses_hand_computed():
    x = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    y = np.array([0, 1], np.int32)
    proxies = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], np.float32)
    # Normalised: x0 = (1,0): squared distances to proxies 0, 4, 2; x1 = (0,1): 2, 2, 0.
    # ProxyNCA, scale 1: l0 = log(e^0 + e^-4 + e^-2) - 0; l1 = log(e^-2 + e^-2 + 1) + 2.
    l0 = math.log(1 + math.exp(-4) + math.exp(-2))
    l1 = math.log(2 * math.exp(-2) + 1) + 2
    np.testing.assert_allclose(j_proxy_nca_loss(x, y, proxies), (l0 + l1) / 2, rtol=1e-6)
    # Original-paper form: the own proxy leaves the denominator.
    e0 = math.log(math.exp(-4) + math.exp(-2))
    e1 = math.log(math.exp(-2) + 1) + 2
    np.testing.assert_allclose(
        j_proxy_nca_loss(x, y, proxies, exclude_positive=True), (e0 + e1) / 2, rtol=1e-6
    )
    # Normalised softmax, T = 0.5: cosines x0: (1, -1, 0), x1: (0, 0, 1) -> logits * 2.
    n0 = math.log(math.exp(2) + math.exp(-2) + 1) - 2
    n1 = math.log(1 + 1 + math.exp(2)) - 0  # target class 1 has cosine 0
    np.testing.assert_allclose(
        j_normalized_softmax_loss(x, y, proxies, temperature=0.5), (n0 + n1) / 2, rtol=1e-6
    )
    # ArcFace, m = 0.5, s = 2: x0 target theta = 0 -> cos(0.5); x1 target (proxy 1) has
    # theta = pi/2 <= pi - m -> cos(pi/2 + 0.5) = -sin(0.5).
    t0, t1 = math.cos(0.5), -math.sin(0.5)
    a0 = math.log(math.exp(2 * t0) + math.exp(-2) + 1) - 2 * t0
    a1 = math.log(1 + math.exp(2 * t1) + math.exp(2)) - 2 * t1
    np.testing.assert_allclose(
        j_arcface_loss(x, y, proxies, margin=0.5, scale=2.0), (a0 + a1) / 2, rtol=1e-6
    )
    # Past pi - m the target logit is cos(theta) - m sin(m): x = (1, 0) against proxy 1 (theta = pi).
    t = -1 - 0.5 * math.sin(0.5)
    a = math.log(math.exp(2 * 1) + math.exp(2 * t) + 1) - 2 * t
    np.testing.assert_allclose(
        j_arcface_loss(x[:1], np.array([1], np.int32), proxies, margin=0.5, scale=2.0), a, rtol=1e-6
    )


PROXY_CASES = {
    "proxy_nca": (proxy_nca_loss, np_proxy_nca, dict(scale=3.0)),
    "proxy_nca_unnormalized": (proxy_nca_loss, np_proxy_nca, dict(scale=0.5, normalize=False)),
    "proxy_nca_exclude_positive": (
        proxy_nca_loss,
        np_proxy_nca,
        dict(scale=3.0, exclude_positive=True),
    ),
    "normalized_softmax": (normalized_softmax_loss, np_normalized_softmax, dict(temperature=0.1)),
    "arcface": (arcface_loss, np_arcface, dict(margin=0.5, scale=16.0)),
}


@pytest.mark.parametrize("name", sorted(PROXY_CASES))
def test_proxy_losses_match_numpy_reference(name):
    fn, ref, kw = PROXY_CASES[name]
    for seed in range(3):
        x, y = random_batch(seed, batch=10, classes=4)
        proxies = random_proxies(seed)
        expected = ref(x, y, proxies, **kw)
        with jax.enable_x64(True):
            np.testing.assert_allclose(
                fn(x.astype(np.float64), y, proxies.astype(np.float64), **kw), expected, rtol=1e-10
            )
        np.testing.assert_allclose(fn(x, y, proxies, **kw), expected, rtol=2e-5)


def test_arcface_both_branches_match_reference():
    # Embeddings placed opposite their target weights exercise theta > pi - m.
    x, y = random_batch(7, batch=10, classes=4)
    proxies = random_proxies(7)
    x[:5] = -proxies[y[:5]] + 0.05 * x[:5]
    cos = np.sum(np_normalize(x) * np_normalize(proxies[y]), axis=1)
    assert np.sum(np.arccos(cos) > math.pi - 0.5) >= 3
    np.testing.assert_allclose(
        j_arcface_loss(x, y, proxies), np_arcface(x, y, proxies, margin=0.5, scale=64.0), rtol=2e-5
    )


@pytest.mark.parametrize("name", sorted(PROXY_CASES))
def test_proxy_losses_gradients_jit_vmap(name):
    fn, _, kw = PROXY_CASES[name]
    x, y = random_batch(3, batch=6, dim=3, classes=3)
    proxies = random_proxies(3, classes=3, dim=3)
    with jax.enable_x64(True):
        f = lambda e, p: fn(e, y, p, **kw)  # noqa: E731
        modes = ("rev", "fwd") if name == "proxy_nca" else ("rev",)
        check_grads(
            jax.jit(f), (x.astype(np.float64), proxies.astype(np.float64)), order=1, modes=modes
        )
    g = functools.partial(fn, **kw)
    np.testing.assert_allclose(jax.jit(g)(x, y, proxies), g(x, y, proxies), rtol=1e-6)
    xs, ys = np.stack([x, -x, x[::-1]]), np.stack([y, y, y[::-1]])
    batched = jax.vmap(g, in_axes=(0, 0, None))(xs, ys, proxies)
    # float32: vmap may reorder the reductions, so allow a few ulps of the loss's magnitude.
    np.testing.assert_allclose(
        batched, [jax.jit(g)(a, b, proxies) for a, b in zip(xs, ys)], rtol=1e-5
    )


@pytest.mark.parametrize("name", sorted(PROXY_CASES))
def test_proxy_losses_degenerate_batches(name):
    fn, _, kw = PROXY_CASES[name]
    f = jax.jit(lambda e, labels, p: fn(e, labels, p, **kw))
    for x, y in DEGENERATE.values():
        proxies = np.concatenate([x[:1], random_proxies(0, classes=4, dim=3)])  # proxy 0 == x[0]
        proxies = np.concatenate([proxies, np.zeros((1, 3))]).astype(np.float32)  # and a zero proxy
        value, grads = jax.value_and_grad(f, argnums=(0, 2))(
            jnp.asarray(x, jnp.float32), y, proxies
        )
        assert np.isfinite(value)
        assert all(np.all(np.isfinite(g)) for g in grads)


def test_arcface_gradient_finite_at_cos_one():
    # Embedding exactly on its target weight: cos = 1 where d sqrt(1 - cos^2) is infinite.
    x = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    weights = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]], np.float32)
    grads = jax.jit(jax.grad(arcface_loss, argnums=(0, 2)))(x, np.array([0, 2], np.int32), weights)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_proxy_losses_errors():
    x, y = random_batch(0)
    proxies = random_proxies(0)
    for fn in (proxy_nca_loss, normalized_softmax_loss, arcface_loss):
        with pytest.raises(ValueError, match=r"\(4, 4\).*\(12, 5\)"):
            fn(x, y, proxies[:, :4])
        with pytest.raises(ValueError, match=r"\(5,\)"):
            fn(x, y, proxies[0])
        with pytest.raises(ValueError, match=r"labels.shape=\(12, 1\)"):
            fn(x, y[:, None], proxies)
        with pytest.raises(ValueError, match="reduction"):
            fn(x, y, proxies, reduction="avg")
    with pytest.raises(ValueError, match=r"\(1, 5\)"):
        proxy_nca_loss(x, np.zeros_like(y), proxies[:1], exclude_positive=True)


# --------------------------------------------------------------------------------------
# pytorch-metric-learning parity (optional)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pml():
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, miners

    return torch, distances, losses, miners


# Importing torch and pml costs several seconds: these are marked slow.
pml_parity = pytest.mark.slow


def _t(torch, a):
    return torch.tensor(np.asarray(a))


@pml_parity
@pytest.mark.parametrize("squared,normalize", [(True, False), (False, False), (False, True)])
def test_pml_triplet(pml, squared, normalize):
    torch, distances, losses, miners = pml
    margin = 0.2 if normalize else 1.0
    for seed in range(3):
        x, y = random_batch(seed, batch=16, classes=4)
        xt, yt = _t(torch, x), _t(torch, y).long()
        dist = distances.LpDistance(power=2 if squared else 1, normalize_embeddings=normalize)
        loss_fn = losses.TripletMarginLoss(margin=margin, distance=dist, triplets_per_anchor="all")
        kw = dict(margin=margin, squared=squared, normalize=normalize)

        # batch_all == every triplet (also == TripletMarginMiner("all") + the loss).
        all_triplets = miners.TripletMarginMiner(
            margin=margin, type_of_triplets="all", distance=dist
        )
        np.testing.assert_allclose(
            j_triplet_loss(x, y, mining="batch_all", **kw), loss_fn(xt, yt).item(), rtol=1e-5
        )
        np.testing.assert_allclose(
            j_triplet_loss(x, y, mining="batch_all", **kw),
            loss_fn(xt, yt, all_triplets(xt, yt)).item(),
            rtol=1e-5,
        )
        # batch_hard == BatchHardMiner + the loss, up to the reducer: pml averages over the
        # anchors with non-zero loss, we over the anchors with a valid triplet.
        hard = miners.BatchHardMiner(distance=dist)
        per_anchor = np.asarray(j_triplet_loss(x, y, mining="batch_hard", reduction="none", **kw))
        expected = loss_fn(xt, yt, hard(xt, yt)).item()
        nonzero = per_anchor[per_anchor > 0]
        np.testing.assert_allclose(nonzero.mean() if nonzero.size else 0.0, expected, rtol=1e-5)
        # pml's TripletMarginMiner "semihard"/"hard" keep every triplet with
        # 0 < d_an - d_ap <= margin / d_an - d_ap <= 0, i.e. batch-all triplets with loss in
        # (0, margin) / [margin, inf). (Our "semi_hard" is FaceNet's one negative per pair.)
        per_triplet = np.asarray(j_triplet_loss(x, y, mining="batch_all", reduction="none", **kw))
        for kind, keep in (("semihard", per_triplet < margin), ("hard", per_triplet >= margin)):
            miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=kind, distance=dist)
            selected = per_triplet[(per_triplet > 0) & keep]
            ours = selected.mean() if selected.size else 0.0
            np.testing.assert_allclose(
                ours, loss_fn(xt, yt, miner(xt, yt)).item(), rtol=1e-5, atol=1e-6
            )


@pml_parity
@pytest.mark.parametrize("squared,normalize", [(False, False), (True, False), (False, True)])
def test_pml_contrastive(pml, squared, normalize):
    torch, distances, losses, _ = pml
    for seed in range(3):
        x, y = random_batch(seed, batch=16, classes=4)
        pos_margin, neg_margin = (0.3, 0.9) if normalize else (1.0, 3.0)
        dist = distances.LpDistance(power=2 if squared else 1, normalize_embeddings=normalize)
        expected = losses.ContrastiveLoss(
            pos_margin=pos_margin, neg_margin=neg_margin, distance=dist
        )(_t(torch, x), _t(torch, y).long())
        got = j_contrastive_loss(
            x, y, pos_margin=pos_margin, neg_margin=neg_margin, squared=squared, normalize=normalize
        )
        np.testing.assert_allclose(got, expected.item(), rtol=1e-5)


@pml_parity
@pytest.mark.parametrize("mine", [True, False])
def test_pml_multi_similarity(pml, mine):
    torch, _, losses, miners = pml
    for seed in range(3):
        x, y = random_batch(seed, batch=16, dim=4, classes=4)
        xt, yt = _t(torch, x), _t(torch, y).long()
        loss_fn = losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
        tuples = miners.MultiSimilarityMiner(epsilon=0.1)(xt, yt) if mine else None
        expected = loss_fn(xt, yt, tuples).item()
        got = j_multi_similarity_loss(x, y, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, mine=mine)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        if mine:
            pos, neg = j_multi_similarity_miner(x, y, epsilon=0.1)
            a1, p, a2, n = (t.numpy() for t in tuples)
            assert set(zip(a1, p)) == set(zip(*np.nonzero(np.asarray(pos))))
            assert set(zip(a2, n)) == set(zip(*np.nonzero(np.asarray(neg))))


@pml_parity
def test_pml_proxy_losses(pml):
    torch, _, losses, _ = pml
    for seed in range(3):
        x, y = random_batch(seed, batch=16, classes=4)
        proxies = random_proxies(seed)
        xt, yt = _t(torch, x), _t(torch, y).long()

        nca = losses.ProxyNCALoss(num_classes=4, embedding_size=5, softmax_scale=3.0)
        nca.proxies.data = _t(torch, proxies)
        np.testing.assert_allclose(
            j_proxy_nca_loss(x, y, proxies, scale=3.0), nca(xt, yt).item(), rtol=1e-5
        )

        softmax = losses.NormalizedSoftmaxLoss(num_classes=4, embedding_size=5, temperature=0.05)
        softmax.W.data = _t(torch, proxies.T.copy())
        np.testing.assert_allclose(
            j_normalized_softmax_loss(x, y, proxies, temperature=0.05),
            softmax(xt, yt).item(),
            rtol=1e-5,
        )

        arc = losses.ArcFaceLoss(
            num_classes=4, embedding_size=5, margin=math.degrees(0.5), scale=64.0
        )
        arc.W.data = _t(torch, proxies.T.copy())
        np.testing.assert_allclose(
            j_arcface_loss(x, y, proxies, margin=0.5, scale=64.0), arc(xt, yt).item(), rtol=1e-5
        )


# --------------------------------------------------------------------------------------
# Sharded batches (conftest fakes 4 CPU devices)
# --------------------------------------------------------------------------------------


def test_losses_on_a_batch_sharded_over_devices():
    devices = np.array(jax.devices()[:4])
    if devices.size < 2:
        pytest.skip("needs several devices")
    mesh = jax.sharding.Mesh(devices, ("data",))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x, y = random_batch(5, batch=8 * devices.size // 2, classes=4)
    proxies = random_proxies(5)
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    cases = [
        (functools.partial(triplet_loss, mining="batch_hard", squared=False), ()),
        (functools.partial(triplet_loss, mining="semi_hard"), ()),
        (contrastive_loss, ()),
        (multi_similarity_loss, ()),
        (arcface_loss, (proxies,)),
    ]
    for fn, extra in cases:
        np.testing.assert_allclose(
            jax.jit(fn)(xs, ys, *extra), jax.jit(fn)(x, y, *extra), rtol=1e-5
        )
