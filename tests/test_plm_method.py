"""``--loss plm``: the piecewise-linear manifold method inside the trainer.

Configuration and its errors, the abstract state against a refreshed one, the batch the
method draws against the manifold model's functions, the EMA against a NumPy reference,
jit == eager on a step, labels never read (permuted or zeroed labels give the identical
run), sharded == single device, and checkpoints that resume bit-identical (EMA included).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from magnet_jax import config, manifolds, methods, names, training
from magnet_jax.checkpoint import Checkpointer
from magnet_jax.config import TrainConfig
from magnet_jax.data import Dataset
from magnet_jax.losses import plm as plm_losses
from magnet_jax.methods.plm import PLM, PLMState, _ema


def _lines(num_classes=4, per_class=16, dim=6, seed=0):
    """Each class: noisy points along its own random line (a one-dimensional manifold)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    offsets = 3.0 * rng.normal(size=(num_classes, dim))
    directions = rng.normal(size=(num_classes, dim))
    t = rng.uniform(-2, 2, size=len(y))
    x = offsets[y] + t[:, None] * directions[y] + 0.05 * rng.normal(size=(len(y), dim))
    names_ = tuple(str(c) for c in range(num_classes))
    return Dataset(
        name="lines",
        x_train=x.astype(np.float32),
        y_train=y,
        x_test=x[::2].astype(np.float32),
        y_test=y[::2],
        class_names=names_,
    )


SMALL = dict(
    loss="plm",
    embedding_dim=8,
    normalize=True,
    clusters_per_batch=4,
    examples_per_cluster=3,
    plm_neighbours=6,
    plm_max_rank=2,
    plm_proxies=5,
    plm_momentum=0.9,
    lr_schedule="constant",
    num_devices=1,
)


def _config(**overrides) -> TrainConfig:
    return TrainConfig(**{**SMALL, "workdir": "/nonexistent-unused", **overrides})


def _leaves_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------


def test_plm_is_registered_and_configured():
    assert "plm" in names.LOSSES and methods.METHODS["plm"] is PLM and not PLM.needs_labels
    plm_fields = [n for n, f in config.FIELDS.items() if n.startswith("plm_")]
    assert plm_fields and all(config.FIELDS[n].group == "plm" for n in plm_fields)
    assert all(config.FIELDS[n].help for n in plm_fields)
    assert config.FIELDS["plm_similarity"].choices == names.PLM_SIMILARITIES
    method = methods.from_config(
        _config(plm_similarity="binary", plm_subset_selection=False, plm_delta=0.5)
    )
    assert (method.anchors_per_batch, method.neighbours_per_anchor) == (4, 2)
    assert method.batch_size == 12 and method.num_neighbours == 6 and method.num_proxies == 5
    assert (method.similarity, method.subset_selection, method.delta) == ("binary", False, 0.5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"plm_similarity": "cosine"}, "unknown --plm-similarity 'cosine'"),
        ({"plm_max_rank": 7}, "--plm-max-rank 7 must be <= --plm-neighbours 6"),
        ({"plm_error_threshold": 1.5}, "--plm-error-threshold must be in"),
        ({"plm_inplane_exponent": 0.0}, "--plm-inplane-exponent must be > 0"),
        ({"plm_proxies": -1}, "--plm-proxies must be >= 0"),
        ({"plm_momentum": 1.2}, "--plm-momentum must be in"),
    ],
)
def test_bad_plm_flags_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides).validate()


def test_data_checks_name_flags():
    with pytest.raises(ValueError, match="--plm-neighbours k=6 needs more than k"):
        training.prepare(_config(), _lines(num_classes=1, per_class=6))
    with pytest.raises(ValueError, match="--examples-per-cluster D=8"):
        training.prepare(_config(examples_per_cluster=8), _lines())


