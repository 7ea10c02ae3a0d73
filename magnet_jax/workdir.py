"""A run's work directory: its files, which run it holds, and what a command may do with it.

A work directory holds ``config.json``, ``history.jsonl``, ``metrics.json`` and
``checkpoints/``. It *holds a run* once it has a complete checkpoint; until then it belongs
to nobody (a first run that failed before its first checkpoint leaves nothing worth
keeping), and any command may start afresh in it.

A command that names a directory holding a run resumes that run: :func:`resolve_config`
fills every field the command does not set from the run's ``config.json``, and
:func:`check_same_run` refuses a change that would make the resumed run differ from an
uninterrupted one, saying why. Raising ``--steps`` is allowed when the learning rate is
constant (every step taken so far is then exactly a step of the longer run); a cosine
schedule decays over ``--steps``, so raising it would change the steps already taken.

:class:`StopOnInterrupt` turns Ctrl-C into a request that the host loop honours after the
steps in flight, so an interrupted run stops at a checkpoint instead of mid-write.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from typing import Any

from magnet_jax.checkpoint import complete_steps
from magnet_jax.config import TrainConfig, default_workdir, flag


class WorkdirError(OSError):
    """The work directory cannot be created or written."""


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C; the message says where the last checkpoint is."""


class Workdir:
    """The run's files: config.json, history.jsonl, metrics.json, checkpoints/."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self.config = os.path.join(self.path, "config.json")
        self.history = os.path.join(self.path, "history.jsonl")
        self.metrics = os.path.join(self.path, "metrics.json")
        self.checkpoints = os.path.join(self.path, "checkpoints")

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (``[]``: the directory holds no run)."""
        return complete_steps(self.checkpoints)

    def saved_config(self) -> dict | None:
        if not os.path.exists(self.config):
            return None
        try:
            with open(self.config) as f:
                values = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"cannot read the run's configuration {self.config}: {error}"
            ) from None
        if not isinstance(values, dict):
            raise ValueError(f"{self.config} must hold a JSON object, got {type(values).__name__}")
        return values

    def check_writable(self) -> None:
        """Raises :class:`WorkdirError` when the directory could not be created or written,
        without creating anything (a bad command leaves nothing behind)."""
        existing = self.path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise WorkdirError(
                f"cannot create the work directory {self.path}: {existing} is a file, not a "
                f"folder; choose another {flag('workdir')}"
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            raise WorkdirError(
                f"cannot write the work directory {self.path}: no write permission on "
                f"{existing}; choose another {flag('workdir')}"
            )

    def create(self) -> None:
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as error:
            raise WorkdirError(
                f"cannot create the work directory {self.path} ({error.strerror or error}); "
                f"choose another {flag('workdir')}"
            ) from None

    def write_json(self, path: str, value: Any) -> None:
        """Atomic: a crash leaves the old file or the new one, never half of one."""
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(value, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, path)
        except OSError as error:
            raise WorkdirError(f"cannot write {path} ({error.strerror or error})") from None

    def truncate_history(self, num_lines: int) -> None:
        """Drops lines written after the checkpoint we resume from (they will be rewritten)."""
        if not os.path.exists(self.history):
            return
        with open(self.history) as f:
            lines = f.readlines()[:num_lines]
        tmp = self.history + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.history)


# Fields that may differ between a run and its resumption. Not init_from: it is ignored on
# resume (the checkpoint holds the warm-started parameters) but names what the run is.
# `steps` only with a constant learning rate (see check_same_run).
_RESUMABLE_CHANGES = {
    "steps",
    "eval_every",
    "checkpoint_every",
    "log_every",
    "max_checkpoints",
    "workdir",
    "verify",  # checks the files, changes nothing they hold
    "loader_workers",  # how many threads read the same rows
}


# Fields whose default changed: a config.json written before the field existed lacks it,
# and that run used the old default.
_FORMER_DEFAULTS = {"input": "memory"}  # --input auto came later; before it, memory


