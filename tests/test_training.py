"""The trainer: sharded == single-device, exact resume after SIGKILL, end to end, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from processes import kill_once_checkpointed

from magnet_jax import cli, training
from magnet_jax.checkpoint import Checkpointer
from magnet_jax.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "magnet_jax.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _leaves_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


# Magnet and triplet losses are invariant to translating all embeddings, so some
# parameters (e.g. the bias of the last LayerNorm for units active on the whole batch) have
# an exactly-zero true gradient whose rounding noise depends on the reduction order. Adam
# divides that noise by its own magnitude and takes a ±lr step, so Adam runs on 1 and 4
# devices drift apart in those null directions even though every step computes the same
# function. SGD (momentum 0.9) shows that the step itself agrees.
@pytest.mark.parametrize(
    "loss, optimizer, remembered",
    [("magnet", "sgd", 0), ("triplet", "sgd", 0), ("softmax", "sgd", 0), ("magnet", "sgd", 5)],
)
def test_sharded_step_equals_single_device(loss, optimizer, remembered):
    """Sharded over 4 devices, the steps compute what they do on one (with
    --embedding-memory, also the memory they write)."""
    assert jax.device_count() >= 4, "conftest fakes 4 CPU devices"
    base = TrainConfig(
        embedding_memory=remembered,
        loss=loss,
        optimizer=optimizer,
        lr=0.01,
        steps=5,
        clusters_per_batch=4,
        examples_per_cluster=4,
        kmeans_iterations=10,
    )
    single = training.prepare(TrainConfig(**{**base.to_dict(), "num_devices": 1}))
    sharded = training.prepare(TrainConfig(**{**base.to_dict(), "num_devices": 4}))
    assert sharded.mesh.devices.size == 4

    index_single = (
        training.refresh(single, single.initial_state, None, 0)
        if single.method.has_refresh
        else single.method.init_state(single.info)
    )
    # The same index on both meshes, so both sample the same batches. Copied through host
    # memory: the steps donate their index, so the two runs must not share buffers.
    replicated = jax.sharding.NamedSharding(sharded.mesh, jax.sharding.PartitionSpec())
    index_sharded = jax.device_put(jax.tree.map(np.asarray, index_single), replicated)
    state_single, state_sharded = single.initial_state, sharded.initial_state
    for _ in range(5):
        state_single, index_single, loss_single = single.steps.train_step(
            state_single, index_single, single.data
        )
        state_sharded, index_sharded, loss_sharded = sharded.steps.train_step(
            state_sharded, index_sharded, sharded.data
        )
        np.testing.assert_allclose(float(loss_single), float(loss_sharded), atol=1e-5, rtol=0)
    _leaves_close(state_single.params, state_sharded.params, atol=1e-5)
    _leaves_close(state_single.memory, state_sharded.memory, atol=1e-5)
    if single.method.has_refresh:
        _leaves_close(index_single.cluster_loss, index_sharded.cluster_loss, atol=1e-5)
    # The parameters really live on all four devices.
    leaf = jax.tree.leaves(state_sharded.params)[0]
    assert len(leaf.sharding.device_set) == 4


def test_multi_step_loop_equals_single_steps():
    run = training.prepare(TrainConfig(steps=6, kmeans_iterations=10, num_devices=1))
    index = training.refresh(run, run.initial_state, None, 0)
    state_a, index_a = run.initial_state, index
    for _ in range(6):
        state_a, index_a, _ = run.steps.train_step(state_a, index_a, run.data)
    run_b = training.prepare(TrainConfig(steps=6, kmeans_iterations=10, num_devices=1))
    state_b, index_b, _ = run_b.steps.run_steps(
        run_b.initial_state,
        training.refresh(run_b, run_b.initial_state, None, 0),
        run_b.data,
        jnp.asarray(6),
    )
    _leaves_close(state_a.params, state_b.params, atol=1e-6)
    _leaves_close(index_a, index_b, atol=1e-6)


def test_embed_matches_direct_model_call():
    config = TrainConfig(steps=1, eval_chunk_size=100, num_devices=4)
    run = training.prepare(config)
    embeddings = run.steps.embed(run.initial_state.params, run.data.x)
    from flax import nnx

    model = nnx.merge(run.graphdef, nnx.State(run.initial_state.params))
    np.testing.assert_allclose(np.asarray(embeddings), np.asarray(model(run.data.x)), atol=1e-5)


@pytest.mark.slow
def test_end_to_end_digits_beats_chance(tmp_path):
    config = TrainConfig(
        steps=300,
        eval_every=300,
        checkpoint_every=300,
        workdir=str(tmp_path / "run"),
        num_devices=1,
    )
    metrics = training.train(config, progress=False)
    # chance is 90% error on 10 balanced classes
    assert metrics["knc_error"] < 0.15
    assert metrics["knn_error"] < 0.15
    assert metrics["steps"] == 300
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["knc_error"] == metrics["knc_error"]
    lines = [
        json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    ]
    assert {line["kind"] for line in lines} == {"start", "train", "eval", "refresh"}


def _final_params(workdir: Path):
    config = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    run = training.prepare(config)
    checkpointer = Checkpointer(workdir / "checkpoints")
    step = checkpointer.latest_step()
    template = training.method_state_template(run)
    restored = checkpointer.restore(step, run.initial_state, template)
    checkpointer.close()
    return step, restored.state.params, restored.index


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    flags = [
        "train",
        "--steps",
        "120",
        "--checkpoint-every",
        "20",
        "--eval-every",
        "60",
        "--log-every",
        "10",
        "--refresh-every",
        "30",
        "--kmeans-iterations",
        "10",
        "--num-devices",
        "1",
        "--no-progress",
    ]
    straight = _run_cli(*flags, "--workdir", str(tmp_path / "straight"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr

    # Start the same run, SIGKILL it once it has written a checkpoint (mid-training), resume.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "magnet_jax.cli", *flags, "--workdir", str(killed_dir)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_once_checkpointed(process, killed_dir / "checkpoints", 40, timeout=300)

    resumed = _run_cli(*flags, "--workdir", str(killed_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    metrics_straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    metrics_resumed = json.loads((killed_dir / "metrics.json").read_text())
    for key, value in metrics_straight.items():
        if key == "seconds":
            continue
        if isinstance(value, float):
            assert metrics_resumed[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert metrics_resumed[key] == value, key

    step_a, params_a, index_a = _final_params(tmp_path / "straight")
    step_b, params_b, index_b = _final_params(killed_dir)
    assert step_a == step_b == 120
    _leaves_close(params_a, params_b, atol=1e-6)
    _leaves_close(index_a, index_b, atol=1e-6)
    history_a = [
        json.loads(x) for x in (tmp_path / "straight" / "history.jsonl").read_text().splitlines()
    ]
    history_b = [json.loads(x) for x in (killed_dir / "history.jsonl").read_text().splitlines()]
    # Every (re)start logs a "start" line: the resumed run has one more.
    assert [(h["kind"], h["step"]) for h in history_a if h["kind"] != "start"] == [
        (h["kind"], h["step"]) for h in history_b if h["kind"] != "start"
    ]
    assert [h["step"] for h in history_b if h["kind"] == "start"][0] == 0


def test_partial_checkpoint_is_never_loaded(tmp_path):
    run = training.prepare(TrainConfig(loss="softmax", steps=1, num_devices=1))
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(10, run.initial_state, None, {"history_lines": 0, "seconds": 0.0})
    # What a save killed half-way leaves: Orbax's temporary folder, never renamed.
    partial = tmp_path / "ckpt" / "20.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "state").mkdir()
    checkpointer.close()
    assert Checkpointer(tmp_path / "ckpt").latest_step() == 10


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "nope"], "nope"),
        (["--loss", "nope"], "--loss: invalid choice: 'nope'"),
        (
            ["--clusters-per-batch", "3", "--examples-per-cluster", "3", "--num-devices", "4"],
            "multiple of 4",
        ),
        (["--clusters-per-class", "1000"], "larger than class"),
        (["--dataset", "mnist", "--data-dir", "/does/not/exist"], "/does/not/exist"),
        (["--clusters-per-batch", "50", "--clusters-per-class", "1"], "impostor"),
        (
            ["--kmeans-warm-start", "--clustering", "agglomerative"],
            "--kmeans-warm-start starts k-means from the previous refresh's centroids; it "
            "does not apply to --clustering agglomerative",
        ),
        (
            ["--kmeans-warm-start", "--kmeans-restarts", "3"],
            "cannot be combined with --kmeans-restarts 3",
        ),
    ],
)
def test_bad_input_clear_error_nothing_written(tmp_path, capsys, flags, message):
    workdir = tmp_path / "run"
    code = cli.main(["train", "--steps", "2", "--workdir", str(workdir), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err
    assert "Traceback" not in err
    assert not workdir.exists()


def test_resume_with_different_config_is_refused(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({**TrainConfig().to_dict(), "lr": 0.5}))
    # A complete checkpoint makes the directory hold a run (without one it belongs to nobody).
    checkpointer = Checkpointer(workdir / "checkpoints")
    checkpointer.save(1, {"w": jnp.ones(3)}, None, {"history_lines": 0, "seconds": 0.0})
    checkpointer.close()
    code = cli.main(
        ["train", "--lr", "0.1", "--steps", "2", "--workdir", str(workdir), "--no-progress"]
    )
    assert code == 2
    assert "--lr: saved 0.5, now 0.1" in capsys.readouterr().err


def test_config_file_and_flag_precedence(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"steps": 7, "lr": 0.01}))
    args = cli.build_parser().parse_args(["train", "--config", str(path), "--steps", "9"])
    config = cli._config_from_args(args)
    assert config.steps == 9 and config.lr == 0.01
    path.write_text(json.dumps({"nonsense": 1}))
    with pytest.raises(ValueError, match="nonsense"):
        cli._config_from_args(cli.build_parser().parse_args(["train", "--config", str(path)]))


def test_max_pool_2x2_equals_nnx_max_pool():
    from flax import nnx

    from magnet_jax.models import max_pool_2x2

    for shape in [(2, 28, 28, 3), (1, 7, 9, 2)]:
        x = jax.random.normal(jax.random.PRNGKey(0), shape)
        np.testing.assert_array_equal(
            np.asarray(max_pool_2x2(x)), np.asarray(nnx.max_pool(x, (2, 2), (2, 2)))
        )


def test_max_pool_2x2_derivatives_are_the_reshape_max_ones():
    """The windowed-max value carries the derivative of a reshape and a max, bit for bit:
    the gradient (eager and jitted, ties shared equally) and forward mode."""
    from jax.test_util import check_grads

    from magnet_jax.models import _pool_windows, max_pool_2x2

    def reshape_max(x):
        return _pool_windows(x).max(axis=(2, 4))

    def objective(pool):
        def value(x):
            pooled = pool(x)
            return jnp.sum(jnp.sin(pooled) * jnp.arange(pooled.size).reshape(pooled.shape))

        return value

    for shape in [(2, 28, 28, 3), (3, 7, 9, 5)]:
        x = jax.random.normal(jax.random.PRNGKey(1), shape)
        x = x.at[:, :2, :2].set(1.0)  # a window of four tied maxima in every image
        for transform in (jax.grad, lambda f: jax.jit(jax.grad(f))):
            np.testing.assert_array_equal(
                transform(objective(max_pool_2x2))(x), transform(objective(reshape_max))(x)
            )
        np.testing.assert_array_equal(
            jax.jvp(max_pool_2x2, (x,), (jnp.cos(x),))[1],
            jax.jvp(reshape_max, (x,), (jnp.cos(x),))[1],
        )
    small = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 6, 3))
    check_grads(max_pool_2x2, (small,), order=2, modes=("fwd", "rev"))
