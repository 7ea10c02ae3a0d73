"""The method interface: registries, abstract state, clusterer values, evaluators, a
label-free method with its own parameters and state, checkpoints, and equality with the
results recorded before the interface existed."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax import clustering, config, evaluators, methods, names, training
from magnet_jax.checkpoint import Checkpointer
from magnet_jax.config import TrainConfig
from magnet_jax.data import Dataset, load_dataset
from magnet_jax.index import NeighbourhoodBatch, build_index, refresh_index
from magnet_jax.losses import triplet
from magnet_jax.methods.base import DataInfo, Method

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from record_equality import STEPS, equality_config  # noqa: E402

EXPECTED = json.loads((REPO / "tests" / "data" / "equality.json").read_text())
# The trainer as it was before the method interface (the code that recorded
# tests/data/equality.json): its checkpoints must still resume.
BEFORE_INTERFACE = "60006e3c2266cc34da81e1b58cdfb68a3fa2d48a"


# --------------------------------------------------------------------------------------
# Registries: every name has exactly one implementation.
# --------------------------------------------------------------------------------------


def test_every_name_list_has_one_source():
    assert tuple(methods.METHODS) == names.LOSSES
    assert all(cls.name == name for name, cls in methods.METHODS.items())
    assert tuple(clustering.CLUSTERERS) == names.CLUSTERINGS == clustering.METHODS
    assert triplet._MINING is names.MININGS
    assert config.LOSSES is names.LOSSES and config.LINKAGES is names.LINKAGES
    for field, allowed in (
        ("loss", names.LOSSES),
        ("clustering", names.CLUSTERINGS),
        ("linkage", names.LINKAGES),
        ("mining", names.MININGS),
    ):
        for value in allowed:
            TrainConfig(**{field: value}).validate()
        # Errors name the flag (--lr-schedule), the field's command-line spelling.
        with pytest.raises(ValueError, match=f"unknown --{field.replace('_', '-')} 'nope'"):
            TrainConfig(**{field: "nope"}).validate()


def test_from_config_carries_the_hyperparameters():
    cfg = TrainConfig(
        loss="magnet", clustering="agglomerative", linkage="average", cluster_subsample=50
    )
    method = methods.from_config(cfg)
    assert method.clusterer == clustering.Agglomerative(linkage="average", max_points_per_class=50)
    assert method.batch_size == cfg.batch_size
    trip = methods.from_config(TrainConfig(loss="triplet", margin=0.3, mining="semi_hard"))
    assert (trip.margin, trip.mining, trip.classes_per_batch) == (0.3, "semi_hard", 8)
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        methods.get_method_class("nope")


# --------------------------------------------------------------------------------------
# Clusterers are values; build_index keeps its flat keywords.
# --------------------------------------------------------------------------------------


def _blobs(num_classes=3, per_class=40, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    modes = rng.integers(0, 2, size=len(labels))
    embeddings = rng.normal(size=(len(labels), dim)) * 0.1 + 3.0 * modes[:, None] + labels[:, None]
    return jnp.asarray(embeddings, jnp.float32), jnp.asarray(labels)


@pytest.mark.parametrize(
    "flat, value",
    [
        (
            {"clustering": "kmeans", "max_iterations": 7, "num_restarts": 2},
            clustering.KMeans(max_iterations=7, num_restarts=2),
        ),
        (
            {"clustering": "agglomerative", "linkage": "average", "max_points_per_class": 30},
            clustering.Agglomerative(linkage="average", max_points_per_class=30),
        ),
    ],
)
def test_clusterer_value_equals_flat_options(flat, value):
    embeddings, labels = _blobs()
    key = jax.random.PRNGKey(4)
    common = {"clusters_per_class": 2, "num_impostors": 3, "key": key}
    by_flat = build_index(embeddings, labels, **common, **flat)
    by_value = build_index(embeddings, labels, **common, clusterer=value)
    for a, b in zip(jax.tree.leaves(by_flat), jax.tree.leaves(by_value), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again_flat = refresh_index(by_flat, embeddings * 2.0, key=key, **flat)
    again_value = refresh_index(by_value, embeddings * 2.0, key=key, clusterer=value)
    for a, b in zip(jax.tree.leaves(again_flat), jax.tree.leaves(again_value), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_clusterer_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown linkage 'median'"):
        clustering.Agglomerative(linkage="median")
    with pytest.raises(ValueError, match="unknown clustering method 'dbscan'"):
        clustering.clusterer_from_options("dbscan")


# --------------------------------------------------------------------------------------
# Abstract state: the shapes of a refresh, without one.
# --------------------------------------------------------------------------------------


def _tiny_dataset(num_classes=3, per_class=12, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    x = (rng.normal(size=(len(y), dim)) + y[:, None]).astype(np.float32)
    names_ = tuple(str(c) for c in range(num_classes))
    return Dataset(
        name="tiny", x_train=x, y_train=y, x_test=x[::3], y_test=y[::3], class_names=names_
    )


def test_magnet_abstract_state_matches_a_built_and_a_refreshed_index():
    run = training.prepare(
        TrainConfig(
            loss="magnet",
            kmeans_iterations=3,
            clusters_per_class=2,
            clusters_per_batch=3,
            examples_per_cluster=2,
            embedding_dim=5,
            num_devices=1,
        ),
        _tiny_dataset(),
    )
    built = training.refresh(run, run.initial_state, None, 0)
    refreshed = training.refresh(run, run.initial_state, built, 1)
    abstract = run.method.abstract_state(run.info)
    for concrete in (built, refreshed):
        assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
        for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete), strict=True):
            assert (a.shape, a.dtype) == (c.shape, c.dtype)
    template = training.method_state_template(run)
    assert all(leaf.sharding is not None for leaf in jax.tree.leaves(template))


def test_stateless_methods_checkpoint_no_method_state():
    for name in names.LOSSES:
        cls = methods.get_method_class(name)
        if cls.has_refresh:
            continue
        method = methods.from_config(TrainConfig(loss=name))
        info = DataInfo(10, 2, ("a", "b"), np.zeros(10, np.int32), 4)
        assert not methods.has_state(method.init_state(info)), name
        assert not jax.tree.leaves(method.abstract_state(info)), name


# --------------------------------------------------------------------------------------
# Step metrics: the share of examples with a non-zero loss ("active").
# --------------------------------------------------------------------------------------


def _active(method, embeddings, labels, cluster_ids=None):
    embeddings = jnp.asarray(embeddings, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if cluster_ids is None:
        batch = methods.LabelledBatch(jnp.arange(len(labels)), labels)
    else:
        batch = NeighbourhoodBatch(jnp.arange(len(labels)), labels, jnp.asarray(cluster_ids))
    _, stats = jax.jit(lambda e: method.loss(None, None, e, batch))(embeddings)
    metrics = method.step_metrics(stats)
    assert set(metrics) == {"active"}
    return float(metrics["active"])


def test_magnet_active_share_of_a_hand_computed_batch():
    # Clusters {0, 2}, {3, 5}, {20, 22} of classes 0, 1, 2: every squared distance to the
    # own mean is 1, so σ̂² = 6 / 5 = 1.2 and 2σ̂² = 2.4. With α = 2, ℓ_i > 0 when
    # 1/2.4 + 2 > -log Σ exp(-d²/2.4) over the other clusters' means (1, 4, 21):
    # x=2 (nearest other mean 4, d²=4) and x=3 (mean 1, d²=4): 0.42 + 2 - 1.67 > 0;
    # x=0 (d²=16) and x=5 (d²=16): 0.42 + 2 - 6.67 < 0; x=20, 22: far from all. 2 of 6.
    x = [[0.0], [2.0], [3.0], [5.0], [20.0], [22.0]]
    labels, clusters = [0, 0, 1, 1, 2, 2], [0, 0, 4, 4, 8, 8]
    assert _active(methods.Magnet(alpha=2.0), x, labels, clusters) == pytest.approx(2 / 6)
    # With α = 1 the margin is met everywhere (x=2: 0.42 + 1 - 1.67 < 0): the mean loss is 0.
    assert _active(methods.Magnet(alpha=1.0), x, labels, clusters) == 0.0


@pytest.mark.parametrize(
    "mining, margin, expected",
    [
        # Class 0 at {0, 1}, class 1 at {3, 10}; squared distances. Margin 0.2: only anchor
        # 3 (positive 10 at 49, negatives at 9 and 4) violates it, whatever the mining.
        ("batch_all", 0.2, 1 / 4),
        ("batch_hard", 0.2, 1 / 4),
        ("semi_hard", 0.2, 1 / 4),
        # Margin 9: anchor 0 (1 - 9 + 9 > 0) and 1 (1 - 4 + 9) too; anchor 10 (49 - 81 + 9) not.
        ("batch_all", 9.0, 3 / 4),
    ],
)
def test_triplet_active_share_of_a_hand_computed_batch(mining, margin, expected):
    method = methods.Triplet(margin=margin, mining=mining)
    assert _active(method, [[0.0], [1.0], [3.0], [10.0]], [0, 0, 1, 1]) == expected


def test_pair_losses_active_share_of_hand_computed_batches():
    # Contrastive, positive margin 0: a positive pair apart always counts, a negative pair
    # only within the margin. Class 0 identical, class 1 apart, classes 5 apart: 2 of 4.
    contrastive = methods.Contrastive(margin=0.2)
    assert _active(contrastive, [[0.0], [0.0], [5.0], [5.1]], [0, 0, 1, 1]) == 0.5
    # Multi-similarity (cosine): a0 = (1, 0), a1 = (0.6, 0.8), b0 = b1 = (0, 1). Only a1
    # keeps a pair: its positive (S = 0.6) is within ε = 0.1 of its hardest negative (0.8).
    # a0's positive is far above its negatives (S = 0); b's positive (S = 1) is above
    # their hardest negative (0.8) by more than ε. 1 of 4.
    x = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, 1.0]]
    assert _active(methods.MultiSimilarity(), x, [0, 0, 1, 1]) == 0.25


def test_softmax_type_losses_report_no_step_metrics():
    for name in ("softmax", "proxy_nca", "normalized_softmax", "arcface"):
        method = methods.from_config(TrainConfig(loss=name))
        assert method.step_metrics(()) == {}, name


def test_step_metrics_do_not_change_the_loss_or_its_gradient():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
    labels = jnp.repeat(jnp.arange(4), 4)
    batch = methods.LabelledBatch(jnp.arange(16), labels)
    method = methods.Triplet(margin=0.5)

    def loss(e):
        return method.loss(None, None, e, batch)[0]

    np.testing.assert_array_equal(loss(x), triplet.triplet_loss(x, labels, margin=0.5))
    np.testing.assert_array_equal(
        jax.grad(loss)(x), jax.grad(lambda e: triplet.triplet_loss(e, labels, margin=0.5))(x)
    )


# --------------------------------------------------------------------------------------
# Evaluators.
# --------------------------------------------------------------------------------------


def _context(y_train, y_test, *, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    dataset = Dataset(
        name="toy",
        x_train=np.zeros((len(y_train), 2), np.float32),
        y_train=np.asarray(y_train, np.int32),
        x_test=np.zeros((len(y_test), 2), np.float32),
        y_test=np.asarray(y_test, np.int32),
        class_names=tuple(str(c) for c in range(int(max(max(y_train), max(y_test))) + 1)),
    )
    return evaluators.EvalContext(
        params={},
        method_state=(),
        model=None,
        train_embeddings=jnp.asarray(rng.normal(size=(len(y_train), dim)), jnp.float32),
        test_embeddings=jnp.asarray(rng.normal(size=(len(y_test), dim)), jnp.float32),
        dataset=dataset,
    )


def test_knn_error_against_a_numpy_vote():
    context = _context([0, 0, 1, 1, 2, 2] * 3, [0, 1, 2, 0, 1, 2, 1])
    (name, value), *rest = list(evaluators.KnnError(k=1)(context))
    assert name == "knn_error" and not rest
    train = np.asarray(context.train_embeddings)
    test = np.asarray(context.test_embeddings)
    nearest = np.argmin(((test[:, None] - train[None]) ** 2).sum(-1), axis=1)
    expected = np.mean(context.dataset.y_train[nearest] != context.dataset.y_test)
    assert value == pytest.approx(expected)


def test_classification_evaluators_skip_unseen_test_classes():
    unseen = _context([0, 0, 1, 1] * 4, [2, 2, 3, 3, 2])  # class-disjoint split
    assert not unseen.test_classes_seen
    assert list(evaluators.KnnError()(unseen)) == []
    assert list(evaluators.ClassifierError()(unseen)) == []
    assert list(methods.magnet.KncError()(unseen)) == []
    retrieval = dict(evaluators.Retrieval()(unseen))
    assert "recall_at_1" in retrieval and "mean_average_precision_at_r" in retrieval
    assert list(evaluators.FineLabelErrors()(unseen)) == []
    seen = _context([0, 0, 1, 1] * 4, [0, 1, 0, 1])
    assert seen.test_classes_seen and len(list(evaluators.KnnError()(seen))) == 1


def test_run_evaluators_keeps_order_and_refuses_duplicates():
    context = _context([0, 1] * 5, [0, 1])

    def constant(ctx):
        yield "answer", 42.0

    metrics = evaluators.run_evaluators([evaluators.KnnError(), constant], context)
    assert list(metrics) == ["knn_error", "answer"] and metrics["answer"] == 42.0
    with pytest.raises(ValueError, match="two evaluators yield the metric 'answer'"):
        evaluators.run_evaluators([constant, constant], context)


def test_cli_prints_every_metric_yielded(capsys):
    from magnet_jax import cli

    cli._print_metrics(
        {
            "knn_error": 0.125,
            "recall_at_1": 0.875,
            "fine_error_at_5": 0.25,
            "loss": "magnet",
            "seconds": 2.5,
            "steps": 3,
        }
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [
        "knn_error",
        "recall_at_1",
        "fine_error_at_5",
        "steps",
        "seconds",
    ]
    assert lines[1].split()[1] == "0.8750"


# --------------------------------------------------------------------------------------
# A label-free method with parameters and state of its own plugs in unchanged.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spread(Method):
    """Label-free toy: pulls embeddings towards a learnable anchor while pushing pairs
    apart; keeps an EMA copy of the anchor and, at each refresh, the embeddings' mean."""

    name = "spread"
    needs_labels = False
    has_refresh = True
    dim: int = 32

    def init_params(self, key, info):
        return {"anchor": jax.random.normal(key, (self.dim,))}

    def init_state(self, info):
        return {"ema_anchor": jnp.zeros((self.dim,)), "mean": jnp.zeros((self.dim,))}

    def abstract_state(self, info):
        return jax.eval_shape(lambda: self.init_state(info))

    def refresh(self, state, *, embed, params, data, key, diagnostics=False):
        assert data.labels is None
        mean = jnp.mean(embed(params, data.x), axis=0)
        return {**state, "mean": mean}, (
            {"mean_norm": float(jnp.linalg.norm(mean))} if diagnostics else {}
        )

    def sample(self, state, key, data):
        assert data.labels is None and data.class_table is None
        indices = jax.random.randint(key, (self.batch_size,), 0, data.x.shape[0])
        return methods.LabelledBatch(indices, jnp.zeros_like(indices))

    def loss(self, model, params, embeddings, batch):
        anchor = params["method"]["anchor"]
        pull = jnp.mean(jnp.sum((embeddings - anchor) ** 2, -1))
        spread = jnp.mean(jnp.sum((embeddings[:, None] - embeddings[None]) ** 2, -1))
        return pull - 0.1 * jnp.log1p(spread), ()

    def update(self, state, batch, stats, params):
        ema = 0.9 * state["ema_anchor"] + 0.1 * params["method"]["anchor"]
        return {**state, "ema_anchor": ema}