# --------------------------------------------------------------------------------------
# State, batch and step.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refreshed():
    run = training.prepare(_config(), _lines())
    state = training.refresh(run, run.initial_state, None, 0)
    return run, state


def test_abstract_state_matches_a_refreshed_state(refreshed):
    run, state = refreshed
    abstract = run.method.abstract_state(run.info)
    assert isinstance(state, PLMState)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    # The momentum copy starts as the network's parameters.
    _leaves_equal(state.ema, training.model_params(run.initial_state.params))
    assert run.initial_state.params["method"]["proxies"].shape == (5, 8)


def test_refresh_fits_the_momentum_embeddings(refreshed):
    run, state = refreshed
    embeddings = run.steps.embed(state.ema, run.data.x)
    np.testing.assert_allclose(state.embeddings, embeddings, rtol=1e-6, atol=1e-6)
    table = manifolds.neighbour_table(embeddings, num_neighbours=6)
    np.testing.assert_array_equal(state.neighbours, table)
    pieces = manifolds.fit_linear_pieces(embeddings, table, max_rank=2, error_threshold=0.2)
    for a, b in zip(pieces, state.pieces, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_batch_is_anchors_and_their_pieces(refreshed):
    run, state = refreshed
    key = jax.random.PRNGKey(3)
    batch = run.method.sample(state, key, run.data)
    expected = manifolds.sample_anchor_batch(
        state.neighbours, key, num_anchors=4, neighbours_per_anchor=2
    )
    np.testing.assert_array_equal(batch.indices, expected)
    rows = np.asarray(batch.indices)
    np.testing.assert_array_equal(batch.targets, np.asarray(state.embeddings)[rows])
    np.testing.assert_array_equal(batch.bases, np.asarray(state.pieces.bases)[rows])
    np.testing.assert_array_equal(batch.scales, np.asarray(state.pieces.radii)[rows])
    table = np.asarray(state.neighbours)[rows]
    np.testing.assert_array_equal(batch.neighbour_embeddings, np.asarray(state.embeddings)[table])
    sizes = np.asarray(state.pieces.sizes)[rows]
    np.testing.assert_array_equal(batch.neighbour_mask, np.arange(6)[None] < sizes[:, None] - 1)


def test_method_loss_is_the_plm_objective(refreshed):
    run, state = refreshed
    batch = run.method.sample(state, jax.random.PRNGKey(0), run.data)
    params = run.initial_state.params
    model = run.model(params)
    embeddings = model(run.data.x[batch.indices])
    loss, stats = run.method.loss(model, params, embeddings, batch)
    proxies = params["method"]["proxies"]
    targets = plm_losses.plm_targets(
        batch.targets,
        batch.bases,
        batch.scales,
        proxies=proxies,
        neighbour_embeddings=batch.neighbour_embeddings,
    )
    terms = plm_losses.plm_loss(
        embeddings,
        targets,
        proxies=proxies,
        neighbour_embeddings=batch.neighbour_embeddings,
        neighbour_mask=batch.neighbour_mask,
    )
    np.testing.assert_allclose(loss, terms.loss, rtol=1e-6)
    np.testing.assert_allclose(loss, stats.point + stats.proxy + stats.neighbourhood, rtol=1e-6)
    assert float(stats.proxy) > 0 and float(stats.neighbourhood) > 0


def test_ema_against_numpy_and_exact_on_unchanged_leaves():
    rng = np.random.default_rng(0)
    ema = {"a": rng.normal(size=(3, 4)).astype(np.float32), "n": np.int32(4)}
    new = {"a": rng.normal(size=(3, 4)).astype(np.float32), "n": np.int32(7)}
    out = _ema(jax.tree.map(jnp.asarray, ema), jax.tree.map(jnp.asarray, new), 0.9)
    reference = 0.9 * ema["a"].astype(np.float64) + 0.1 * new["a"].astype(np.float64)
    np.testing.assert_allclose(out["a"], reference, rtol=1e-6)
    assert out["a"].dtype == jnp.float32 and int(out["n"]) == 7
    same = _ema({"a": jnp.asarray(ema["a"])}, {"a": jnp.asarray(ema["a"])}, 0.37)
    np.testing.assert_array_equal(same["a"], ema["a"])


def _step(method, run):
    """One step of the method (sample, loss and its gradient, EMA update) without the
    optimizer: ``(state, params, key) -> (loss, grads, new state)``."""

    def step(state, params, key):
        batch = method.sample(state, key, run.data)

        def loss_of(params):
            model = nnx.merge(run.graphdef, nnx.State(training.model_params(params)))
            return method.loss(model, params, model(run.data.x[batch.indices]), batch)

        (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        new_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return loss, grads, method.update(state, batch, (), new_params)

    return step


def test_step_jit_equals_eager(refreshed):
    run, state = refreshed
    step = _step(run.method, run)
    key = jax.random.PRNGKey(1)
    eager = step(state, run.initial_state.params, key)
    jitted = jax.jit(step)(state, run.initial_state.params, key)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    loss, grads, new_state = eager
    assert float(jnp.abs(grads["method"]["proxies"]).sum()) > 0
    # The momentum copy moved a tenth of the way towards the updated parameters.
    model_grads = training.model_params(grads)
    moved = jax.tree.map(lambda e, g: e - 0.1 * 0.1 * g, state.ema, model_grads)
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(new_state.ema), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------
# Runs: labels never read, sharded == single device, exact resume.
# --------------------------------------------------------------------------------------


def _curve(dataset, **overrides):
    """Final parameters and method state of 5 steps (refreshes at 0, 2 and 4)."""
    run = training.prepare(_config(refresh_every=2, **overrides), dataset)
    curve = training.learning_curve(run, [5], evaluators=())
    return curve["state"].params, curve["method_state"]


@pytest.mark.slow
def test_labels_are_never_read():
    dataset = _lines()
    straight = _curve(dataset)
    rng = np.random.default_rng(1)
    permuted = dataclasses.replace(dataset, y_train=rng.permutation(dataset.y_train))
    zeroed = dataclasses.replace(dataset, y_train=np.zeros_like(dataset.y_train))
    _leaves_equal(straight, _curve(permuted))
    _leaves_equal(straight, _curve(zeroed))


@pytest.mark.slow
def test_sharded_equals_single_device():
    single = _curve(_lines())
    sharded = _curve(_lines(), num_devices=4)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        if jnp.issubdtype(a.dtype, jnp.integer):
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_resumes_bit_identical(tmp_path):
    base = dict(
        steps=8, refresh_every=3, eval_every=8, checkpoint_every=4, log_every=2, eval_chunk_size=32
    )
    training.train(_config(**base, workdir=str(tmp_path / "a")), progress=False, dataset=_lines())
    half = _config(**{**base, "steps": 4}, workdir=str(tmp_path / "b"))
    training.train(half, progress=False, dataset=_lines())
    training.train(dataclasses.replace(half, steps=8), progress=False, dataset=_lines())

    def final(workdir):
        # The run's own data, not what config.json names (the test passes a dataset).
        run = training.prepare(_config(**base, workdir=str(workdir)), _lines())
        checkpointer = Checkpointer(workdir / "checkpoints")
        restored = checkpointer.restore_latest(
            run.initial_state, training.method_state_template(run)
        )
        checkpointer.close()
        assert restored.step == 8
        return run, restored.state, restored.index

    final_a, final_b = final(tmp_path / "a"), final(tmp_path / "b")
    assert isinstance(final_a[2], PLMState)
    _leaves_equal((final_a[1].params, final_a[2]), (final_b[1].params, final_b[2]))
    # The momentum copy moved away from its start.
    start = training.model_params(final_a[0].initial_state.params)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(final_a[2].ema), jax.tree.leaves(start), strict=True)
    )
