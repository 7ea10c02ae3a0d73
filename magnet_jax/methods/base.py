"""The interface between the trainer and a training method.

A :class:`Method` owns everything that differs between ``--loss`` choices: its auxiliary
state (the Magnet cluster index; nothing for the other losses), how that state is
initialised, refreshed from the embedded training set and updated after each step, how a
batch is drawn and scored, what learnable parameters the method adds to the model's, and
which evaluators it contributes. The trainer holds the method state as an opaque pytree:
it decides *when* to refresh, evaluate, log and checkpoint, never *what* a refresh does.

Inside the jitted step, one step is::

    batch = method.sample(method_state, key, data)           # batch.indices: [B] rows
    loss, stats = method.loss(model, params, embeddings, batch)   # differentiated
    method_state = method.update(method_state, batch, stats, new_params)

``stats`` is the method's own pytree (the Magnet loss's per-example losses and σ̂²);
the trainer reads it only through :meth:`Method.step_metrics`, the scalars it logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax import sampling


class TrainingData(NamedTuple):
    """The training set as the jitted step sees it (replicated on every device).

    Attributes:
        x: [N, ...] inputs; with ``--input stream`` a :class:`magnet_jax.streaming.Loader`
            on the host, which the jitted step never sees (the trainer passes None there
            and reads the sampled rows itself).
        labels: [N] int32 classes, or None for a method that reads no labels.
        class_table: examples grouped by class (class-balanced batches), or None with
            ``labels``.
    """

    x: jax.Array
    labels: jax.Array | None
    class_table: sampling.GroupTable | None


class LabelledBatch(NamedTuple):
    """A batch drawn by index into the training set.

    Attributes:
        indices: [B] int32 training-set rows.
        labels: [B] int32 class of each row.
    """

    indices: jax.Array
    labels: jax.Array


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a method may know about the training set when it is set up (host values).

    Attributes:
        num_examples: N.
        num_classes: C, the number of class ids (some may have no training example).
        class_names: the name of every class id.
        labels: [N] int numpy labels, or None when the method reads no labels.
        embedding_dim: d, the width of the embeddings the model produces.
        model_params: the model's parameters as ``jax.ShapeDtypeStruct`` leaves (the
            structure of a momentum copy of the network), set once the model is built;
            None before.
    """

    num_examples: int
    num_classes: int
    class_names: Sequence[str]
    labels: np.ndarray | None
    embedding_dim: int
    model_params: Any = None

    def class_sizes(self) -> np.ndarray:
        """[C] training examples per class."""
        return np.bincount(self.labels, minlength=self.num_classes)


# (params, x [N, ...]) -> embeddings [N, d], sharded and chunked by the trainer.
Embed = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method: batch sampler, loss, auxiliary state and its updates.

    Subclasses are frozen dataclasses of their hyperparameters, so a method is a
    hashable value closed over by the jitted step. The defaults describe a method with
    no state, no refresh and no parameters of its own.

    Class attributes:
        name: the ``--loss`` name (a key of :data:`magnet_jax.methods.METHODS`).
        needs_labels: False for a method that never reads a label; the trainer then
            passes ``TrainingData.labels = None``.
        has_refresh: True when :meth:`refresh` must run before the first step and then
            periodically (the trainer decides when).
        refresh_embeds_model: True when :meth:`refresh` embeds the training set with the
            trained parameters it is given (not a copy such as a momentum network), so
            the embeddings the train steps computed can stand in for some of its own
            (``--embedding-memory``).
        classifier, proxies: the heads the method asks the model for
            (:func:`magnet_jax.models.create_model`).
    """

    name: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = True
    has_refresh: ClassVar[bool] = False
    refresh_embeds_model: ClassVar[bool] = False
    classifier: ClassVar[bool] = False
    proxies: ClassVar[bool] = False

    batch_size: int = 64

    # -- set-up (host) -------------------------------------------------------------

    def check_data(self, info: DataInfo) -> None:
        """Raises ValueError (naming the flag) when the training set cannot feed a batch."""

    def init_params(self, key: jax.Array, info: DataInfo) -> dict:
        """Learnable parameters of the method's own, trained with the model's.

        A non-empty dict is stored in the run's parameters under the key ``"method"``
        (next to the model's) and reaches :meth:`loss` and :meth:`update` as
        ``params["method"]``. Default: none.
        """
        return {}

    def init_state(self, info: DataInfo) -> Any:
        """The state before the first refresh (a pytree; ``()`` when there is none)."""
        return ()

    def abstract_state(self, info: DataInfo) -> Any:
        """The refreshed state's structure as ``jax.ShapeDtypeStruct`` leaves, computed
        without a refresh: what a checkpoint is restored into."""
        return ()

    # -- refresh (host, between steps) ---------------------------------------------

    def refresh(
        self,
        state: Any,
        *,
        embed: Embed,
        params: Any,
        data: TrainingData,
        key: jax.Array,
        diagnostics: bool = False,
    ) -> tuple[Any, dict]:
        """The state rebuilt from the embedded training set, and diagnostics to log.

        ``embed(params_or_a_copy, data.x)`` embeds the training set; a method with an
        EMA copy of the network embeds with the copy it keeps in its state.
        """
        return state, {}

    # -- inside the jitted step ----------------------------------------------------

    def sample(self, state: Any, key: jax.Array, data: TrainingData) -> Any:
        """A batch pytree with ``indices`` [B] int32 rows of ``data.x``."""
        raise NotImplementedError

    def loss(self, model: Any, params: Any, embeddings: jax.Array, batch: Any):
        """``(loss [], stats)``: the global-batch loss that is differentiated with respect
        to ``params`` (model and method parameters) and the method's own per-step
        statistics (a pytree, ``()`` when there are none)."""
        raise NotImplementedError

    def update(self, state: Any, batch: Any, stats: Any, params: Any) -> Any:
        """The state after a step: ``stats`` of :meth:`loss`, ``params`` the new ones."""
        return state

    def step_metrics(self, stats: Any) -> dict[str, jax.Array]:
        """Scalars ``[]`` of one step, from the ``stats`` of :meth:`loss`, that the trainer
        averages over the steps it logs (``history.jsonl``, the progress bar). Default: none.

        The hinge and mined losses report ``active``, the share of the batch's examples
        with a non-zero loss (:func:`active_share`): their loss can sit near zero for most
        of a run while fewer and fewer examples still contribute. The softmax-type losses
        report nothing: every example has a positive cross-entropy.
        """
        return {}

    # -- evaluation ----------------------------------------------------------------

    def evaluators(self) -> tuple:
        """Evaluators (:mod:`magnet_jax.evaluators`) that only this method can run."""
        return ()


def active_share(losses: jax.Array) -> jax.Array:
    """The share of the batch's examples with a non-zero loss.

    Args:
        losses: [B, ...] non-negative losses with the example (the anchor) first: [B] per
            example, or [B, B] / [B, B, B] per pair or triplet, zero where a term is not
            one of the loss's.

    Returns:
        [] the fraction of the B examples with at least one positive term.
    """
    active = jnp.any(jnp.reshape(losses, (losses.shape[0], -1)) > 0, axis=1)
    return jnp.mean(active.astype(jnp.float32))


def has_state(state: Any) -> bool:
    """True when a method state holds arrays (it is checkpointed)."""
    return bool(jax.tree.leaves(state))
