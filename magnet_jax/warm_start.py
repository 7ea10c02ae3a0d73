"""Warm start (``--init-from``): a new run's parameters from a previous run's checkpoint.

The paper's regime fine-tunes a pretrained backbone. :func:`graft_params` copies every
parameter leaf the source has at the same path and shape (the trunk, typically) and leaves
the rest (a head of another size, a classifier for other classes) at their fresh
initialisation; the trainer then initialises the optimizer state from the result.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from magnet_jax.checkpoint import complete_steps, restore_params

__all__ = ["WarmStart", "find_init_checkpoint", "graft_params", "warm_start_params"]


def graft_params(target: Any, source: Any) -> tuple[Any, list[str], list[str]]:
    """``target`` with every leaf that ``source`` has at the same key path and shape.

    Both are nested dicts of arrays (``nnx.to_pure_dict`` trees, or a checkpoint's
    params). A path is the sequence of dict keys from the root, compared as strings, so a
    checkpoint's ``"0"`` matches an ``nnx.List`` index ``0``. A target leaf is copied when
    ``source`` has a leaf at its path with the same shape (cast to the target leaf's
    dtype when the dtypes differ); it keeps its value when ``source`` lacks the path, has
    a subtree there, or has a different shape. Source leaves the target lacks are ignored.
    Pure: neither input is modified.

    Args:
        target: the tree to fill, e.g. a freshly initialised model's parameters.
        source: the tree to copy from.

    Returns:
        ``(params, copied, skipped)``: a tree of ``target``'s structure, and the
        ``/``-joined paths of the target leaves that were copied and of those left as they
        were (together every target leaf once, in the target's order).
    """
    copied: list[str] = []
    skipped: list[str] = []

    def graft(target_node: Any, source_node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(target_node, dict):
            by_name = (
                {str(key): value for key, value in source_node.items()}
                if isinstance(source_node, dict)
                else {}
            )
            return {
                key: graft(value, by_name.get(str(key)), (*path, str(key)))
                for key, value in target_node.items()
            }
        name = "/".join(path)
        matches = (
            source_node is not None
            and not isinstance(source_node, dict)
            and np.shape(source_node) == np.shape(target_node)
        )
        if not matches:
            skipped.append(name)
            return target_node
        copied.append(name)
        dtype = getattr(target_node, "dtype", None)
        if dtype is not None and getattr(source_node, "dtype", None) != dtype:
            source_node = (
                source_node.astype(dtype)
                if hasattr(source_node, "astype")
                else np.asarray(source_node, dtype)
            )
        return source_node

    return graft(target, source, ()), copied, skipped


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """What :func:`prepare` copied from ``--init-from`` into the initial parameters.

    Attributes:
        source: the source's checkpoints directory (absolute).
        source_step: the step of the checkpoint read.
        copied: paths of the parameter leaves copied from it.
        skipped: paths of the leaves left at their fresh initialisation.
    """

    source: str
    source_step: int
    copied: tuple[str, ...]
    skipped: tuple[str, ...]

    @property
    def total(self) -> int:
        return len(self.copied) + len(self.skipped)

    def record(self) -> dict[str, Any]:
        """The ``history.jsonl`` line: ``{"kind": "init", "step": 0, ...}``."""
        return {
            "kind": "init",
            "step": 0,
            "source": self.source,
            "source_step": self.source_step,
            "copied": len(self.copied),
            "total": self.total,
            "skipped": list(self.skipped),
        }

    def summary(self) -> str:
        fresh = f"; fresh: {', '.join(self.skipped)}" if self.skipped else ""
        return (
            f"warm start from {self.source} (step {self.source_step}): copied {len(self.copied)}/{self.total} "
            f"parameter arrays{fresh}"
        )


def find_init_checkpoint(path: str) -> tuple[str, int]:
    """The checkpoints directory and latest complete step that ``--init-from path`` names.

    ``path`` is a previous run's work directory (holding ``checkpoints/``) or that
    ``checkpoints`` directory itself. Reads only.

    Raises:
        ValueError: ``path`` is not a directory, or no complete checkpoint is found there.
    """
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise ValueError(
            f"--init-from {path!r}: no such directory ({root}); give the --workdir of a previous run "
            f"(the folder holding its checkpoints/)"
        )
    nested = os.path.join(root, "checkpoints")
    directory = nested if os.path.isdir(nested) else root
    steps = complete_steps(directory)
    if not steps:
        looked = f"{nested}/<step>" if directory == nested else f"{nested}/<step> and {root}/<step>"
        raise ValueError(
            f"--init-from {path!r}: no complete checkpoint in {directory} (looked for {looked}, the step "
            f"folders `magnet-jax train` writes; a run that stopped before its first checkpoint has none)"
        )
    return directory, steps[-1]


def warm_start_params(path: str, directory: str, step: int, params: Any) -> tuple[Any, WarmStart]:
    """Grafts the checkpoint's parameters onto ``params``; raises when nothing matches."""
    source = restore_params(directory, step)
    grafted, copied, skipped = graft_params(params, source)
    if not copied:

        def shapes(tree):
            flat = jax.tree_util.tree_flatten_with_path(tree)[0]
            return ", ".join(
                "/".join(str(getattr(k, "key", k)) for k in key_path) + f" {tuple(np.shape(leaf))}"
                for key_path, leaf in flat
            )

        raise ValueError(
            f"--init-from {path!r}: none of the new model's {len(skipped)} parameter arrays matches one in "
            f"{directory}/{step} by path and shape, so nothing would be copied (a different architecture?). "
            f"New model: {shapes(params)}. Checkpoint: {shapes(source)}"
        )
    return grafted, WarmStart(directory, step, tuple(copied), tuple(skipped))
