"""Checks that a run stays finite where the loss check cannot see it.

The loss of a step is computed with the parameters *before* its update, so an update can
leave NaN or inf in the parameters while every logged loss was finite, and finite
parameters can still overflow to inf embeddings on some inputs. Either then surfaces far
from its cause: a checkpoint that resumes into NaN, a refresh whose k-means reports a
non-finite variance, evaluation metrics of 0. The trainer checks the train state after
every stretch of steps (so a non-finite one is never checkpointed) and the embeddings at
every refresh and evaluation; :class:`NonFiniteError` says what is not finite, and the
trainer adds the step and which checkpoint is kept.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_SHOWN = 5  # rows or arrays named in a message


class NonFiniteError(FloatingPointError):
    """Embeddings or a train state holding NaN or inf; the message says which."""


@jax.jit
def _finite_rows(embeddings: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(embeddings.reshape(embeddings.shape[0], -1)), axis=1)


def check_embeddings(embeddings: jax.Array, what: str) -> jax.Array:
    """Returns ``embeddings`` when every value is finite.

    Args:
        embeddings: [N, d] embeddings (sharded or replicated).
        what: what was embedded, for the message (``"training set"``, ``"test set"``).

    Raises:
        NonFiniteError: naming how many of the N rows hold NaN or inf, and the first few.
    """
    finite = np.asarray(_finite_rows(embeddings))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        shown = ", ".join(str(row) for row in bad[:_SHOWN]) + (", ..." if len(bad) > _SHOWN else "")
        raise NonFiniteError(
            f"the embeddings of the {what} became NaN or inf in {len(bad)} of {len(finite)} "
            f"rows (rows {shown})"
        )
    return embeddings


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


@jax.jit
def _finite_leaves(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: jnp.all(jnp.isfinite(leaf)), tree)


def nonfinite_leaves(tree: Any) -> list[str]:
    """The paths (``params/trunk/layers/0/kernel``) of the floating-point leaves of ``tree``
    that hold NaN or inf, in tree order; ``[]`` when all are finite."""
    floating = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    finite = jax.device_get(_finite_leaves([leaf for _, leaf in floating]))
    return [
        "/".join(_key_name(key) for key in path)
        for (path, _), ok in zip(floating, finite)
        if not bool(ok)
    ]


def check_state(params: Any, opt_state: Any) -> None:
    """Raises :class:`NonFiniteError` naming the parameter and optimizer-state arrays that
    hold NaN or inf (the first few, and how many of all)."""
    tree = {"params": params, "optimizer state": opt_state}
    bad = nonfinite_leaves(tree)
    if bad:
        total = len(jax.tree.leaves(tree))
        shown = ", ".join(bad[:_SHOWN]) + (", ..." if len(bad) > _SHOWN else "")
        raise NonFiniteError(
            f"{len(bad)} of {total} arrays of the train state became NaN or inf ({shown})"
        )
