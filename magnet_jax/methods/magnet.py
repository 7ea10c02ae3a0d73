"""The Magnet Loss (Rippel et al., 2016) as a training method: the cluster index is its state.

Refresh: embed the training set, cluster every class with the method's clusterer value
(:class:`magnet_jax.clustering.KMeans` or :class:`~magnet_jax.clustering.Agglomerative`)
and rebuild the :class:`~magnet_jax.index.ClusterIndex`. Step: draw a neighbourhood of M
clusters × D examples, score it with the Magnet loss, and fold the per-example losses and
the batch σ̂² into the index. Evaluation adds the kNC error against centroids recomputed
from the current embeddings (stale centroids err more).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax import evaluation
from magnet_jax import index as index_lib
from magnet_jax.clustering import Agglomerative, KMeans, cluster_purity, clustering_diagnostics
from magnet_jax.evaluators import EvalContext, Metric
from magnet_jax.losses import magnet as magnet_losses
from magnet_jax.methods.base import DataInfo, Embed, Method, TrainingData, active_share


class MagnetStats(NamedTuple):
    """The step's statistics that the index records.

    Attributes:
        example_losses: [B] per-example Magnet losses.
        variance: [] the batch σ̂².
    """

    example_losses: jax.Array
    variance: jax.Array


@dataclasses.dataclass(frozen=True)
class KncError:
    """kNC test error (:func:`magnet_jax.evaluation.knc_predict`) against the index's
    clusters with centroids recomputed from the current training embeddings."""

    num_nearest_clusters: int = 128

    def __call__(self, context: EvalContext) -> Iterable[Metric]:
        index = context.method_state
        if index is None or not context.test_classes_seen:
            return
        fresh = index_lib.recompute_centroids(index, context.train_embeddings)
        predicted = evaluation.knc_predict(
            context.test_embeddings, fresh, num_nearest_clusters=self.num_nearest_clusters
        )
        yield (
            "knc_error",
            float(np.mean(np.asarray(predicted) != np.asarray(context.dataset.y_test))),
        )


@dataclasses.dataclass(frozen=True)
class RunningVariance:
    """The index's running σ² (``sigma2``)."""

    def __call__(self, context: EvalContext) -> Iterable[Metric]:
        if context.method_state is not None:
            yield "sigma2", float(context.method_state.variance)


@dataclasses.dataclass(frozen=True)
class ClusterFinePurity:
    """Share of training examples whose cluster's majority fine label is their own
    (``cluster_fine_purity``; datasets with fine labels only)."""

    def __call__(self, context: EvalContext) -> Iterable[Metric]:
        fine = context.dataset.fine_train
        if context.method_state is None or fine is None:
            return
        yield "cluster_fine_purity", cluster_purity(context.method_state.cluster_ids, fine)


