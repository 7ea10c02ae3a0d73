"""Killing a training process mid-run, for the kill -9 + resume tests."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from magnet_jax import checkpoint


def kill_once_checkpointed(
    process: subprocess.Popen, checkpoints: Path, step: int, timeout: float
) -> None:
    """SIGKILLs ``process`` as soon as a finished checkpoint of step ``>= step`` exists
    under ``checkpoints`` (or after ``timeout`` seconds); fails when the process ended
    on its own first, since then nothing was interrupted (make the run longer)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if any(done >= step for done in checkpoint.complete_steps(checkpoints)):
            break
        time.sleep(0.02)
    was_running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert was_running, "the run finished before it could be killed; make it longer"
