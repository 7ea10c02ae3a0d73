"""Pluggable evaluators: small objects of an evaluation context that yield named metrics.

An evaluator is any callable ``evaluator(context) -> Iterable[(name, value)]``; the
trainer logs, the command prints and the plots draw whatever the evaluators of a run
yield. An evaluator that does not apply yields nothing: the classification evaluators
(kNN, kNC, classifier) yield nothing when the test classes were not seen in training (a
class-disjoint split), where only retrieval metrics mean something.

:func:`default_evaluators` lists what :func:`magnet_jax.training.evaluate` runs:
retrieval metrics, kNN error, the method's own evaluators (kNC for the Magnet loss, the
classifier's error for softmax) and, on datasets with fine labels, the hierarchy errors.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax import evaluation

Metric = tuple[str, float]


class EvalContext:
    """What an evaluator may read: the embeddings of the current parameters and the run.

    Attributes:
        params: the run's parameters (model and method).
        method_state: the method's state (the Magnet index; ``()`` for most losses).
        model: the model with ``params`` merged in (its ``logits`` head when it has one).
        dataset: the :class:`magnet_jax.data.Dataset` (labels, fine labels, ``recall_ks``).
        train_embeddings: [N, d] the training set embedded with ``params``.
        test_embeddings: [T, d] the test set embedded with ``params``.

    The embeddings may be given as arrays or as functions of no argument, called on first
    use: an evaluation that needs no training embeddings never computes them.
    """

    def __init__(
        self,
        *,
        params: Any,
        method_state: Any,
        model: Any,
        dataset: Any,
        train_embeddings: jax.Array | Callable[[], jax.Array],
        test_embeddings: jax.Array | Callable[[], jax.Array],
    ):
        self.params = params
        self.method_state = method_state
        self.model = model
        self.dataset = dataset
        self._train_source = train_embeddings
        self._test_source = test_embeddings

    @functools.cached_property
    def train_embeddings(self) -> jax.Array:
        source = self._train_source
        return source() if callable(source) else source

    @functools.cached_property
    def test_embeddings(self) -> jax.Array:
        source = self._test_source
        return source() if callable(source) else source

    @property
    def test_classes_seen(self) -> bool:
        """False under a class-disjoint split (some test class has no training example):
        then classifying a test query by the training set is meaningless."""
        return bool(self.dataset.test_classes_seen)


Evaluator = Callable[[EvalContext], Iterable[Metric]]


@dataclasses.dataclass(frozen=True)
class KnnError:
    """Share of test queries whose k nearest training examples vote another class
    (:func:`magnet_jax.evaluation.knn_predict`), as ``name`` (default ``knn_error``)."""

    k: int = 1
    name: str = "knn_error"

    def __call__(self, context: EvalContext) -> Iterable[Metric]:
        if not context.test_classes_seen:
            return
        dataset = context.dataset
        predicted = evaluation.knn_predict(
            context.test_embeddings,
            context.train_embeddings,
            jnp.asarray(dataset.y_train, jnp.int32),
            k=self.k,
            num_classes=dataset.num_classes,
        )
        yield self.name, float(np.mean(np.asarray(predicted) != np.asarray(dataset.y_test)))


@dataclasses.dataclass(frozen=True)
class ClassifierError:
    """Test error of the model's classifier head (the softmax loss)."""

    def __call__(self, context: EvalContext) -> Iterable[Metric]:
        if not context.test_classes_seen:
            return
        logits = jax.jit(context.model.logits)(context.test_embeddings)
        predicted = np.asarray(jnp.argmax(logits, -1))
        yield "classifier_error", float(np.mean(predicted != np.asarray(context.dataset.y_test)))


@dataclasses.dataclass(frozen=True)
class Retrieval:
    """Recall@k (for the dataset's ``recall_ks``), precision@1, R-precision, MAP@R, NMI and
    AMI of the test set as its own gallery (:func:`magnet_jax.evaluation.retrieval_metrics`);
    meaningful on unseen classes too."""

    def __call__(self, context: EvalContext) -> Iterable[Metric]:
        dataset = context.dataset
        retrieval = evaluation.retrieval_metrics(
            context.test_embeddings,
            jnp.asarray(np.asarray(dataset.y_test)),
            ks=dataset.recall_ks,
            num_classes=dataset.num_classes if context.test_classes_seen else None,
        )
        for name, value in retrieval.items():
            yield name, float(value)


@dataclasses.dataclass(frozen=True)
class FineLabelErrors:
    """Hierarchy recovery on datasets with fine labels (nothing on the others): see
    :func:`fine_label_errors`."""

    ks: Sequence[int] = (1, 5)

    def __call__(self, context: EvalContext) -> Iterable[Metric]:
        dataset = context.dataset
        if dataset.fine_test is None or not context.test_classes_seen:
            return
        yield from fine_label_errors(
            context.train_embeddings,
            dataset.fine_train,
            context.test_embeddings,
            dataset.fine_test,
            ks=tuple(self.ks),
        ).items()


def fine_label_errors(
    train_embeddings, fine_train, test_embeddings, fine_test, *, ks=(1, 5)
) -> dict[str, float]:
    """Hierarchy recovery: how well an embedding trained on coarse labels separates the
    fine ones. ``fine_error_at_k`` is the share of test queries with no training example of
    their fine class among their k nearest training examples (Error@1 is the 1-NN error)."""
    _, neighbours = evaluation.nearest_neighbours(test_embeddings, train_embeddings, k=max(ks))
    neighbour_labels = np.asarray(fine_train)[np.asarray(neighbours)]
    hits = neighbour_labels == np.asarray(fine_test)[:, None]
    return {f"fine_error_at_{k}": float(1.0 - np.mean(np.any(hits[:, :k], axis=1))) for k in ks}


def default_evaluators(method, *, knn_k: int = 1) -> tuple:
    """What :func:`magnet_jax.training.evaluate` runs for ``method``, in order."""
    return (Retrieval(), KnnError(k=knn_k), *method.evaluators(), FineLabelErrors())


def run_evaluators(evaluators: Iterable[Evaluator], context: EvalContext) -> dict[str, float]:
    """The metrics of every evaluator in order; a name yielded twice is an error."""
    metrics: dict[str, float] = {}
    for evaluator in evaluators:
        for name, value in evaluator(context):
            if name in metrics:
                raise ValueError(f"two evaluators yield the metric {name!r}: {evaluator!r}")
            metrics[name] = value
    return metrics