@pytest.fixture
def spread_registered(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "spread", _Spread)
    monkeypatch.setattr(config, "LOSSES", (*names.LOSSES, "spread"))
    # The --loss choices that config validation checks (config.FIELDS) include it too.
    loss_field = config.FIELDS["loss"]._replace(choices=(*names.LOSSES, "spread"))
    monkeypatch.setitem(config.FIELDS, "loss", loss_field)


def _digits_permuted(seed):
    dataset = load_dataset("digits")
    rng = np.random.default_rng(seed)
    return dataclasses.replace(dataset, y_train=rng.permutation(dataset.y_train))


@pytest.mark.slow
def test_label_free_method_trains_resumes_and_never_reads_labels(spread_registered, tmp_path):
    base = dict(
        loss="spread",
        steps=12,
        refresh_every=5,
        eval_every=12,
        checkpoint_every=6,
        log_every=3,
        num_devices=1,
        lr_schedule="constant",
    )
    straight = TrainConfig(**base, workdir=str(tmp_path / "a"))
    metrics = training.train(straight, progress=False, dataset=_digits_permuted(0))
    assert "recall_at_1" in metrics
    permuted = TrainConfig(**base, workdir=str(tmp_path / "b"))
    training.train(permuted, progress=False, dataset=_digits_permuted(1))
    # Interrupted after the checkpoint at step 6, then resumed.
    half = TrainConfig(**{**base, "steps": 6}, workdir=str(tmp_path / "c"))
    training.train(half, progress=False, dataset=_digits_permuted(2))
    training.train(dataclasses.replace(half, steps=12), progress=False, dataset=_digits_permuted(2))

    def final(workdir):
        run, state, method_state = training.load_for_evaluation(str(workdir))
        return state.params, method_state

    params_a, state_a = final(tmp_path / "a")
    assert set(params_a) >= {"trunk", "method"}
    for other in ("b", "c"):
        params_b, state_b = final(tmp_path / other)
        for x, y in zip(
            jax.tree.leaves((params_a, state_a)), jax.tree.leaves((params_b, state_b)), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(jnp.linalg.norm(state_a["ema_anchor"])) > 0
    refreshes = [
        json.loads(line)
        for line in (tmp_path / "a" / "history.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "refresh"
    ]
    assert [r["step"] for r in refreshes] == [0, 5, 10] and "mean_norm" in refreshes[0]


# --------------------------------------------------------------------------------------
# Checkpoints: a mismatched method state is refused with a clear message.
# --------------------------------------------------------------------------------------


def test_checkpoint_of_another_method_is_refused(tmp_path):
    small = dict(steps=1, clusters_per_batch=3, examples_per_cluster=2, num_devices=1)
    softmax = training.prepare(TrainConfig(loss="softmax", **small), _tiny_dataset())
    magnet = training.prepare(
        TrainConfig(loss="magnet", kmeans_iterations=2, clusters_per_class=2, **small),
        _tiny_dataset(),
    )
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(5, softmax.initial_state, None, {"history_lines": 0, "seconds": 0.0})
    with pytest.raises(ValueError, match="has no method state .* needs one"):
        checkpointer.restore(5, magnet.initial_state, training.method_state_template(magnet))
    index = training.refresh(magnet, magnet.initial_state, None, 0)
    checkpointer.save(6, magnet.initial_state, index, {"history_lines": 0, "seconds": 0.0})
    with pytest.raises(ValueError, match="has method state .* keeps none"):
        checkpointer.restore(6, softmax.initial_state, None)
    checkpointer.close()


# --------------------------------------------------------------------------------------
# Equality with the results recorded before the method interface (same seeds).
# --------------------------------------------------------------------------------------


def _assert_matches_record(loss: str, workdir: Path) -> None:
    expected = EXPECTED[loss]
    history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if h["kind"] == "train"]
    np.testing.assert_allclose(losses, expected["train_losses"], atol=1e-6, rtol=0)
    final = json.loads((workdir / "metrics.json").read_text())
    for name, value in expected["metrics"].items():
        assert final[name] == pytest.approx(value, abs=1e-6), (loss, name)


@pytest.mark.slow
# The methods that existed before the interface (plm came after: nothing to compare with).
@pytest.mark.parametrize("loss", [loss for loss in names.LOSSES if loss in EXPECTED])
def test_same_results_as_before_the_interface(loss, tmp_path):
    workdir = tmp_path / "run"
    training.train(equality_config(loss, str(workdir)), progress=False)
    _assert_matches_record(loss, workdir)
    # What kill -9 after the checkpoint at step STEPS/2 leaves: that checkpoint, and a
    # history with lines past it. Resuming must end with the same numbers.
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    (workdir / "metrics.json").unlink()
    training.train(equality_config(loss, str(workdir)), progress=False)
    _assert_matches_record(loss, workdir)


@pytest.mark.slow
def test_checkpoint_written_before_the_interface_resumes(tmp_path):
    """A Magnet run checkpointed by the trainer before the method interface resumes with
    the new one and ends with the recorded numbers."""
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", BEFORE_INTERFACE], capture_output=True
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {BEFORE_INTERFACE} is not in this checkout's history")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    workdir = tmp_path / "run"
    script = (
        f"import sys; sys.path[:0] = [{str(old)!r}, {str(REPO / 'tests')!r}];"
        "from record_equality import equality_config;"
        "from magnet_jax import training;"
        f"training.train(equality_config('magnet', {str(workdir)!r}), progress=False)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=old,
        env={"PYTHONPATH": str(old), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    (workdir / "metrics.json").unlink()
    training.train(equality_config("magnet", str(workdir)), progress=False)
    _assert_matches_record("magnet", workdir)


@pytest.mark.parametrize("labels", [np.zeros(0, np.int64), np.zeros(5, np.int64)])
def test_magnet_refuses_a_training_set_with_fewer_than_two_classes(labels):
    info = DataInfo(
        num_examples=len(labels),
        num_classes=3,
        class_names=["a", "b", "c"],
        labels=labels,
        embedding_dim=2,
    )
    with pytest.raises(ValueError, match="at least 2 classes"):
        methods.Magnet(clusters_per_class=1, clusters_per_batch=1).check_data(info)