@dataclasses.dataclass(frozen=True)
class Magnet(Method):
    """The Magnet loss with its cluster index.

    Attributes:
        clusters_per_class: K cluster slots per class.
        clusters_per_batch: M clusters per batch (a seed and its M − 1 impostors).
        examples_per_cluster: D examples per cluster.
        alpha: the margin α.
        clusterer: how each class is clustered at a refresh.
        warm_start: with k-means and one restart, every refresh after the first starts
            Lloyd from the previous refresh's centroids instead of k-means++ (the index
            holds them, so a resumed run refreshes exactly as an uninterrupted one).
        num_classes: C, the class ids of the index (None: ``max(label) + 1``).
        num_nearest_clusters: L of the kNC evaluator.
        fine_labels: [N] fine labels of the training set, for the refresh diagnostics
            (purity); None when the dataset has none.
    """

    name = "magnet"
    has_refresh = True
    refresh_embeds_model = True

    clusters_per_class: int = 4
    clusters_per_batch: int = 8
    examples_per_cluster: int = 8
    alpha: float = 1.0
    clusterer: KMeans | Agglomerative = KMeans()
    warm_start: bool = False
    num_classes: int | None = None
    num_nearest_clusters: int = 128
    fine_labels: Any = dataclasses.field(default=None, compare=False, hash=False)

    def check_data(self, info: DataInfo) -> None:
        class_sizes = info.class_sizes()
        num_classes = int(np.count_nonzero(class_sizes))
        if num_classes < 2:
            raise ValueError(
                f"the magnet loss needs training examples of at least 2 classes (impostor "
                f"clusters come from other classes); the training set has {num_classes}"
            )
        present = np.where(class_sizes > 0, class_sizes, np.iinfo(np.int64).max)
        smallest = int(np.argmin(present))
        if self.clusters_per_class > class_sizes[smallest]:
            raise ValueError(
                f"--clusters-per-class K={self.clusters_per_class} is larger than class "
                f"{smallest} ({info.class_names[smallest]!r}) allows: it has only "
                f"{class_sizes[smallest]} training examples; choose K <= {class_sizes[smallest]}"
            )
        other_clusters = (num_classes - 1) * self.clusters_per_class
        if self.clusters_per_batch - 1 > other_clusters:
            raise ValueError(
                f"--clusters-per-batch M={self.clusters_per_batch} needs M-1 = "
                f"{self.clusters_per_batch - 1} impostor clusters of other classes, but with "
                f"{num_classes} classes and K={self.clusters_per_class} there are only "
                f"{other_clusters}; lower M or raise K"
            )

    def init_state(self, info: DataInfo) -> Any:
        # No index before the first refresh, which the trainer runs before any step.
        return None

    def abstract_state(self, info: DataInfo) -> Any:
        num_examples = info.num_examples
        embeddings = jax.ShapeDtypeStruct((num_examples, info.embedding_dim), jnp.float32)
        labels = jax.ShapeDtypeStruct((num_examples,), jnp.int32)
        # index_from_assignments skips its value checks under tracing, so its abstract
        # evaluation gives the shapes and dtypes of a built (or refreshed) index.
        return jax.eval_shape(
            lambda e, y, a: index_lib.index_from_assignments(
                e,
                y,
                a,
                num_classes=self._num_classes(info),
                clusters_per_class=self.clusters_per_class,
                num_impostors=self.clusters_per_batch - 1,
            ),
            embeddings,
            labels,
            labels,
        )

    @property
    def warm_starts_kmeans(self) -> bool:
        # Restarts are independent k-means++ draws; a warm start is a single run.
        return (
            self.warm_start
            and isinstance(self.clusterer, KMeans)
            and self.clusterer.num_restarts == 1
        )

    def _num_classes(self, info: DataInfo) -> int:
        return self.num_classes if self.num_classes is not None else info.num_classes

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
        embeddings = embed(params, data.x)
        if state is None:
            index = index_lib.build_index(
                embeddings,
                data.labels,
                clusters_per_class=self.clusters_per_class,
                num_impostors=self.clusters_per_batch - 1,
                key=key,
                num_classes=self.num_classes,
                clusterer=self.clusterer,
            )
        else:
            index = index_lib.refresh_index(
                state,
                embeddings,
                key=key,
                clusterer=self.clusterer,
                warm_start=self.warm_starts_kmeans,
            )
        if not diagnostics:
            return index, {}
        report = clustering_diagnostics(
            embeddings,
            data.labels,
            index.assignments,
            num_classes=index.num_classes,
            clusters_per_class=index.clusters_per_class,
            fine_labels=self.fine_labels,
        )
        return index, {**report, "valid_clusters": int(jnp.sum(index.valid))}

    def sample(
        self, state: Any, key: jax.Array, data: TrainingData
    ) -> index_lib.NeighbourhoodBatch:
        return index_lib.sample_neighbourhood(
            state,
            key,
            clusters_per_batch=self.clusters_per_batch,
            examples_per_cluster=self.examples_per_cluster,
        )

    def loss(self, model, params, embeddings, batch):
        terms = magnet_losses.magnet_terms(
            embeddings, batch.labels, batch.cluster_ids, alpha=self.alpha
        )
        return jnp.mean(terms.losses), MagnetStats(terms.losses, terms.variance)

    def update(self, state, batch, stats: MagnetStats, params):
        return index_lib.record_batch(
            state, batch.cluster_ids, stats.example_losses, stats.variance
        )

    def step_metrics(self, stats: MagnetStats) -> dict[str, jax.Array]:
        # The hinge saturates: the mean loss nears 0 long before training is over.
        return {"active": active_share(stats.example_losses)}

    def evaluators(self) -> tuple:
        return (KncError(num_nearest_clusters=self.num_nearest_clusters),)
