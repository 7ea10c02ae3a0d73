"""Orbax checkpoints of everything the training loop needs to resume exactly.

A checkpoint holds three items:

- ``state``: the :class:`~magnet_jax.training.TrainState` pytree (params, optimizer state,
  step, RNG key, and the embedding memory of ``--embedding-memory`` runs), stored as the
  dict of its fields that are not None, so that a field added later and unused (None)
  leaves the item as checkpoints of earlier versions hold it;
- ``index``: the training method's state (:mod:`magnet_jax.methods`), only when it holds
  arrays: the :class:`~magnet_jax.index.ClusterIndex` of the Magnet loss. The item keeps
  the name it had when the index was the only such state, so checkpoints of earlier
  versions resume;
- ``meta``: JSON with host-side loop bookkeeping (lines of ``history.jsonl`` written so
  far, seconds trained, the config that produced the run).

Saving is synchronous: when :meth:`Checkpointer.save` returns, the checkpoint is on disk
and finalised. Orbax writes each step into a temporary directory and renames it only when
complete, so a process killed mid-save (even by SIGKILL) leaves a temporary directory that
is never listed as a step and never loaded.

:meth:`Checkpointer.restore_latest` resumes from the newest checkpoint that restores
completely: a newer one that fails (a file of it deleted or truncated on disk) is moved aside
to ``<step>.damaged-<time>``, never deleted, and reported in one line. Save failures (a
full or read-only disk) raise :class:`CheckpointError` naming the checkpoint and the cause.

:func:`complete_steps` and :func:`restore_params` read a run's checkpoints without a
template and without creating anything: what a warm start (``--init-from``) needs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(OSError):
    """A checkpoint could not be written, or none of a run's checkpoints can be read."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


class Restored(NamedTuple):
    step: int
    state: Any
    index: Any  # the method state (None when the checkpoint has none)
    meta: dict


_METHOD_ITEM = "index"


def _state_item(state: Any) -> Any:
    """A dataclass state as the dict of its fields that are not None (Orbax records a
    None field in the tree, and a checkpoint without it would then not restore)."""
    if not dataclasses.is_dataclass(state):
        return state
    values = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
    return {name: value for name, value in values.items() if value is not None}


