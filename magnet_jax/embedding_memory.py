"""The embeddings the train steps computed, kept for the next refresh (``--embedding-memory``).

Every train step embeds its batch with the parameters of that step. With a memory, the
step also writes those embeddings, and the step number, into one row per training
example; a refresh then reuses every row written within the last ``max_age`` steps and
embeds only the others with the current parameters (the paper's refresh embeds them all).
A row is as old as the step that wrote it: reused rows are at most ``max_age`` steps
behind the parameters that embed the rest.

The memory is part of :class:`~magnet_jax.training.TrainState`, so a checkpoint holds it
and a resumed run reuses exactly the rows an uninterrupted run would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# The step of a row no train step has written yet: older than any bound.
NEVER = np.iinfo(np.int32).min


@struct.dataclass
class EmbeddingMemory:
    """Attributes:
    embeddings: ``[N, E]`` the latest embedding a train step computed for each example.
    step: ``[N]`` int32, the step that computed it; :data:`NEVER` for rows no step wrote.
    """

    embeddings: jax.Array
    step: jax.Array


def empty(num_examples: int, dim: int, dtype=jnp.float32) -> EmbeddingMemory:
    """A memory of ``num_examples`` rows of ``dim`` features, none written."""
    return EmbeddingMemory(
        embeddings=jnp.zeros((num_examples, dim), dtype),
        step=jnp.full((num_examples,), NEVER, jnp.int32),
    )


def remember(
    memory: EmbeddingMemory, indices: jax.Array, embeddings: jax.Array, step: jax.Array
) -> EmbeddingMemory:
    """Writes a step's batch into the memory (jittable).

    Args:
      memory: the memory, ``[N, E]``.
      indices: ``[B]`` int training-set rows of the batch; a row may repeat (the copies
        carry the same embedding: the step embeds identical inputs identically).
      embeddings: ``[B, E]`` their embeddings at step ``step``.
      step: ``[]`` int32, the step that computed them.
    """
    embeddings = jax.lax.stop_gradient(embeddings).astype(memory.embeddings.dtype)
    return EmbeddingMemory(
        embeddings=memory.embeddings.at[indices].set(embeddings),
        step=memory.step.at[indices].set(step),
    )


def stale_rows(memory: EmbeddingMemory, step: int, max_age: int) -> np.ndarray:
    """Rows a refresh at ``step`` must embed: those not written within the last
    ``max_age`` steps (``written < step − max_age``), as sorted int64 indices on the host."""
    written = np.asarray(jax.device_get(memory.step)).astype(np.int64)
    return np.flatnonzero(written < step - max_age)
