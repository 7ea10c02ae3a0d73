"""Orbax checkpoints of everything the training loop needs to resume exactly.

A checkpoint holds three items:

- ``state``: the :class:`~magnet_jax.training.TrainState` pytree (params, optimizer state,
  step, RNG key);
- ``index``: the :class:`~magnet_jax.index.ClusterIndex` pytree (Magnet Loss only);
- ``meta``: JSON with host-side loop bookkeeping (lines of ``history.jsonl`` written so
  far, seconds trained, the config that produced the run).

Saving is synchronous: when :meth:`Checkpointer.save` returns, the checkpoint is on disk
and finalised. Orbax writes each step into a temporary directory and renames it only when
complete, so a process killed mid-save (even by SIGKILL) leaves a temporary directory that
is never listed as a step and never loaded.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp


class Restored(NamedTuple):
    step: int
    state: Any
    index: Any
    meta: dict


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) that tell Orbax what to restore into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores ``(state, index, meta)`` under ``directory/<step>``.

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

    def save(self, step: int, state: Any, index: Any, meta: dict) -> None:
        items = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave(meta),
        }
        if index is not None:
            items["index"] = ocp.args.StandardSave(index)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, state_template: Any, index_template: Any) -> Restored:
        """Restores ``step`` into the structure, dtypes and shardings of the templates.

        The templates may be concrete pytrees or ``jax.ShapeDtypeStruct`` trees; pass
        ``index_template=None`` for losses without a cluster index.
        """
        items = {
            "state": ocp.args.StandardRestore(_abstract(state_template)),
            "meta": ocp.args.JsonRestore(),
        }
        if index_template is not None:
            items["index"] = ocp.args.StandardRestore(_abstract(index_template))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        index = restored["index"] if index_template is not None else None
        return Restored(step, restored["state"], index, dict(restored["meta"]))

    def close(self) -> None:
        self._manager.close()
