"""Several processes (jax.distributed over localhost): the same run as one process.

Two processes of two simulated CPU devices each train on ``digits`` through the command
line, exchanging collectives over gloo, and must end where one process with four devices
ends; a process killed with SIGKILL stops its partner with a clear message in bounded
time, and rerunning both resumes exactly; a port in use and a process that never joins
give one clear line each, never a hang.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from magnet_jax import distributed
from magnet_jax.checkpoint import complete_steps, restore_params

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
# SGD, not Adam: Adam's first steps move every parameter by about ±lr whatever the size of
# its gradient, so rounding differences between two ways of summing the same gradient
# (gloo across processes vs one process) become ±lr steps on near-zero gradients; with SGD
# the runs stay as close as their gradients. A small learning rate too: at lr 0.05 the
# triplet run is unstable (its loss climbs) and any rounding difference, 3e-8 after the
# first step, grows a hundredfold per step.
RUN_FLAGS = ["--dataset", "digits", "--steps", str(STEPS), "--eval-every", str(STEPS)]
RUN_FLAGS += ["--checkpoint-every", "10", "--log-every", "10", "--no-progress"]
RUN_FLAGS += ["--optimizer", "sgd", "--lr", "0.01", "--lr-schedule", "constant"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _command(workdir: Path, flags=RUN_FLAGS) -> list[str]:
    return [sys.executable, "-m", "magnet_jax.cli", "train", *flags, "--workdir", str(workdir)]


def _start(workdir: Path, port: int, process_id: int, *extra: str, flags=RUN_FLAGS):
    command = _command(workdir, flags) + [
        *extra,
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(process_id),
        "--join-timeout",
        "120",
    ]
    return subprocess.Popen(
        command, env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _run_two(workdir: Path, *extra: str, flags=RUN_FLAGS) -> list[tuple[int, str, str]]:
    port = _free_port()
    processes = [_start(workdir, port, i, *extra, flags=flags) for i in (0, 1)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=900)
        results.append((process.returncode, out, err))
    return results


def _run_one(workdir: Path, *extra: str, flags=RUN_FLAGS) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(workdir, flags) + list(extra),
        env=_env(4),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _final_params(workdir: Path):
    step = complete_steps(workdir / "checkpoints")[-1]
    return step, restore_params(workdir / "checkpoints", step)


def _assert_same_params(a, b, atol):
    flat_a = dict(_flatten(a))
    flat_b = dict(_flatten(b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_allclose(flat_a[key], flat_b[key], atol=atol, rtol=0, err_msg=key)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}/{key}")
    else:
        yield prefix, np.asarray(tree)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["magnet", "triplet"])
def test_two_processes_equal_one_process_with_four_devices(tmp_path, loss):
    single = _run_one(tmp_path / "single", "--loss", loss)
    assert single.returncode == 0, single.stderr[-2000:]
    results = _run_two(tmp_path / "multi", "--loss", loss)
    for returncode, _, err in results:
        assert returncode == 0, err[-2000:]
    # Only process 0 prints the results and writes the run's files.
    assert "trained" in results[0][1] and "trained" not in results[1][1]
    history = (tmp_path / "multi" / "history.jsonl").read_text().splitlines()
    assert len(history) == len(set(history)), "a line was written twice"

    step_single, params_single = _final_params(tmp_path / "single")
    step_multi, params_multi = _final_params(tmp_path / "multi")
    assert step_single == step_multi == STEPS
    # Same tolerance as the single-process sharded-vs-single-device test.
    _assert_same_params(params_single, params_multi, atol=1e-5)
    metrics_single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    metrics_multi = json.loads((tmp_path / "multi" / "metrics.json").read_text())
    for name in ("knn_error", "knc_error", "precision_at_1"):
        if name in metrics_single:
            assert metrics_multi[name] == pytest.approx(metrics_single[name], abs=1e-6), name


# Long enough that the processes are still training when the first checkpoint appears.
LONG_FLAGS = ["--dataset", "digits", "--steps", "200", "--eval-every", "200"]
LONG_FLAGS += ["--checkpoint-every", "50", "--log-every", "50", "--no-progress"]
LONG_FLAGS += ["--optimizer", "sgd", "--lr", "0.01", "--lr-schedule", "constant"]


@pytest.mark.slow
def test_sigkill_of_one_process_stops_both_and_rerun_resumes_exactly(tmp_path):
    # The reference is the same two processes uninterrupted: over 200 steps and 9 k-means
    # refreshes, one process with four devices drifts away from them (5e-4 by step 100),
    # as any two ways of summing the same gradients do once a refresh assigns a borderline
    # point differently; the 30-step test above compares those two.
    for returncode, _, err in _run_two(tmp_path / "reference", flags=LONG_FLAGS):
        assert returncode == 0, err[-2000:]

    workdir = tmp_path / "killed"
    port = _free_port()
    processes = [_start(workdir, port, i, flags=LONG_FLAGS) for i in (0, 1)]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not complete_steps(workdir / "checkpoints"):
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.2)
    assert complete_steps(workdir / "checkpoints"), "no checkpoint before the run ended"
    assert processes[0].poll() is None and processes[1].poll() is None, "a process ended early"
    processes[1].send_signal(signal.SIGKILL)
    started = time.monotonic()
    _, err0 = processes[0].communicate(timeout=300)
    processes[1].communicate()
    # The survivor cannot finish alone: JAX's coordination service stops it once the
    # dead process misses its heartbeats (an abort from C++, so the message is JAX's own:
    # "... another task died ..." after naming the task that stopped sending heartbeats).
    assert processes[0].returncode != 0
    assert time.monotonic() - started < distributed.DEFAULT_HEARTBEAT_TIMEOUT + 120
    assert "another task died" in err0, err0[-3000:]

    results = _run_two(workdir, flags=LONG_FLAGS)
    for returncode, _, err in results:
        assert returncode == 0, err[-2000:]
    _, params_reference = _final_params(tmp_path / "reference")
    _, params_resumed = _final_params(workdir)
    _assert_same_params(params_reference, params_resumed, atol=1e-6)


@pytest.mark.slow
def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        command = _command(tmp_path / "w") + [
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            "0",
            "--join-timeout",
            "10",
        ]
        result = subprocess.run(
            command, env=_env(2), cwd=ROOT, capture_output=True, text=True, timeout=300
        )
    assert result.returncode == 2
    assert f"cannot listen on port {port}" in result.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
@pytest.mark.parametrize("process_id", [0, 1])
def test_process_that_never_joins_is_a_clear_error_in_bounded_time(tmp_path, process_id):
    command = _command(tmp_path / "w") + [
        "--coordinator",
        f"127.0.0.1:{_free_port()}",
        "--num-processes",
        "2",
        "--process-id",
        str(process_id),
        "--join-timeout",
        "5",
    ]
    started = time.monotonic()
    result = subprocess.run(
        command, env=_env(2), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-2000:]
    expected = "did not join" if process_id == 0 else "could not reach the coordinator"
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert time.monotonic() - started < 5 + 120  # the timeout plus start-up, never a hang
    assert not (tmp_path / "w").exists()


def test_process_group_from_flags_and_environment(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(distributed.ENV_PROCESS_ID, raising=False)
    assert distributed.from_environment() is None
    group = distributed.from_environment("10.0.0.1:8476", 4, 3)
    assert group == distributed.ProcessGroup("10.0.0.1:8476", 4, 3)
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "h:1")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "1")
    assert distributed.from_environment() == distributed.ProcessGroup("h:1", 2, 1)
    assert distributed.from_environment(process_id=0).process_id == 0  # flags win
    monkeypatch.delenv(distributed.ENV_PROCESS_ID)
    with pytest.raises(ValueError, match="missing: --process-id"):
        distributed.from_environment()
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed.from_environment("nohost", 2, 0)
    with pytest.raises(ValueError, match=r"--process-id must lie in \[0, 2\)"):
        distributed.from_environment("h:1", 2, 2)
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "one")
    with pytest.raises(ValueError, match="MAGNET_JAX_PROCESS_ID"):
        distributed.from_environment()
