"""Piecewise-linear manifolds (Bhatnagar & Ahuja, CPAL 2024): pieces, similarity, losses.

References are independent: float64 NumPy loops (one SVD per candidate neighbourhood),
scipy's principal angles, brute-force purity counts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
import scipy.stats
from jax.test_util import check_grads

from magnet_jax.losses import (
    PLMTargets,
    plm_loss,
    plm_neighbourhood_loss,
    plm_point_loss,
    plm_proxy_loss,
    plm_targets,
)
from magnet_jax.manifolds import (
    LinearPieces,
    assignment_purity,
    ema_update,
    fit_linear_pieces,
    neighbour_table,
    neighbourhood_purity,
    pair_similarities,
    piece_members,
    piece_similarity,
    sample_anchor_batch,
    similarity_correlation,
)

AMBIENT = 10


def _random_subspace(rng, dim):
    return np.linalg.qr(rng.normal(size=(AMBIENT, dim)))[0]


@functools.cache
def lines_and_planes():
    """Points near two lines and two planes in 10-D, far apart; returns (x, piece id, bases)."""
    rng = np.random.default_rng(0)
    xs, ids, bases = [], [], []
    for piece, (dim, count) in enumerate([(1, 80), (1, 80), (2, 160), (2, 160)]):
        basis = _random_subspace(rng, dim)
        offset = 6.0 * rng.normal(size=AMBIENT)
        coords = rng.uniform(-1.0, 1.0, size=(count, dim))
        xs.append(offset + coords @ basis.T + 0.002 * rng.normal(size=(count, AMBIENT)))
        ids.append(np.full(count, piece))
        bases.append(basis)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ids), tuple(bases)


# --------------------------------------------------------------------------------------
# Piece fitting
# --------------------------------------------------------------------------------------


def _reference_pieces(x, table, *, max_rank, threshold, min_size, growth):
    """One SVD per candidate neighbourhood, in float64, with the documented rules."""
    x = np.asarray(x, np.float64)
    out = {k: [] for k in ("sizes", "ranks", "projectors", "radii", "centres", "errors")}
    for i in range(x.shape[0]):
        members = np.concatenate([[i], table[i]])

        def errors_of(m, members=members):
            pts = x[members[:m]]
            centred = pts - pts.mean(0)
            sv = np.linalg.svd(centred, compute_uv=False) ** 2
            total = sv.sum()
            return np.array(
                [1 - sv[:r].sum() / total if total > 0 else 0.0 for r in range(1, max_rank + 1)]
            )

        all_sizes = range(min_size, len(members) + 1)
        fits = {m: errors_of(m)[-1] <= threshold for m in all_sizes}
        if growth == "fixed":
            size = len(members)
        elif growth == "largest":
            size = max([m for m in all_sizes if fits[m]], default=min_size)
        else:
            size = min_size
            while size + 1 <= len(members) and fits[size + 1]:
                size += 1
        errs = errors_of(size)
        meeting = [r for r in range(1, max_rank + 1) if errs[r - 1] <= threshold]
        rank = min(meeting[0] if meeting else max_rank, size - 1)
        pts = x[members[:size]]
        centre = pts.mean(0)
        _, _, vt = np.linalg.svd(pts - centre)
        basis = vt[:rank].T
        out["sizes"].append(size)
        out["ranks"].append(rank)
        out["projectors"].append(basis @ basis.T)
        out["radii"].append(np.sqrt(np.sum((pts - centre) ** 2) / size))
        out["centres"].append(centre)
        out["errors"].append(errs[rank - 1])
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize(
    "growth,subset_selection", [("largest", True), ("first_failure", True), ("fixed", False)]
)
def test_pieces_match_a_float64_reference(growth, subset_selection):
    rng = np.random.default_rng(1)
    # A curved, noisy 2-D sheet, so that neighbourhoods stop growing at different sizes.
    u = rng.uniform(-1, 1, size=(60, 2))
    x = np.concatenate([u, u**2, 0.05 * rng.normal(size=(60, 3))], axis=1).astype(np.float32)
    table = np.asarray(neighbour_table(x, num_neighbours=9))
    kwargs = dict(max_rank=3, error_threshold=0.02, min_size=4)
    pieces = fit_linear_pieces(
        x,
        table,
        **kwargs,
        subset_selection=subset_selection,
        growth="largest" if growth == "fixed" else growth,
        chunk_size=16,
    )
    ref = _reference_pieces(x, table, max_rank=3, threshold=0.02, min_size=4, growth=growth)
    np.testing.assert_array_equal(pieces.sizes, ref["sizes"])
    np.testing.assert_array_equal(pieces.ranks, ref["ranks"])
    if subset_selection:
        assert len(np.unique(ref["sizes"])) > 2  # the data exercise the growth rule
    projectors = np.einsum("ndr,ner->nde", pieces.bases, pieces.bases)
    np.testing.assert_allclose(projectors, ref["projectors"], atol=2e-4)
    np.testing.assert_allclose(pieces.radii, ref["radii"], rtol=1e-5)
    np.testing.assert_allclose(pieces.centres, ref["centres"], atol=1e-5)
    np.testing.assert_allclose(pieces.errors, ref["errors"], atol=1e-5)
    # Columns at or beyond the rank are zero, the others orthonormal.
    gram = np.einsum("ndr,nds->nrs", pieces.bases, pieces.bases)
    expected = np.stack([np.diag(np.arange(3) < r).astype(float) for r in ref["ranks"]])
    np.testing.assert_allclose(gram, expected, atol=1e-5)


def test_pieces_recover_the_true_lines_and_planes():
    x, ids, bases = lines_and_planes()
    table = neighbour_table(x, num_neighbours=12)
    pieces = fit_linear_pieces(x, table, max_rank=3, error_threshold=0.05)
    true_dims = np.array([bases[i].shape[1] for i in ids])
    np.testing.assert_array_equal(pieces.ranks, true_dims)
    worst = [
        np.max(scipy.linalg.subspace_angles(np.asarray(pieces.bases[i, :, :r]), bases[ids[i]]))
        for i, r in enumerate(np.asarray(pieces.ranks))
    ]
    assert np.degrees(np.median(worst)) < 2.0 and np.degrees(np.max(worst)) < 10.0
    assert neighbourhood_purity(table, piece_members(pieces, table), ids) == 1.0


def test_subset_selection_stops_at_a_corner():
    # Two perpendicular segments meeting at a corner: near it, a fixed neighbourhood spans
    # both; the grown one shrinks towards the corner and stays purer.
    rng = np.random.default_rng(2)
    t = np.linspace(0.02, 1.0, 50)
    a, b = _random_subspace(rng, 2).T
    x = np.concatenate([np.outer(t, a), np.outer(t, b)]) + 1e-4 * rng.normal(size=(100, AMBIENT))
    ids = np.repeat([0, 1], 50)
    table = np.asarray(neighbour_table(x.astype(np.float32), num_neighbours=15))
    kwargs = dict(max_rank=1, error_threshold=0.02)
    grown = fit_linear_pieces(x, table, **kwargs)
    fixed = fit_linear_pieces(x, table, **kwargs, subset_selection=False)
    near = np.concatenate([t, t]) < 0.4

    def purity_near_corner(pieces):
        members = np.asarray(piece_members(pieces, table))
        return neighbourhood_purity(table, members & near[:, None], ids)  # others left out

    assert purity_near_corner(grown) > purity_near_corner(fixed) + 0.04
    sizes = np.asarray(grown.sizes)
    assert np.all(np.diff(sizes[:8]) >= 0) and sizes[0] < 5 and np.all(sizes[20:50] == 16)


def test_fit_chunking_and_jit_do_not_change_the_pieces():
    x, _, _ = lines_and_planes()
    table = neighbour_table(x, num_neighbours=8)
    kwargs = dict(max_rank=2, error_threshold=0.05)
    whole = fit_linear_pieces(x, table, **kwargs, chunk_size=1024)
    chunked = fit_linear_pieces(x, table, **kwargs, chunk_size=37)
    traced = jax.jit(lambda e, t: fit_linear_pieces(e, t, **kwargs, chunk_size=37))(x, table)
    for other in (chunked, traced):
        for field, a, b in zip(LinearPieces._fields, whole, other):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=field)


def test_fit_rejects_bad_arguments():
    x = np.zeros((5, 3), np.float32)
    table = np.zeros((5, 4), np.int32)
    with pytest.raises(ValueError, match="max_rank"):
        fit_linear_pieces(x, table, max_rank=4, error_threshold=0.1)
    with pytest.raises(ValueError, match="error_threshold"):
        fit_linear_pieces(x, table, max_rank=1, error_threshold=1.5)
    with pytest.raises(ValueError, match="min_size"):
        fit_linear_pieces(x, table, max_rank=2, error_threshold=0.1, min_size=2)
    with pytest.raises(ValueError, match="neighbours"):
        fit_linear_pieces(x, table[:3], max_rank=1, error_threshold=0.1)


# --------------------------------------------------------------------------------------
# Similarity
# --------------------------------------------------------------------------------------


def _reference_similarity(points, anchors, bases, scales, n_alpha, n_beta, mode):
    points, anchors = np.float64(points), np.float64(anchors)
    out = np.zeros((len(points), len(anchors)))
    for m, x in enumerate(points):
        for b, a in enumerate(anchors):
            u = np.float64(bases[b])
            v = x - a
            inplane = np.linalg.norm(u.T @ v)
            orthogonal = np.linalg.norm(v - u @ (u.T @ v))
            s = scales[b]
            if mode == "binary":
                out[m, b] = float(orthogonal <= s and inplane <= s)
                continue
            out[m, b] = 1 / (1 + (orthogonal / s) ** n_alpha)
            if mode == "continuous":
                out[m, b] *= 1 / (1 + (inplane / s) ** n_beta)
    return out


def _random_pieces(rng, count, dim=6, max_rank=3):
    anchors = rng.normal(size=(count, dim)).astype(np.float32)
    bases = np.stack([np.linalg.qr(rng.normal(size=(dim, max_rank)))[0] for _ in range(count)])
    ranks = rng.integers(1, max_rank + 1, size=count)
    bases = (bases * (np.arange(max_rank) < ranks[:, None])[:, None, :]).astype(np.float32)
    scales = rng.uniform(0.5, 2.0, size=count).astype(np.float32)
    return anchors, bases, scales


@pytest.mark.parametrize("mode", ["continuous", "binary", "orthogonal_only"])
def test_similarity_matches_a_float64_reference(mode):
    rng = np.random.default_rng(3)
    anchors, bases, scales = _random_pieces(rng, 7)
    points = rng.normal(size=(9, 6)).astype(np.float32)
    got = jax.jit(functools.partial(piece_similarity, mode=mode))(points, anchors, bases, scales)
    ref = _reference_similarity(points, anchors, bases, scales, 3.0, 0.5, mode)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        piece_similarity(anchors, anchors, bases, scales, mode=mode).diagonal(), 1.0
    )


def test_orthogonal_decay_is_faster_than_in_plane():
    basis = np.zeros((1, 4, 1), np.float32)
    basis[0, 0, 0] = 1.0
    anchor, scale = np.zeros((1, 4), np.float32), np.ones(1, np.float32)
    t = np.array([0.25, 1.5, 2.0, 4.0, 8.0], np.float32)
    along = np.zeros((5, 4), np.float32)
    along[:, 0] = t
    across = np.zeros((5, 4), np.float32)
    across[:, 1] = t
    s_along = np.asarray(piece_similarity(along, anchor, basis, scale))[:, 0]
    s_across = np.asarray(piece_similarity(across, anchor, basis, scale))[:, 0]
    assert np.all(np.diff(s_along) < 0) and np.all(np.diff(s_across) < 0)
    # Beyond one length scale the orthogonal factor falls faster, increasingly so.
    assert np.all(s_across[1:] < s_along[1:])
    assert np.all(np.diff(s_across[1:] / s_along[1:]) < 0)


def test_similarity_is_higher_within_a_piece_than_across():
    x, ids, _ = lines_and_planes()
    table = neighbour_table(x, num_neighbours=12)
    pieces = fit_linear_pieces(x, table, max_rank=3, error_threshold=0.05)
    rng = np.random.default_rng(4)
    rows = rng.integers(0, len(x), size=4000)
    cols = rng.integers(0, len(x), size=4000)
    s = np.asarray(pair_similarities(x, pieces, rows, cols))
    same = ids[rows] == ids[cols]
    assert s[same].min() > s[~same].max()
    assert similarity_correlation(s, same) > 0.5
    binary = np.asarray(pair_similarities(x, pieces, rows, cols, mode="binary"))
    assert binary[~same].max() == 0.0


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def _batch(seed=5, batch=8, dim=4, proxies=3, k=5):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return dict(
        embeddings=rng.normal(size=(batch, dim)).astype(f32),
        similarities=rng.uniform(size=(batch, batch)).astype(f32),
        proxies=rng.normal(size=(proxies, dim)).astype(f32),
        proxy_similarities=rng.uniform(size=(batch, proxies)).astype(f32),
        neighbour_embeddings=rng.normal(size=(batch, k, dim)).astype(f32),
        neighbour_similarities=rng.uniform(size=(batch, k)).astype(f32),
        mask=rng.uniform(size=(batch, k)) < 0.6,
    )


def _ref_term(a, b, s, delta, mask=None):
    a, b, s = np.float64(a), np.float64(b), np.float64(s)
    total, count = 0.0, 0
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            if mask is not None and not mask[i, j]:
                continue
            other = b[j] if b.ndim == 2 else b[i, j]
            total += (delta * (1 - s[i, j]) - np.linalg.norm(a[i] - other)) ** 2
            count += 1
    return total / count


def test_loss_terms_match_float64_references():
    d = _batch()
    delta = 1.7
    diag = ~np.eye(8, dtype=bool)
    point = jax.jit(functools.partial(plm_point_loss, delta=delta))(
        d["embeddings"], d["similarities"]
    )
    ref_point = _ref_term(d["embeddings"], d["embeddings"], d["similarities"], delta, diag)
    np.testing.assert_allclose(point, ref_point, rtol=1e-5)
    proxy = plm_proxy_loss(d["embeddings"], d["proxies"], d["proxy_similarities"], delta=delta)
    ref_proxy = _ref_term(d["embeddings"], d["proxies"], d["proxy_similarities"], delta)
    np.testing.assert_allclose(proxy, ref_proxy, rtol=1e-5)
    args = (d["embeddings"], d["neighbour_embeddings"], d["neighbour_similarities"], d["mask"])
    neighbourhood = plm_neighbourhood_loss(*args, delta=delta)
    ref_neighbourhood = _ref_term(
        d["embeddings"], d["neighbour_embeddings"], d["neighbour_similarities"], delta, d["mask"]
    )
    np.testing.assert_allclose(neighbourhood, ref_neighbourhood, rtol=1e-5)
    targets = PLMTargets(d["similarities"], d["proxy_similarities"], d["neighbour_similarities"])
    terms = plm_loss(
        d["embeddings"],
        targets,
        proxies=d["proxies"],
        neighbour_embeddings=d["neighbour_embeddings"],
        neighbour_mask=d["mask"],
        delta=delta,
        proxy_weight=0.5,
        neighbourhood_weight=2.0,
    )
    np.testing.assert_allclose(
        terms.loss, ref_point + 0.5 * ref_proxy + 2.0 * ref_neighbourhood, rtol=1e-5
    )
    only_points = plm_loss(d["embeddings"], targets, delta=delta)
    np.testing.assert_allclose(only_points.loss, ref_point, rtol=1e-5)
    assert only_points.proxy == 0 and only_points.neighbourhood == 0


def test_targets_match_the_similarity_of_each_piece():
    rng = np.random.default_rng(6)
    anchors, bases, scales = _random_pieces(rng, 6)
    proxies = rng.normal(size=(4, 6)).astype(np.float32)
    neighbours = rng.normal(size=(6, 3, 6)).astype(np.float32)
    targets = jax.jit(plm_targets)(
        anchors, bases, scales, proxies=proxies, neighbour_embeddings=neighbours
    )
    s = _reference_similarity(anchors, anchors, bases, scales, 3.0, 0.5, "continuous")
    np.testing.assert_allclose(targets.points, (s + s.T) / 2, rtol=1e-4, atol=1e-7)
    one_way = plm_targets(anchors, bases, scales, symmetric=False)
    np.testing.assert_allclose(one_way.points, s, rtol=1e-4, atol=1e-7)
    ref_proxies = _reference_similarity(proxies, anchors, bases, scales, 3.0, 0.5, "continuous")
    np.testing.assert_allclose(targets.proxies, ref_proxies.T, rtol=1e-4, atol=1e-7)
    for i in range(6):
        ref = _reference_similarity(
            neighbours[i],
            anchors[i : i + 1],
            bases[i : i + 1],
            scales[i : i + 1],
            3.0,
            0.5,
            "continuous",
        )[:, 0]
        np.testing.assert_allclose(targets.neighbours[i], ref, rtol=1e-4, atol=1e-7)


def test_loss_gradients():
    d = _batch()
    targets = PLMTargets(d["similarities"], d["proxy_similarities"], d["neighbour_similarities"])

    def total(embeddings, proxies, neighbour_embeddings):
        return plm_loss(
            embeddings,
            targets,
            proxies=proxies,
            neighbour_embeddings=neighbour_embeddings,
            neighbour_mask=d["mask"],
        ).loss

    args = (d["embeddings"], d["proxies"], d["neighbour_embeddings"])
    check_grads(
        jax.jit(lambda e, p: total(e, p, args[2])),
        args[:2],
        order=1,
        modes=("rev",),
        eps=1e-2,
        atol=2e-2,
        rtol=2e-2,
    )
    # The targets and the stored neighbour embeddings are constants.
    grads = jax.grad(total, argnums=2)(*args)
    np.testing.assert_array_equal(grads, 0.0)
    # Duplicate points (a batch drawing a point twice) give finite gradients.
    doubled = np.concatenate([d["embeddings"][:4], d["embeddings"][:4]])
    g = jax.grad(plm_point_loss)(doubled, np.ones((8, 8), np.float32))
    assert np.all(np.isfinite(g))


def test_loss_jit_equals_eager_and_sharded_equals_single_device():
    d = _batch(batch=16)
    targets = PLMTargets(d["similarities"], d["proxy_similarities"], d["neighbour_similarities"])

    def total(embeddings, neighbour_embeddings, mask):
        return plm_loss(
            embeddings,
            targets,
            proxies=d["proxies"],
            neighbour_embeddings=neighbour_embeddings,
            neighbour_mask=mask,
        ).loss

    args = (d["embeddings"], d["neighbour_embeddings"], d["mask"])
    eager = total(*args)
    np.testing.assert_allclose(jax.jit(total)(*args), eager, rtol=1e-6)
    devices = np.array(jax.devices()[:4])
    if devices.size < 2:
        pytest.skip("needs several devices")
    mesh = jax.sharding.Mesh(devices, ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = jax.jit(total)(*[jax.device_put(a, rows) for a in args])
    np.testing.assert_allclose(sharded, eager, rtol=1e-5)


def test_fit_on_sharded_embeddings_equals_single_device():
    x, _, _ = lines_and_planes()
    devices = np.array(jax.devices()[:4])
    if devices.size < 2:
        pytest.skip("needs several devices")
    table = neighbour_table(x, num_neighbours=8)
    mesh = jax.sharding.Mesh(devices, ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    kwargs = dict(max_rank=2, error_threshold=0.05, chunk_size=64)
    single = fit_linear_pieces(x, table, **kwargs)
    sharded = fit_linear_pieces(jax.device_put(x, rows), jax.device_put(table, rows), **kwargs)
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_loss_rejects_bad_shapes():
    d = _batch()
    with pytest.raises(ValueError, match="similarities"):
        plm_point_loss(d["embeddings"], d["similarities"][:4])
    with pytest.raises(ValueError, match="proxies"):
        plm_proxy_loss(d["embeddings"], d["proxies"][:, :2], d["proxy_similarities"])
    with pytest.raises(ValueError, match="delta"):
        plm_point_loss(d["embeddings"], d["similarities"], delta=0.0)
    with pytest.raises(ValueError, match="mask"):
        plm_neighbourhood_loss(
            d["embeddings"], d["neighbour_embeddings"], d["neighbour_similarities"], d["mask"][:2]
        )


# --------------------------------------------------------------------------------------
# Sampler, momentum encoder, quality metrics
# --------------------------------------------------------------------------------------


def test_anchor_batches_are_anchors_followed_by_their_neighbours():
    table = np.arange(40, dtype=np.int32).reshape(10, 4) % 10
    indices = jax.jit(
        functools.partial(sample_anchor_batch, num_anchors=5, neighbours_per_anchor=3)
    )(table, jax.random.key(0))
    groups = np.asarray(indices).reshape(5, 4)
    np.testing.assert_array_equal(groups[:, 1:], table[groups[:, 0], :3])
    again = sample_anchor_batch(table, jax.random.key(0), num_anchors=5, neighbours_per_anchor=3)
    np.testing.assert_array_equal(indices, again)
    with pytest.raises(ValueError, match="neighbours_per_anchor"):
        sample_anchor_batch(table, jax.random.key(0), num_anchors=5, neighbours_per_anchor=5)


def test_ema_update():
    ema = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    new = {"w": np.full((2, 3), 3.0, np.float32), "b": np.full(3, -2.0, np.float32)}
    out = jax.jit(functools.partial(ema_update, momentum=0.75))(ema, new)
    np.testing.assert_allclose(out["w"], 0.75 * 1 + 0.25 * 3)
    np.testing.assert_allclose(out["b"], 0.25 * -2.0)
    np.testing.assert_allclose(ema_update(ema, new, momentum=0.0)["w"], new["w"])
    with pytest.raises(ValueError, match="momentum"):
        ema_update(ema, new, momentum=1.5)


def test_purity_and_correlation_against_brute_force():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, size=30)
    table = np.stack([rng.choice(np.delete(np.arange(30), i), 5, replace=False) for i in range(30)])
    mask = rng.uniform(size=(30, 5)) < 0.5
    mask[0] = False  # an empty neighbourhood is left out
    shares = [np.mean(labels[table[i][mask[i]]] == labels[i]) for i in range(30) if mask[i].any()]
    np.testing.assert_allclose(neighbourhood_purity(table, mask, labels), np.mean(shares))
    clusters = rng.integers(10, 15, size=30)
    brute = [
        np.mean(labels[(clusters == clusters[i]) & (np.arange(30) != i)] == labels[i])
        for i in range(30)
        if np.sum(clusters == clusters[i]) > 1
    ]
    np.testing.assert_allclose(assignment_purity(clusters, labels), np.mean(brute))
    s = rng.uniform(size=50)
    same = rng.uniform(size=50) < 0.3
    np.testing.assert_allclose(
        similarity_correlation(s, same), scipy.stats.pearsonr(s, same).statistic
    )


# --------------------------------------------------------------------------------------
# Unsupervised demo: labels are never read, held-out classes get easier to retrieve
# --------------------------------------------------------------------------------------


def _manifold_classes(rng, classes, per_class):
    """Classes on 2-D patches: semantic offset in 4 dims, patch in 3 shared nuisance dims.

    The patches of different classes cross in the nuisance dims, so raw nearest neighbours
    are often of another class; a map that shrinks the nuisance dims fixes that, also for
    classes never seen.
    """
    xs, ys = [], []
    for c in range(classes):
        centre = np.concatenate([0.3 * rng.normal(size=4), rng.normal(size=3)])
        basis = np.zeros((7, 2))
        basis[4:] = np.linalg.qr(rng.normal(size=(3, 2)))[0]
        coords = rng.uniform(-3, 3, size=(per_class, 2))
        xs.append(centre + coords @ basis.T + 0.05 * rng.normal(size=(per_class, 7)))
        ys.append(np.full(per_class, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def _recall_at_1(z, labels):
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float(np.mean(labels[d.argmin(1)] == labels))


def _train_plm(dataset, *, steps=100, refresh_every=25, seed=0):
    """Trains a linear embedding of ``dataset["x"]`` with the PLM loss only."""
    x = jnp.asarray(dataset["x"])
    dim = x.shape[1]
    params = {
        "w": jnp.eye(dim),
        "proxies": jax.random.normal(jax.random.key(seed), (20, dim)),
    }
    ema = params["w"]
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, ema, stored, table, pieces, key):
        batch = sample_anchor_batch(table, key, num_anchors=8, neighbours_per_anchor=7)
        neighbour_embeddings = stored[table[batch]]
        targets = plm_targets(
            x[batch] @ ema,
            pieces.bases[batch],
            pieces.radii[batch],
            proxies=params["proxies"],
            neighbour_embeddings=neighbour_embeddings,
        )

        def loss(p):
            return plm_loss(
                x[batch] @ p["w"],
                targets,
                proxies=p["proxies"],
                neighbour_embeddings=neighbour_embeddings,
                neighbour_mask=piece_members(pieces, table)[batch],
                delta=2.0,
            ).loss

        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, ema_update(ema, params["w"], momentum=0.9)

    key = jax.random.key(seed)
    for it in range(steps):
        if it % refresh_every == 0:
            stored = x @ ema
            table = neighbour_table(stored, num_neighbours=8)
            pieces = fit_linear_pieces(stored, table, max_rank=3, error_threshold=0.1)
        key, sub = jax.random.split(key)
        params, opt_state, ema = step(params, opt_state, ema, stored, table, pieces, sub)
    return np.asarray(params["w"])


@pytest.mark.slow
def test_unsupervised_plm_improves_recall_on_held_out_classes():
    rng = np.random.default_rng(0)
    x_train, y_train = _manifold_classes(rng, 10, 30)
    x_test, y_test = _manifold_classes(rng, 10, 30)
    w = _train_plm({"x": x_train, "y": y_train})
    before = _recall_at_1(x_test, y_test)
    after = _recall_at_1(x_test @ w, y_test)
    assert before < 0.9 and after > before + 0.05
    permuted = _train_plm({"x": x_train, "y": rng.permutation(y_train)})
    np.testing.assert_array_equal(permuted, w)