def keep_input(saved: dict, config: TrainConfig) -> TrainConfig:
    """``config`` resuming the run saved as ``saved``: ``--input auto`` becomes the mode the
    run started in (its ``config.json`` holds ``memory`` or ``stream``), so a resumed run
    never changes how it reads its data, whatever the estimate says now."""
    if config.input != "auto":
        return config
    started = saved.get("input", _FORMER_DEFAULTS["input"])
    return config if started == "auto" else dataclasses.replace(config, input=started)


def check_same_run(saved: dict, config: TrainConfig, workdir: str, latest_step: int) -> None:
    """Refuses to resume the run saved as ``saved`` (its ``config.json``, last checkpoint at
    ``latest_step``) with ``config`` when the result would differ from an uninterrupted run.

    Raises:
        ValueError: naming each differing flag, or why ``--steps`` cannot change.
    """
    current = config.to_dict()
    # A field missing from an older run's config.json had its default value then.
    defaults = {**TrainConfig().to_dict(), **_FORMER_DEFAULTS}

    def before(name):
        return saved.get(name, defaults[name])

    differing = sorted(
        k for k in current if k not in _RESUMABLE_CHANGES and before(k) != current[k]
    )
    if differing:
        details = ", ".join(
            f"{flag(k)}: saved {before(k)!r}, now {current[k]!r}" for k in differing
        )
        raise ValueError(
            f"the work directory {workdir} holds a run with a different configuration "
            f"({details}); resume it with the same settings (or with {flag('workdir')} alone, "
            f"which reuses its config.json) or choose another {flag('workdir')}"
        )
    if config.steps != before("steps"):
        if config.lr_schedule != "constant":
            raise ValueError(
                f"{flag('steps')} {config.steps} differs from the {before('steps')} of the run "
                f"in {workdir}, but its {config.lr_schedule} learning-rate schedule decays over "
                f"{flag('steps')}, so the steps already taken belong to another schedule; "
                f"only runs with --lr-schedule constant can be extended. Start a new "
                f"{flag('workdir')} (with --init-from {workdir} to warm start from this run)"
            )
        if config.steps < latest_step:
            raise ValueError(
                f"{flag('steps')} {config.steps} is below the step {latest_step} of the latest "
                f"checkpoint in {workdir}; give at least {latest_step}"
            )


def resolve_config(explicit: dict[str, Any]) -> TrainConfig:
    """The config of a command that sets the fields in ``explicit`` (from a config file and
    flags): when its work directory holds a run, that run's ``config.json`` supplies every
    field not set, so ``--workdir DIR`` alone resumes the run in DIR."""
    workdir = explicit.get("workdir")
    if workdir is None:
        defaults = TrainConfig()
        workdir = default_workdir(
            explicit.get("loss", defaults.loss), explicit.get("dataset", defaults.dataset)
        )
    files = Workdir(workdir)
    saved = files.saved_config() if files.checkpoint_steps() else None
    if saved is None:
        return TrainConfig.from_dict({**explicit, "workdir": workdir})
    try:
        return TrainConfig.from_dict({**saved, **explicit, "workdir": workdir})
    except ValueError as error:
        raise ValueError(f"{error} (in {files.config}, the run this command resumes)") from None


def device_record(mesh) -> dict[str, Any]:
    """What a run computes on: the number and kind of devices of its mesh, and how many
    processes (hosts) share them."""
    import jax

    devices = list(mesh.devices.flat)
    return {
        "devices": len(devices),
        "processes": jax.process_count(),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
    }


class StopOnInterrupt:
    """Inside ``with``, the first Ctrl-C sets :attr:`requested` (the host loop stops after
    the steps in flight, at a checkpoint); a second one interrupts at once. Outside the
    main thread, where Python delivers no signal handler, it does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True
        print("\nstopping after the steps in flight (Ctrl-C again to stop at once)", flush=True)
        self.restore()

    def install(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def __enter__(self) -> StopOnInterrupt:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
