"""Reliability at the edges of training, as a new user meets them: damaged checkpoints,
failed first runs, file-system and type errors, Ctrl-C, resuming and extending a run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from processes import kill_once_checkpointed

from magnet_jax import checkpoint, cli, finite, methods, training
from magnet_jax.checkpoint import Checkpointer, CheckpointError
from magnet_jax.config import TrainConfig
from magnet_jax.workdir import Workdir, check_same_run, resolve_config

# The smallest run of the default method that still refreshes, evaluates and checkpoints.
_SMALL = [
    "--steps",
    "20",
    "--checkpoint-every",
    "10",
    "--eval-every",
    "20",
    "--log-every",
    "10",
    "--kmeans-iterations",
    "5",
    "--embedding-dim",
    "8",
    "--num-devices",
    "1",
    "--no-progress",
]


def _train(workdir, *flags) -> int:
    return cli.main(["train", *_SMALL, "--workdir", str(workdir), *flags])


def _history(workdir) -> list[dict]:
    with open(os.path.join(workdir, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------
# 1. A damaged latest checkpoint: resume from the newest one that restores.
# --------------------------------------------------------------------------------------


def _damage(step_dir, part: str) -> None:
    """What a disk error or a careless `rm` leaves: one file of a finished checkpoint gone."""
    if part == "data":
        data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
        largest = max(os.listdir(data), key=lambda n: os.path.getsize(os.path.join(data, n)))
        os.remove(os.path.join(data, largest))
    elif part == "manifest":
        os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
    else:
        os.remove(os.path.join(step_dir, "meta", "metadata"))


def _tiny_state(value: float):
    # Distinct float values: arrays this small but uniform may be stored inline, not in d/.
    w = jnp.arange(4096.0).reshape(512, 8) + value
    return {"w": w, "step": jnp.asarray(int(value), jnp.int32)}


@pytest.mark.parametrize("part", ["data", "manifest", "meta"])
def test_damaged_latest_checkpoint_falls_back_and_is_kept(tmp_path, part):
    checkpointer = Checkpointer(tmp_path / "ckpt")
    for step in (1, 2, 3):
        checkpointer.save(step, _tiny_state(step), None, {"step": step})
    checkpointer.close()
    _damage(tmp_path / "ckpt" / "3", part)

    reports = []
    checkpointer = Checkpointer(tmp_path / "ckpt")
    restored = checkpointer.restore_latest(_tiny_state(0), None, report=reports.append)
    checkpointer.close()
    assert restored.step == 2 and restored.meta == {"step": 2}
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), _tiny_state(2)["w"])
    assert len(reports) == 1 and "checkpoint 3 cannot be restored" in reports[0]
    # Moved aside, not deleted, and no longer a step.
    moved = [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("3.damaged-")]
    assert len(moved) == 1 and moved[0] in reports[0]
    assert checkpoint.complete_steps(tmp_path / "ckpt") == [1, 2]


_REPO = Path(__file__).resolve().parents[1]
# A digits run long enough that a later checkpoint exists well before it ends. The index
# is built once (compiling k-means is most of a tiny run's time) and checkpointed.
_KILL_RUN = [
    "train",
    "--dataset", "digits",
    "--steps", "400",
    "--checkpoint-every", "50",
    "--refresh-every", "1000",
    "--eval-every", "400",
    "--log-every", "50",
    "--kmeans-iterations", "5",
    "--embedding-dim", "8",
    "--num-devices", "1",
    "--no-progress",
]  # fmt: skip


def _cli_process(workdir, cache, **popen) -> subprocess.Popen:
    """``magnet-jax train`` of this checkout in a process of its own, sharing compiled
    programs through the persistent cache in ``cache`` (the same executables, so the same
    numbers, and a resumed run that does not compile again)."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(_REPO),
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    command = [sys.executable, "-m", "magnet_jax.cli", *_KILL_RUN, "--workdir", str(workdir)]
    return subprocess.Popen(command, cwd=_REPO, env=env, text=True, **popen)


def _train_records(workdir) -> list[dict]:
    return [h for h in _history(workdir) if h["kind"] == "train"]