def _state_from_item(template: Any, item: Any) -> Any:
    """The inverse of :func:`_state_item`, for a state shaped like ``template``."""
    return type(template)(**item) if dataclasses.is_dataclass(template) else item


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) that tell Orbax what to restore into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores ``(state, method state, meta)`` under ``directory/<step>``.

    Args:
        directory: where the step folders go (created on the first save).
        max_to_keep: how many most recent checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=False,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, method_state: Any, meta: dict) -> None:
        """Saves ``step``; ``method_state`` None for a method without arrays of state."""
        items = {
            "state": ocp.args.StandardSave(_state_item(state)),
            "meta": ocp.args.JsonSave(meta),
        }
        if method_state is not None:
            items[_METHOD_ITEM] = ocp.args.StandardSave(method_state)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
            self._manager.wait_until_finished()
        except Exception as error:
            # Orbax leaves at most a temporary folder behind, which is never loaded: the
            # checkpoints already saved are untouched.
            raise CheckpointError(
                f"could not write checkpoint {step} in {self.directory} ({_first_line(error)}); "
                f"the earlier checkpoints there are kept"
            ) from error

    def restore(self, step: int, state_template: Any, method_template: Any) -> Restored:
        """Restores ``step`` into the structure, dtypes and shardings of the templates.

        The templates may be concrete pytrees or ``jax.ShapeDtypeStruct`` trees; pass
        ``method_template=None`` for a method without arrays of state.

        Raises:
            ValueError: the checkpoint has a method state and the method none, or the
                other way round, or a method state of another structure (a checkpoint of
                another loss, or of an incompatible version).
        """
        step_dir = os.path.join(self.directory, str(step))
        saved = os.path.isdir(os.path.join(step_dir, _METHOD_ITEM))
        if saved != (method_template is not None):
            raise ValueError(
                f"checkpoint {step_dir} {'has' if saved else 'has no'} method state "
                f"('{_METHOD_ITEM}'), but this run's loss {'keeps none' if saved else 'needs one'}: "
                f"it was written by a run of another --loss or an incompatible version; "
                f"choose another --workdir"
            )
        items = {
            "state": ocp.args.StandardRestore(_abstract(_state_item(state_template))),
            "meta": ocp.args.JsonRestore(),
        }
        if method_template is not None:
            items[_METHOD_ITEM] = ocp.args.StandardRestore(_abstract(method_template))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as error:
            if method_template is None:
                raise
            raise ValueError(
                f"checkpoint {step_dir} does not match this run's parameters or method state "
                f"({type(method_template).__name__}): it was written by an incompatible "
                f"version or configuration; choose another --workdir ({error})"
            ) from error
        method_state = restored[_METHOD_ITEM] if method_template is not None else None
        state = _state_from_item(state_template, restored["state"])
        return Restored(step, state, method_state, dict(restored["meta"]))

    def restore_latest(
        self,
        state_template: Any,
        method_template: Any,
        *,
        report: Callable[[str], None] = print,
    ) -> Restored | None:
        """The newest checkpoint that restores completely, or ``None`` when there is none.

        A newer checkpoint that fails to restore while an older one succeeds is damaged (the
        same templates restore the older one): it is renamed ``<step>.damaged-<time>`` in
        the same folder, which is no longer a step, and ``report`` gets one line saying so.

        Raises:
            CheckpointError: there are checkpoints and none restores; nothing is moved,
                since the cause may be the templates (another model) rather than the files.
        """
        failures: list[tuple[int, BaseException]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self.restore(step, state_template, method_template)
            except Exception as error:  # tensorstore raises bare Exceptions
                failures.append((step, error))
                continue
            for damaged, error in failures:
                moved = self._move_aside(damaged)
                report(
                    f"checkpoint {damaged} cannot be restored ({_first_line(error)}); "
                    f"moved it to {moved} and resumed from checkpoint {step}"
                )
            if failures:
                self._manager.reload()
            return restored
        if failures:
            reasons = "; ".join(f"step {step}: {_first_line(error)}" for step, error in failures)
            raise CheckpointError(
                f"none of the checkpoints in {self.directory} can be restored ({reasons}); "
                f"move them aside to start afresh in this work directory, or choose another "
                f"--workdir"
            )
        return None

    def _move_aside(self, step: int) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = os.path.join(self.directory, f"{step}.damaged-{stamp}")
        os.rename(os.path.join(self.directory, str(step)), target)
        return target

    def close(self) -> None:
        self._manager.close()


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the finished checkpoints under ``directory``, ascending.

    ``[]`` when the directory does not exist or holds none. Temporary folders of saves
    that never finished are not steps. Reads only: unlike :class:`Checkpointer`, creates
    nothing.
    """
    path = epath.Path(os.path.abspath(os.fspath(directory)))
    if not path.is_dir():
        return []
    return sorted(int(step) for step in ocp.utils.checkpoint_steps(path))


def restore_params(directory: str | os.PathLike, step: int) -> Any:
    """The ``params`` of the ``state`` saved at ``step`` under ``directory``, without a template.

    Returns the nested dict as it was saved, with host ``numpy`` arrays of the saved
    dtypes: dict keys are strings (an ``nnx.List`` index ``0`` comes back as ``"0"``), and
    nothing depends on the model, the mesh or the number of devices of the run that saved
    it. Only the parameters are read, not the optimizer state.

    Raises:
        ValueError: the step holds no ``state`` item with ``params``.
    """
    path = epath.Path(os.path.abspath(os.fspath(directory))) / str(step) / "state"
    if not path.is_dir():
        raise ValueError(f"checkpoint {path.parent} has no 'state' item (looked for {path})")
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(path).tree
        if not isinstance(tree, dict) or "params" not in tree:
            keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
            raise ValueError(f"the state saved in {path} has no 'params' (it has {keys})")
        item = {"params": tree["params"]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = handler.restore(
            path,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    finally:
        handler.close()
    return restored["params"]