@pytest.mark.slow
def test_kill_9_and_a_damaged_checkpoint_through_the_cli(tmp_path):
    """The issue's repro, scaled down: kill -9 once a later checkpoint exists, delete the
    largest data file of the newest checkpoint, run the same command again."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    cache = tmp_path / "jax-cache"
    straight = _cli_process(tmp_path / "straight", cache, **quiet)  # uninterrupted, alongside
    workdir = tmp_path / "killed"
    killed = _cli_process(workdir, cache, **quiet)
    kill_once_checkpointed(killed, workdir / "checkpoints", 100, timeout=600)

    steps = checkpoint.complete_steps(workdir / "checkpoints")
    assert steps[-1] >= 100 and len(steps) >= 2, steps
    damaged, previous = steps[-1], steps[-2]
    _damage(workdir / "checkpoints" / str(damaged), "data")
    resumed = _cli_process(workdir, cache, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert straight.wait(timeout=300) == 0

    assert f"checkpoint {damaged} cannot be restored (" in out
    assert f"and resumed from checkpoint {previous}" in out
    assert f"resuming at step {previous} in" in out
    moved = [p.name for p in (workdir / "checkpoints").iterdir() if ".damaged-" in p.name]
    assert len(moved) == 1 and moved[0].startswith(f"{damaged}.damaged-") and moved[0] in out
    assert (workdir / "checkpoints" / moved[0] / "state").is_dir()  # moved whole, not deleted

    # Ends where the uninterrupted run ends: every logged loss, the metrics, the parameters.
    assert _train_records(workdir) == _train_records(tmp_path / "straight")
    final = [json.loads((w / "metrics.json").read_text()) for w in (workdir, tmp_path / "straight")]
    for metrics in final:
        del metrics["seconds"]
    assert final[0] == final[1]
    params = [
        checkpoint.restore_params(w / "checkpoints", 400) for w in (workdir, tmp_path / "straight")
    ]
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_restorable_checkpoint_moves_nothing(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(1, _tiny_state(1), None, {})
    checkpointer.close()
    _damage(tmp_path / "ckpt" / "1", "manifest")
    checkpointer = Checkpointer(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="none of the checkpoints.*step 1"):
        checkpointer.restore_latest(_tiny_state(0), None)
    checkpointer.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]


@pytest.mark.slow
def test_training_resumes_past_a_damaged_checkpoint(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir) == 0
    _damage(workdir / "checkpoints" / "20", "data")
    capsys.readouterr()
    assert _train(workdir) == 0
    out = capsys.readouterr().out
    assert "checkpoint 20 cannot be restored" in out and "resumed from checkpoint 10" in out
    assert "resuming at step 10" in out
    assert checkpoint.complete_steps(workdir / "checkpoints") == [10, 20]
    assert any(p.name.startswith("20.damaged-") for p in (workdir / "checkpoints").iterdir())
    assert json.loads((workdir / "metrics.json").read_text())["steps"] == 20


# --------------------------------------------------------------------------------------
# 2. Non-finite values during training: one line naming the step and what, nothing
#    non-finite saved. (NaN/inf in the data: tests/test_data_sources.py.)
# --------------------------------------------------------------------------------------


def _one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _restored_finite(workdir):
    """The latest checkpoint restores, and every array of it is finite."""
    config = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    run = training.prepare(config, warm_start=False)
    checkpointer = Checkpointer(workdir / "checkpoints")
    restored = checkpointer.restore_latest(run.initial_state, training.method_state_template(run))
    checkpointer.close()
    for leaf in jax.tree.leaves((restored.state, restored.index)):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            assert np.isfinite(np.asarray(leaf)).all()
    return restored


def test_nonfinite_checks_name_the_rows_and_the_arrays():
    embeddings = jnp.ones((8, 3)).at[2, 1].set(jnp.nan).at[6, 0].set(-jnp.inf)
    with pytest.raises(
        finite.NonFiniteError, match=r"test set became NaN or inf in 2 of 8 rows \(rows 2, 6\)"
    ):
        finite.check_embeddings(embeddings, "test set")
    fine = jnp.ones((4, 2))
    assert finite.check_embeddings(fine, "test set") is fine
    params = {"trunk": {"bias": jnp.array([0.0, jnp.inf]), "kernel": jnp.ones(3)}}
    opt_state = {"count": jnp.int32(3), "mu": jnp.zeros(3)}
    with pytest.raises(
        finite.NonFiniteError,
        match=r"^1 of 4 arrays of the train state became NaN or inf \(params/trunk/bias\)$",
    ):
        finite.check_state(params, opt_state)
    finite.check_state({"w": jnp.ones(2)}, opt_state)


def test_progress_bar_shows_the_share_of_active_examples():
    assert training._train_postfix(0.0, {"active": 0.371}) == "loss=0.0000 active=37%"
    assert training._train_postfix(2.5, {}) == "loss=2.5000"  # softmax-type losses


@pytest.mark.slow
def test_nonfinite_embeddings_at_a_refresh_stop_the_run(tmp_path, capsys, monkeypatch):
    prepare = training.prepare

    def prepare_with_overflow(*args, **kwargs):
        run = prepare(*args, **kwargs)
        embed, calls = run.steps.embed, []

        def embed_overflowing(params, x):
            calls.append(1)
            embeddings = embed(params, x)
            # The second embedding is the refresh at step 10: as if the parameters had
            # grown until one example's embedding overflows, with every loss finite.
            return embeddings.at[3].set(jnp.inf) if len(calls) >= 2 else embeddings

        run.steps = run.steps._replace(embed=embed_overflowing)
        return run

    monkeypatch.setattr(training, "prepare", prepare_with_overflow)
    workdir = tmp_path / "run"
    assert _train(workdir, "--refresh-every", "10") == 2
    err = _one_line(capsys.readouterr().err)
    assert "the embeddings of the training set became NaN or inf in 1 of" in err
    assert "rows (rows 3) at the refresh of step 10" in err
    assert "the last checkpoint, step 10, holds the parameters that gave them" in err
    assert "resuming it stops here again" in err and "lower --lr" in err
    monkeypatch.undo()
    assert _restored_finite(workdir).step == 10  # saved before the refresh, and intact
    assert not (workdir / "metrics.json").exists()


@pytest.mark.slow
def test_nonfinite_train_state_is_never_checkpointed(tmp_path, capsys):
    # Adam's first update is about lr in size: 1e39 overflows float32, so the parameters
    # become inf after step 0, whose loss (of the initial parameters) is finite.
    workdir = tmp_path / "run"
    assert _train(workdir, "--lr", "1e39", "--log-every", "1") == 2
    err = _one_line(capsys.readouterr().err)
    assert "arrays of the train state became NaN or inf (params/" in err
    assert "between steps 0 and 1, while the loss stayed finite" in err
    assert "no checkpoint was written" in err and "lower --lr" in err
    assert checkpoint.complete_steps(workdir / "checkpoints") == []
    history = _history(workdir)
    assert [h["kind"] for h in history] == ["start", "refresh"]  # no step logged


@pytest.mark.slow
def test_inputs_that_overflow_stop_before_the_first_step(tmp_path, capsys):
    from magnet_jax.data import load_dataset

    digits = load_dataset("digits")
    # Finite inputs (the loader's check passes) whose embeddings overflow float32.
    x = np.concatenate([digits.x_train, digits.x_test]).reshape(-1, 64) * np.float32(1e37)
    path = tmp_path / "huge.npz"
    np.savez(path, x=x, y=np.concatenate([digits.y_train, digits.y_test]))
    workdir = tmp_path / "run"
    assert _train(workdir, "--dataset", f"npz:{path}") == 2
    err = _one_line(capsys.readouterr().err)
    assert "the embeddings of the training set became NaN or inf" in err
    assert "at the refresh of step 0; no training step had run" in err
    assert "check their scale" in err and "holds no run" in err
    assert checkpoint.complete_steps(workdir / "checkpoints") == []


# --------------------------------------------------------------------------------------
# 3. A failed first run leaves a directory that belongs to nobody.
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_failed_first_run_does_not_lock_its_workdir(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, "--lr", "1e6") == 2
    err = capsys.readouterr().err
    assert "became nan" in err and "no checkpoint was written" in err
    assert "Traceback" not in err
    assert checkpoint.complete_steps(workdir / "checkpoints") == []
    # The same command with a lower --lr starts afresh there.
    assert _train(workdir, "--lr", "1e-3") == 0
    history = _history(workdir)
    assert history[0]["kind"] == "start" and history[0]["step"] == 0
    assert json.loads((workdir / "config.json").read_text())["lr"] == 1e-3


# --------------------------------------------------------------------------------------
# 4. File-system and type errors: one line, non-zero exit, nothing saved damaged.
# --------------------------------------------------------------------------------------


def test_workdir_that_cannot_be_created(tmp_path, capsys):
    # Root ignores chmod, so the directory is made impossible instead: its parent is a file.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _train(blocker / "run") == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and str(blocker) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def _set_read_only(path, read_only: bool) -> bool:
    """Root ignores permissions, so as root the directory is made immutable (chattr)."""
    if os.geteuid() != 0:
        os.chmod(path, 0o500 if read_only else 0o700)
        return True
    flag = "+i" if read_only else "-i"
    result = subprocess.run(["chattr", flag, str(path)], capture_output=True)
    return result.returncode == 0


@pytest.mark.slow
def test_checkpoint_dir_unwritable_mid_run(tmp_path, capsys, monkeypatch):
    if shutil.which("chattr") is None and os.geteuid() == 0:
        pytest.skip("running as root without chattr: no way to make a directory unwritable")
    workdir = tmp_path / "run"
    original_save = Checkpointer.save
    locked = []

    def save_then_lock(self, step, *args):
        original_save(self, step, *args)
        if not locked:  # after the first checkpoint the disk turns read-only
            locked.append(_set_read_only(self.directory, True))

    monkeypatch.setattr(Checkpointer, "save", save_then_lock)
    try:
        code = _train(workdir)
    finally:
        if locked and locked[0]:
            _set_read_only(workdir / "checkpoints", False)
    if not locked[0]:
        pytest.skip("chattr +i is not permitted here")
    err = capsys.readouterr().err
    assert code == 2
    assert "could not write checkpoint 20" in err and "earlier checkpoints there are kept" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # Checkpoint 10 is intact: it restores.
    monkeypatch.undo()
    config = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    run = training.prepare(config, warm_start=False)
    checkpointer = Checkpointer(workdir / "checkpoints")
    restored = checkpointer.restore_latest(run.initial_state, training.method_state_template(run))
    checkpointer.close()
    assert restored.step == 10 and int(restored.state.step) == 10


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps": "ten"}, "--steps must be an integer, got 'ten'"),
        ({"steps": 20.5, "checkpoint_every": 10}, "--steps must be an integer, got 20.5"),
        ({"loss": "magnett"}, "unknown --loss 'magnett'"),
        ({"normalize": "yes"}, "--normalize must be true or false"),
        ({"lr": [0.1]}, "--lr must be a number"),
    ],
)
def test_bad_config_file_one_line_nothing_written(tmp_path, capsys, values, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    workdir = tmp_path / "run"
    code = cli.main(["train", "--config", str(path), "--workdir", str(workdir), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not workdir.exists()


@pytest.mark.slow
def test_ctrl_c_stops_at_a_checkpoint_and_resumes(tmp_path, capsys, monkeypatch):
    prepare = training.prepare
    calls = []

    def prepare_with_ctrl_c(*args, **kwargs):
        run = prepare(*args, **kwargs)
        # The trainer runs its steps through run_steps_with_metrics (step statistics).
        run_steps = run.steps.run_steps_with_metrics

        def steps_then_ctrl_c(*step_args):
            calls.append(1)
            result = run_steps(*step_args)
            if len(calls) == 1:  # the user presses Ctrl-C during the first steps
                os.kill(os.getpid(), signal.SIGINT)
            return result

        run.steps = run.steps._replace(run_steps_with_metrics=steps_then_ctrl_c)
        return run

    monkeypatch.setattr(training, "prepare", prepare_with_ctrl_c)
    workdir = tmp_path / "run"
    assert _train(workdir, "--checkpoint-every", "20") == 130
    err = capsys.readouterr().err
    assert "interrupted at step 10 of 20: checkpoint 10 is saved" in err
    assert "Traceback" not in err
    assert checkpoint.complete_steps(workdir / "checkpoints") == [10]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.undo()
    assert _train(workdir, "--checkpoint-every", "20") == 0
    assert "resuming at step 10" in capsys.readouterr().out
    assert [(h["kind"], h["step"]) for h in _history(workdir) if h["kind"] == "train"] == [
        ("train", 10),
        ("train", 20),
    ]


# --------------------------------------------------------------------------------------
# 5. Types and choices, for flags and config files alike.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "20.5"], "--steps: must be an integer, got '20.5'"),
        (["--lr", "fast"], "--lr: must be a number, got 'fast'"),
        (["--optimizer", "adamw"], "--optimizer: invalid choice: 'adamw'"),
        (["--clustering", "spectral"], "--clustering: invalid choice"),
    ],
)
def test_bad_flag_values_are_refused_naming_the_flag(tmp_path, capsys, flags, message):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--workdir", str(workdir), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not workdir.exists()


def test_config_types_floats_accept_integers():
    config = TrainConfig.from_dict({"lr": 1, "alpha": 2, "steps": np.int64(7)})
    assert isinstance(config.lr, float) and isinstance(config.alpha, float) and config.lr == 1.0
    assert type(config.steps) is int and config.steps == 7
    assert TrainConfig(workdir=Path("runs") / "x").workdir == os.path.join("runs", "x")
    with pytest.raises(ValueError, match="--clusters-per-class must be an integer"):
        TrainConfig(clusters_per_class=True)
    with pytest.raises(ValueError, match="--clusters-per-class must be >= 1"):
        TrainConfig(clusters_per_class=0).validate()


# --------------------------------------------------------------------------------------
# 7. Resume with --workdir alone; extend where exact; default work directory.
# --------------------------------------------------------------------------------------


def _fake_run(workdir, **values) -> TrainConfig:
    """A work directory holding a run: its config.json and one complete checkpoint."""
    config = TrainConfig(workdir=str(workdir), **values)
    os.makedirs(workdir)
    (workdir / "config.json").write_text(json.dumps(config.to_dict()))
    checkpointer = Checkpointer(workdir / "checkpoints")
    checkpointer.save(10, _tiny_state(10), None, {})
    checkpointer.close()
    return config


def test_workdir_alone_reuses_the_runs_config(tmp_path):
    saved = _fake_run(tmp_path / "run", dataset="digits", steps=40, lr=0.01, seed=3)
    args = cli.build_parser().parse_args(["train", "--workdir", str(tmp_path / "run")])
    assert cli._config_from_args(args) == saved
    args = cli.build_parser().parse_args(
        ["train", "--workdir", str(tmp_path / "run"), "--eval-every", "7"]
    )
    config = cli._config_from_args(args)
    assert (config.lr, config.seed, config.eval_every) == (0.01, 3, 7)
    # A directory whose first run failed before any checkpoint holds no run: flags rule.
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "config.json").write_text(json.dumps({"lr": 1e6}))
    assert resolve_config({"workdir": str(tmp_path / "failed")}).lr == TrainConfig().lr


def test_kmeans_warm_start_is_recorded_reaches_the_method_and_cannot_change_on_resume():
    config = TrainConfig(kmeans_warm_start=True)
    saved = json.loads(json.dumps(config.to_dict()))  # what config.json holds
    assert saved["kmeans_warm_start"] is True
    assert methods.from_config(TrainConfig.from_dict(saved)).warm_starts_kmeans
    assert not methods.from_config(TrainConfig()).warm_starts_kmeans
    # It changes the refreshes still to come, so a resume must keep it.
    with pytest.raises(ValueError, match="--kmeans-warm-start: saved True, now False"):
        check_same_run(saved, TrainConfig(), "W", 10)


@pytest.mark.slow
@pytest.mark.parametrize(
    "option", [("--kmeans-warm-start",), ("--embedding-memory", "5")], ids=lambda o: o[0]
)
def test_refresh_options_resume_exactly(tmp_path, capsys, option):
    """A run killed after its first checkpoint ends, once resumed, exactly where the
    uninterrupted run ends: with --kmeans-warm-start the refreshes after the resume start
    from the checkpointed index's centroids; with --embedding-memory they reuse the
    checkpointed memory's rows."""
    flags = ("--refresh-every", "5", *option)
    straight = tmp_path / "straight"
    assert _train(straight, *flags) == 0
    # What a SIGKILL after checkpoint 10 leaves: checkpoint 10, its history, no metrics.
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    shutil.rmtree(killed / "checkpoints" / "20")
    (killed / "metrics.json").unlink()
    capsys.readouterr()
    assert _train(killed, *flags) == 0
    assert "resuming at step 10" in capsys.readouterr().out

    def records(workdir):
        # Everything but the (re)start lines and wall times.
        return [
            {k: v for k, v in h.items() if k != "refresh_seconds"}
            for h in _history(workdir)
            if h["kind"] != "start"
        ]

    assert records(straight) == records(killed)
    assert [(h["kind"], h["step"]) for h in records(killed) if h["kind"] == "refresh"] == [
        ("refresh", step) for step in (0, 5, 10, 15)
    ]
    metrics_a = json.loads((straight / "metrics.json").read_text())
    metrics_b = json.loads((killed / "metrics.json").read_text())
    metrics_a.pop("seconds"), metrics_b.pop("seconds")
    assert metrics_a == metrics_b
    restored = []
    for workdir in (straight, killed):
        config = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
        run = training.prepare(config, warm_start=False)
        checkpointer = Checkpointer(workdir / "checkpoints")
        restored.append(
            checkpointer.restore(20, run.initial_state, training.method_state_template(run))
        )
        checkpointer.close()
    for a, b in zip(
        jax.tree.leaves((restored[0].state, restored[0].index)),
        jax.tree.leaves((restored[1].state, restored[1].index)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_extending_steps_depends_on_the_schedule(tmp_path):
    saved = TrainConfig(steps=40).to_dict()
    with pytest.raises(ValueError, match="cosine learning-rate schedule decays over --steps"):
        check_same_run(saved, TrainConfig(steps=80), "W", 40)
    constant = TrainConfig(steps=40, lr_schedule="constant")
    check_same_run(constant.to_dict(), TrainConfig(steps=80, lr_schedule="constant"), "W", 40)
    with pytest.raises(ValueError, match="below the step 40 of the latest checkpoint"):
        check_same_run(constant.to_dict(), TrainConfig(steps=30, lr_schedule="constant"), "W", 40)
    with pytest.raises(ValueError, match=r"--lr: saved 0.001, now 0.1"):
        check_same_run(saved, TrainConfig(steps=40, lr=0.1), "W", 40)


def test_default_workdir_depends_on_loss_and_dataset():
    assert TrainConfig().workdir == os.path.join("runs", "magnet-digits")
    assert TrainConfig(dataset="fashion_mnist").workdir == os.path.join(
        "runs", "magnet-fashion_mnist"
    )
    assert TrainConfig(loss="triplet", dataset="npz:/data/feat.npz").workdir == os.path.join(
        "runs", "triplet-npz-feat"
    )
    assert TrainConfig(workdir="mine").workdir == "mine"
    args = cli.build_parser().parse_args(["train", "--dataset", "mnist", "--loss", "softmax"])
    assert cli._config_from_args(args).workdir == os.path.join("runs", "softmax-mnist")


# --------------------------------------------------------------------------------------
# 8. Help: groups, one line per flag, defaults once; devices recorded.
# --------------------------------------------------------------------------------------


def test_train_help_is_grouped_and_complete(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for title in ("data flags", "model flags", "method", "clustering", "schedule", "evaluation"):
        assert title in text
    assert "Adam learning rate" not in text
    assert "{adam,sgd}" in text and "{cosine,constant}" in text
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.option_strings and action.dest not in ("help",):
            assert action.help and action.help.count("(default:") <= 1, action.dest
    import dataclasses

    from magnet_jax.config import FIELDS

    assert set(FIELDS) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.slow
def test_devices_are_printed_and_recorded(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, "--steps", "10", "--eval-every", "10") == 0
    assert "on 1 cpu device(s)" in capsys.readouterr().out
    start = _history(workdir)[0]
    assert start == {
        "kind": "start",
        "step": 0,
        "devices": 1,
        "processes": 1,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
    }
    assert Workdir(workdir).checkpoint_steps() == [10]
    # Item 10: each train line also records the share of examples with non-zero loss.
    (train,) = [h for h in _history(workdir) if h["kind"] == "train"]
    assert set(train) == {"kind", "step", "loss", "active"} and 0 < train["active"] <= 1


# --------------------------------------------------------------------------------------
# 11. Documentation: no citation of a file the repository lacks, no stray control bytes.
# --------------------------------------------------------------------------------------


def test_sources_cite_no_missing_design_file_and_hold_no_control_bytes():
    # A docstring written as a plain string turns "\theta", "\frac", "\begin" into TAB,
    # form-feed and backspace bytes; a raw string keeps them.
    control = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f]")
    files = [_REPO / "README.md", *sorted((_REPO / "magnet_jax").rglob("*.py"))]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text, path
        match = control.search(text)
        assert match is None, f"{path}: byte {match.group()!r} at offset {match.start()}"
    assert len(files) > 20
