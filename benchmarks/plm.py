"""Label-free fine-tuning with piecewise-linear manifolds (``--loss plm``) on unseen classes.

The emoji set's class-disjoint split (``--split classes``: train on the first half of the
classes, test retrieval on the unseen rest), starting from the ImageNet-pretrained
EfficientNet-Lite0 at 64 x 64 with its first ``--freeze-stages`` stages frozen and cached
(``--cache-prefix``). Training reads no label (the method gets none); labels are used
only to score.

Per seed, the library's own run and loop (:func:`magnet_jax.training.prepare`,
:func:`magnet_jax.training.learning_curve`) trains PLM and evaluates the test set at the
given iterations (0 = the pretrained network with its fresh embedding head): Recall@1/2/4/8
and MAP@R of the unseen classes. Once, the same metrics of the raw pretrained pooled
features (1280-d, no head). And the paper's similarity-quality comparison on the
*training* set, on the momentum embeddings the pieces are fitted to (at iteration 0 and
after training): label purity of the neighbourhoods and Pearson correlation of the
similarity with the same-class indicator, for the linear pieces, for the plain k-NN
table, and for k-means and agglomerative (Ward) clustering of the same embeddings with as
many clusters as there are training classes (the library's clusterers, one "class").
The correlation is taken over the pairs the method scores: every point with each of its
k table neighbours (all pairs would be almost all negatives at ~7 images per class).

The "cluster, then fine-tune" baselines (``--baselines``, every seed): cluster the
*training* images' pooled pretrained features with the library's k-means or agglomerative
(Ward) clustering into ``--pseudo-clusters`` K clusters (``kmeans@K+LOSS`` for another
K), then train the supervised Magnet or triplet loss on the cluster ids as labels, with
PLM's batch shape (16 × 4), steps, learning rate and refresh interval (Magnet: one
cluster per pseudo-class in its index, ``clusters_per_class=1``). K is fixed
(:data:`PSEUDO_CLUSTERS`) because a label-free method is not told how many classes there
are; the true labels only score the pseudo-labels afterwards. ``labels+LOSS`` is the
supervised reference: the same training on the true labels (not label-free).

Equal-size purity (:func:`equal_size_purity`, first seed): the purity of each point's
piece against neighbourhoods of the same size from the k-NN table (with the sizes handed
to random points) and from each clustering, so that small pieces are not purer merely for
being small.

Ablations (first PLM seed, ``--ablations``, :data:`ABLATIONS`): no subset selection, binary
similarity, one-directional (orthogonal-only) decay, and N_ρ = 0, 25, 400 proxies.

    python benchmarks/plm.py                                  # the full benchmark
    python benchmarks/plm.py --seeds 0 1 2 --plm-seeds 0 --parts plm baselines ablations \
        --ablation-names one_directional_decay no_proxies proxies_400 --output plm_baselines
    python benchmarks/plm.py --quick                          # synthetic images, seconds

Writes ``results/<--output>.json`` (command, commit, load, seeds, settings, every number)
and ``results/<--output>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# MAGNET_JAX_RESULTS redirects the output (the tests use it so CI leaves the repo clean).
RESULTS = Path(os.environ.get("MAGNET_JAX_RESULTS", Path(__file__).resolve().parent / "results"))
DATA_DIR = Path(os.environ.get("MAGNET_JAX_DATA", "/work/shared/datasets"))
RETRIEVAL = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8")
MAP_R = "mean_average_precision_at_r"
PARTS = ("plm", "baselines", "ablations")
# K of the pseudo-label baselines, fixed before any run: a label-free method is not told
# how many classes there are (the emoji training split has 818; 512 was not tuned).
PSEUDO_CLUSTERS = 512
# "Cluster, then fine-tune": CLUSTERING+LOSS, trained on the cluster ids.
BASELINES = ("kmeans+magnet", "ward+magnet", "kmeans+triplet", "ward+triplet")
# PLM ablations (one seed): config overrides.
ABLATIONS = {
    "no_subset_selection": {"plm_subset_selection": False},
    "binary_similarity": {"plm_similarity": "binary"},
    "one_directional_decay": {"plm_similarity": "orthogonal_only"},
    "no_proxies": {"plm_proxies": 0},
    "proxies_25": {"plm_proxies": 25},
    "proxies_400": {"plm_proxies": 400},
}


def log(message: str) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def base_config(args, seed: int, **overrides):
    from magnet_jax.config import TrainConfig

    values = dict(
        dataset="emoji",
        data_dir=str(args.data_dir),
        split="classes",
        image_size=getattr(args, "image_size", 64),
        backbone="efficientnet_lite0",
        pretrained=True,
        freeze_stages=args.freeze_stages,
        cache_prefix=True,
        normalize=True,
        embedding_dim=args.embedding_dim,
        loss="plm",
        clusters_per_batch=args.anchors,
        examples_per_cluster=args.examples_per_anchor,
        steps=max(args.eval_steps),
        refresh_every=args.refresh_every,
        lr=args.lr,
        lr_schedule="constant",
        plm_neighbours=args.neighbours,
        plm_max_rank=args.max_rank,
        plm_error_threshold=args.error_threshold,
        plm_proxies=args.proxies,
        plm_momentum=args.momentum,
        num_devices=1,
        seed=seed,
        workdir="/nonexistent-unused",
    )
    values.update(overrides)
    return TrainConfig(**values)


def share_prefix_cache() -> None:
    """Computes the frozen stages' output once per process instead of once per run.

    Every run here starts from the same pretrained, frozen stages (the seed draws only the
    head and the batches), so their output on the same images is the same; ``prepare``
    would recompute it for every run (minutes on a busy 2-core CPU). A run that finds a
    cached output still records, and checks, the frozen parameters it depends on.
    """
    from magnet_jax.backbones import trainer as backbone_trainer

    compute = backbone_trainer.cache_prefix
    cache: dict = {}

    def cached(config, setup_, graphdef, params, x_train, x_test):
        key = (config.freeze_stages, id(x_train), id(x_test))
        if key not in cache:
            cache[key] = (
                compute(config, setup_, graphdef, params, x_train, x_test),
                setup_.prefix_params,
            )
            return cache[key][0]
        outputs, prefix_params = cache[key]
        setup_.prefix_stages = config.freeze_stages
        setup_.prefix_params = prefix_params
        if not backbone_trainer.prefix_is_current(setup_, graphdef, params):
            raise RuntimeError("the frozen stages differ between runs: the cache is unsound")
        return outputs

    backbone_trainer.cache_prefix = cached


def quick_dataset(image_size: int = 32):
    """Seconds-sized stand-in for the emoji split (``--quick``): 8 classes of 12 random
    images (in [0, 1]) around a class pattern, the first 4 classes to train, the rest unseen."""
    from magnet_jax.data import Dataset

    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, size=(8, image_size, image_size, 3))
    y = np.repeat(np.arange(8), 12).astype(np.int32)
    x = np.clip(patterns[y] + rng.normal(0, 40, size=patterns[y].shape), 0, 255)
    x = (x / 255.0).astype(np.float32)  # as the image loaders give them
    train = y < 4
    return Dataset(
        name="quick",
        x_train=x[train],
        y_train=y[train],
        x_test=x[~train],
        y_test=y[~train],
        class_names=tuple(str(c) for c in range(8)),
    )


def equal_size_purity(
    neighbours: np.ndarray,
    piece_sizes: np.ndarray,
    labels: np.ndarray,
    cluster_assignments: dict[str, np.ndarray],
    seed: int,
) -> dict:
    """Label purity of neighbourhoods of the same size as each point's linear piece.

    A point's piece holds itself and its first ``n_i = piece_sizes[i] - 1`` table
    neighbours, so "its n_i nearest neighbours" is its piece: the two purities are equal by
    construction. What can tell them apart is whether subset selection picks *where* to
    stop: the k-NN table with the same sizes handed out to random points (a permutation
    of ``n``). A clustering's neighbourhood of the same size is ``n_i`` members drawn
    uniformly from the rest of i's cluster; the expected purity of such a draw is the
    share of i's class among them whatever ``n_i``, taken over the points whose cluster
    has at least ``n_i`` other members in every clustering (the others are left out of
    every column, so all columns average over the same points).

    Args:
      neighbours: [N, k] the neighbour table, nearest first.
      piece_sizes: [N] points in each piece (itself included), in [1, k + 1].
      labels: [N] ground-truth labels (only to score).
      cluster_assignments: name -> [N] cluster of every point.
      seed: of the permutation.

    Returns:
      ``{"points": share of the N points compared, "mean_size": mean n_i over them,
      "plm": ..., "knn_table": ..., "knn_table_permuted_sizes": ..., name: ...}``.
    """
    num, k = neighbours.shape
    sizes = np.asarray(piece_sizes) - 1
    same = labels[neighbours] == labels[:, None]
    permuted = np.random.default_rng(seed).permutation(sizes)
    columns = np.arange(k)[None, :]
    purities = {
        "plm": (same & (columns < sizes[:, None])).sum(1) / np.maximum(sizes, 1),
        "knn_table_permuted_sizes": (same & (columns < permuted[:, None])).sum(1)
        / np.maximum(permuted, 1),
    }
    keep = (sizes >= 1) & (permuted >= 1)
    for name, assignments in cluster_assignments.items():
        _, cluster = np.unique(assignments, return_inverse=True)
        _, label = np.unique(labels, return_inverse=True)
        joint = np.zeros((cluster.max() + 1, label.max() + 1), dtype=np.int64)
        np.add.at(joint, (cluster, label), 1)
        others = joint.sum(axis=1)[cluster] - 1
        purities[name] = (joint[cluster, label] - 1) / np.maximum(others, 1)
        keep &= others >= sizes
    out = {"points": float(keep.mean()), "mean_size": float(sizes[keep].mean())}
    out.update({name: float(values[keep].mean()) for name, values in purities.items()})
    out["knn_table"] = out["plm"]  # the same neighbourhoods (see above)
    return out


def similarity_quality(
    state, labels: np.ndarray, num_clusters: int, seed: int, clusterers: bool = True
) -> dict:
    """Purity and similarity/same-class correlation of the pieces, the k-NN table,
    k-means and agglomerative clustering of the state's momentum embeddings."""
    import jax
    import jax.numpy as jnp

    from magnet_jax import manifolds
    from magnet_jax.clustering import Agglomerative, KMeans

    embeddings = np.asarray(state.embeddings)
    neighbours = np.asarray(state.neighbours)
    num, k = neighbours.shape
    rows = np.repeat(np.arange(num), k)
    cols = neighbours.reshape(-1)
    same_class = labels[rows] == labels[cols]
    members = np.asarray(manifolds.piece_members(state.pieces, neighbours))
    forward = manifolds.pair_similarities(embeddings, state.pieces, rows, cols)
    backward = manifolds.pair_similarities(embeddings, state.pieces, cols, rows)
    plm_similarity = 0.5 * (np.asarray(forward) + np.asarray(backward))  # as the targets
    out = {
        "plm": {
            "purity": manifolds.neighbourhood_purity(neighbours, members, labels),
            "correlation": manifolds.similarity_correlation(plm_similarity, same_class),
            "mean_piece_size": float(np.mean(np.asarray(state.pieces.sizes))),
            "mean_piece_rank": float(np.mean(np.asarray(state.pieces.ranks))),
        },
        "knn_table": {
            "purity": manifolds.neighbourhood_purity(neighbours, np.ones_like(members), labels),
            # Rank similarity 1 - j/k of the j-th neighbour: the k-NN graph's own estimate.
            "correlation": manifolds.similarity_correlation(
                np.tile(1.0 - np.arange(k) / k, num), same_class
            ),
        },
    }
    if not clusterers:
        return out
    one_class = jnp.zeros(num, jnp.int32)
    clusterer_values = {
        "kmeans": KMeans(),
        "agglomerative": Agglomerative(linkage="ward", max_points_per_class=num),
    }
    started = time.perf_counter()
    from sklearn.cluster import KMeans as SklearnKMeans

    assignments = SklearnKMeans(num_clusters, n_init=1, random_state=seed).fit_predict(embeddings)
    out["kmeans_sklearn"] = {
        "purity": manifolds.assignment_purity(assignments, labels),
        "correlation": manifolds.similarity_correlation(
            assignments[rows] == assignments[cols], same_class
        ),
        "clusters": int(len(np.unique(assignments))),
        "seconds": time.perf_counter() - started,
    }
    cluster_assignments = {"kmeans_sklearn": assignments}
    for name, clusterer in clusterer_values.items():
        started = time.perf_counter()
        result = clusterer(
            jnp.asarray(embeddings),
            one_class,
            clusters_per_class=num_clusters,
            key=jax.random.PRNGKey(seed),
            num_classes=1,
        )
        assignments = np.asarray(result.assignments)
        out[name] = {
            "purity": manifolds.assignment_purity(assignments, labels),
            "correlation": manifolds.similarity_correlation(
                assignments[rows] == assignments[cols], same_class
            ),
            "clusters": int(len(np.unique(assignments))),
            "seconds": time.perf_counter() - started,
        }
        cluster_assignments[name] = assignments
    out["equal_size_purity"] = equal_size_purity(
        neighbours, np.asarray(state.pieces.sizes), labels, cluster_assignments, seed
    )
    return out


def pooled_features(args, dataset) -> tuple[np.ndarray, np.ndarray]:
    """The backbone's L2-normalised pooled features (1280-d, no head): [N_train, 1280] of
    the training images and [N_test, 1280] of the test images."""
    from magnet_jax import training
    from magnet_jax.backbones import trainer as backbone_trainer

    run = training.prepare(base_config(args, 0), dataset)
    params = training.model_params(run.initial_state.params)
    out = []
    for x in (run.data.x, run.x_test):
        features = backbone_trainer.pooled_features(run.graphdef, params, x, chunk_size=256)
        out.append(features / np.linalg.norm(features, axis=1, keepdims=True))
    return out[0], out[1]


def pretrained_features(test_features: np.ndarray, y_test: np.ndarray) -> dict:
    """Retrieval metrics of the pooled features [M, d] of the test set, labels [M]."""
    import jax.numpy as jnp

    from magnet_jax import evaluation

    metrics = evaluation.retrieval_metrics(
        jnp.asarray(test_features), jnp.asarray(y_test), ks=(1, 2, 4, 8)
    )
    return {name: float(value) for name, value in metrics.items()}


def cluster_once(features: np.ndarray, clustering: str, num_clusters: int, seed: int) -> np.ndarray:
    """[N] int32 cluster ids 0..C-1 (C <= ``num_clusters``, relabelled contiguous) of all
    rows of ``features`` [N, d] as one "class", by the library's clusterer
    (``"kmeans"``: :class:`~magnet_jax.clustering.KMeans`; ``"ward"``:
    :class:`~magnet_jax.clustering.Agglomerative` with Ward linkage, every point)."""
    import jax
    import jax.numpy as jnp

    from magnet_jax.clustering import Agglomerative, KMeans

    clusterer = {
        "kmeans": KMeans(),
        "ward": Agglomerative(linkage="ward", max_points_per_class=len(features)),
    }[clustering]
    result = clusterer(
        jnp.asarray(features),
        jnp.zeros(len(features), jnp.int32),
        clusters_per_class=num_clusters,
        key=jax.random.PRNGKey(seed),
        num_classes=1,
    )
    _, contiguous = np.unique(np.asarray(result.assignments), return_inverse=True)
    return contiguous.astype(np.int32)


def pseudo_label_run(args, dataset, seed: int, baseline: str, train_features: np.ndarray) -> dict:
    """The "cluster, then fine-tune" baseline ``CLUSTERING[@K]+LOSS``: cluster the
    training images' pooled pretrained features [N, 1280] into K clusters (default
    ``args.pseudo_clusters``) and train the supervised ``LOSS`` with those cluster ids as
    the labels (the true training labels are never read; they only score the
    pseudo-labels afterwards). ``labels+LOSS`` is the supervised reference instead: it
    trains on the true labels, so it is no label-free method, only the ceiling of the
    same training."""
    import dataclasses

    from sklearn.metrics import normalized_mutual_info_score

    from magnet_jax import manifolds, training

    clustering, loss = baseline.split("+")
    clustering, _, asked = clustering.partition("@")
    num_clusters = int(asked) if asked else args.pseudo_clusters
    started = time.perf_counter()
    if clustering == "labels":
        pseudo = np.unique(np.asarray(dataset.y_train), return_inverse=True)[1].astype(np.int32)
    else:
        pseudo = cluster_once(train_features, clustering, num_clusters, seed)
    clustered = time.perf_counter()
    true_labels = np.asarray(dataset.y_train)
    pseudo_quality = {
        "clusters_asked": None if clustering == "labels" else num_clusters,
        "clusters": int(pseudo.max()) + 1,
        "largest": int(np.bincount(pseudo).max()),
        "singletons": int((np.bincount(pseudo) == 1).sum()),
        "purity": manifolds.assignment_purity(pseudo, true_labels),
        "nmi": float(normalized_mutual_info_score(true_labels, pseudo)),
    }
    log(f"seed {seed} {baseline}: pseudo-labels {json.dumps(pseudo_quality)}")
    # x_train stays the same array; more clusters than class names need more names.
    names = dataset.class_names
    names += tuple(f"cluster {i}" for i in range(len(names), int(pseudo.max()) + 1))
    relabelled = dataclasses.replace(dataset, y_train=pseudo, class_names=names)
    overrides = dict(loss=loss, clusters_per_class=1)
    if loss == "magnet":
        overrides["embedding_memory"] = args.embedding_memory
    run = training.prepare(base_config(args, seed, **overrides), relabelled)
    curve = training.learning_curve(run, args.eval_steps)
    log(f"seed {seed} {baseline}: metrics {json.dumps(curve['metrics'])}")
    return {
        "seed": seed,
        "clustering": clustering,
        "loss": loss,
        "overrides": overrides,
        "pseudo_labels": pseudo_quality,
        "iterations": curve["iterations"],
        "metrics": curve["metrics"],
        "final_loss": curve["final_loss"],
        "seconds": {
            "clustering": clustered - started,
            "total": time.perf_counter() - started,
        },
    }


def one_run(args, dataset, seed: int, clusterers: bool = True, **overrides) -> dict:
    from magnet_jax import training

    config = base_config(args, seed, **overrides)
    started = time.perf_counter()
    run = training.prepare(config, dataset)
    labels = np.asarray(dataset.y_train)
    num_clusters = int(len(np.unique(labels)))
    prepared = time.perf_counter()
    # The state of the refresh at step 0, as learning_curve computes it (same key).
    initial = training.refresh(run, run.initial_state, None, 0)
    quality_0 = similarity_quality(initial, labels, num_clusters, seed, clusterers)
    del initial
    log(f"seed {seed} {overrides}: iteration-0 quality {json.dumps(quality_0)}")
    trained = time.perf_counter()
    curve = training.learning_curve(run, args.eval_steps)
    train_seconds = time.perf_counter() - trained
    final_step = max(args.eval_steps)
    final = training.refresh(run, curve["state"], curve["method_state"], final_step)
    quality_final = similarity_quality(final, labels, num_clusters, seed, clusterers)
    log(f"seed {seed} {overrides}: final metrics {json.dumps(curve['metrics'])}")
    return {
        "seed": seed,
        "overrides": overrides,
        "iterations": curve["iterations"],
        "metrics": curve["metrics"],
        "final_loss": curve["final_loss"],
        "similarity_quality": {"iteration_0": quality_0, f"iteration_{final_step}": quality_final},
        "seconds": {
            "prepare": prepared - started,
            "train_and_eval": train_seconds,
            "total": time.perf_counter() - started,
        },
    }


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every metric at every iteration."""
    out = {}
    for name in (*RETRIEVAL, MAP_R):
        values = np.array([run["metrics"][name] for run in runs], dtype=float)
        out[name] = {
            "iterations": runs[0]["iterations"],
            "mean": values.mean(axis=0).tolist(),
            "std": values.std(axis=0).tolist(),
        }
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    summary = results["summary"]
    for name in (*RETRIEVAL, MAP_R):
        entry = summary[name]
        mean, std = np.array(entry["mean"]), np.array(entry["std"])
        line = axes[0].plot(entry["iterations"], mean, marker="o", label=name)[0]
        axes[0].fill_between(entry["iterations"], mean - std, mean + std, alpha=0.2)
        base = results["pretrained_features"].get(name)
        if base is not None:
            axes[0].axhline(base, color=line.get_color(), linestyle=":", linewidth=1)
    for name, entry in results.get("baselines", {}).items():
        recall = entry["summary"]["recall_at_1"]
        axes[0].plot(recall["iterations"], recall["mean"], linestyle="--", label=f"{name} R@1")
    axes[0].set_xlabel("iteration")
    axes[0].set_title(
        f"PLM on emoji unseen classes ({len(results['runs'])} seeds; dotted: pooled features)"
    )
    axes[0].legend(fontsize=7)
    groups = ("plm", "knn_table", "kmeans", "kmeans_sklearn", "agglomerative")
    width = 0.2
    bars = [("purity", "iteration_0", ""), ("purity", "final", "//")]
    bars += [("correlation", "iteration_0", ""), ("correlation", "final", "//")]
    for offset, (measure, stage, hatch) in enumerate(bars):
        heights = []
        for group in groups:
            values = []
            for run in results["runs"]:
                quality = run["similarity_quality"]
                entry = quality[stage if stage in quality else list(quality)[-1]]
                if group in entry:  # the clusterers ran on the first seed only
                    values.append(entry[group][measure])
            heights.append(np.mean(values) if values else np.nan)
        x = np.arange(len(groups)) + offset * width
        axes[1].bar(x, heights, width, hatch=hatch, label=f"{measure}, {stage}")
    axes[1].set_xticks(np.arange(len(groups)) + 1.5 * width, groups)
    axes[1].set_title("similarity quality on the training set (labels only to score)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[0, 100, 200])
    parser.add_argument("--freeze-stages", type=int, default=7)
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--anchors", type=int, default=16)
    parser.add_argument("--examples-per-anchor", type=int, default=4)
    parser.add_argument("--neighbours", type=int, default=8)
    parser.add_argument("--max-rank", type=int, default=2)
    parser.add_argument("--error-threshold", type=float, default=0.2)
    parser.add_argument("--proxies", type=int, default=100)
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument("--refresh-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument(
        "--embedding-memory",
        type=int,
        default=0,
        help="the Magnet baselines' --embedding-memory (default 0: the paper's refresh, the "
        "trainer's default; N = --refresh-every reuses the last refresh period's embeddings)",
    )
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="what to run (default: all); the pooled features are always measured",
    )
    parser.add_argument(
        "--plm-seeds", type=int, nargs="+", default=None, help="PLM's seeds (default: --seeds)"
    )
    parser.add_argument(
        "--pseudo-clusters",
        type=int,
        default=PSEUDO_CLUSTERS,
        help="K of the pseudo-label baselines (fixed: a label-free method is not told the "
        "number of classes)",
    )
    parser.add_argument(
        "--baselines",
        nargs="+",
        default=list(BASELINES),
        help="CLUSTERING[@K]+LOSS pseudo-label baselines: CLUSTERING kmeans or ward (or "
        "labels: the supervised reference, reads the true labels), LOSS magnet or triplet",
    )
    parser.add_argument(
        "--ablation-names", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS)
    )
    parser.add_argument(
        "--clusterer-quality",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the clusterers' similarity quality on the first PLM seed (minutes)",
    )
    parser.add_argument("--output", default="plm")
    parser.add_argument("--quick", action="store_true", help="synthetic images, seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.eval_steps, args.ablations = [0], [0, 2], False
        args.anchors, args.examples_per_anchor, args.neighbours = 4, 3, 6
        args.embedding_dim, args.proxies, args.refresh_every = 16, 5, 1
        args.output, args.pseudo_clusters = "plm_quick", 4
        args.baselines = ["kmeans+magnet", "ward@4+triplet"]  # each clustering, loss once
        # One cheap ablation, so that the code path runs.
        args.ablations, args.ablation_names = True, ["one_directional_decay"]

    from magnet_jax.data import load_dataset

    share_prefix_cache()
    load_before = loadavg()
    started = time.perf_counter()
    config = base_config(args, args.seeds[0])  # what prepare would load
    if args.quick:
        dataset = quick_dataset()
        args.image_size = 32
    else:
        dataset = load_dataset(config.dataset, config.data_dir, **config.load_options())
    log(f"emoji: {dataset.num_train} train / {len(dataset.y_test)} test images")
    results = {
        "command": " ".join([sys.executable, *sys.argv]),
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "load_before": load_before,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {
            "train_images": int(dataset.num_train),
            "test_images": int(len(dataset.y_test)),
            "train_classes": int(len(np.unique(np.asarray(dataset.y_train)))),
            "test_classes": int(len(np.unique(np.asarray(dataset.y_test)))),
        },
    }
    path = RESULTS / f"{args.output}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)

    def save(complete: bool) -> None:
        # Written after every run: a cut-short benchmark keeps what it measured.
        results["complete"] = complete
        results["load_after"] = loadavg()
        results["seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(results, indent=1))
        if results["runs"]:
            plot(results, RESULTS / f"{args.output}.png")

    train_features, test_features = pooled_features(args, dataset)
    results["pretrained_features"] = pretrained_features(test_features, np.asarray(dataset.y_test))
    log(f"pooled pretrained features: {json.dumps(results['pretrained_features'])}")
    results["runs"], results["ablations"], results["baselines"] = [], {}, {}
    plm_seeds = args.seeds if args.plm_seeds is None else args.plm_seeds
    # The clusterers' quality (minutes per call here) is measured on the first seed.
    for seed in plm_seeds if "plm" in args.parts else ():
        clusterers = args.clusterer_quality and seed == plm_seeds[0]
        results["runs"].append(one_run(args, dataset, seed, clusterers=clusterers))
        results["summary"] = summarise(results["runs"])
        save(complete=False)
    for baseline in args.baselines if "baselines" in args.parts else ():
        runs = results["baselines"].setdefault(baseline, {"runs": []})["runs"]
        for seed in args.seeds:
            runs.append(pseudo_label_run(args, dataset, seed, baseline, train_features))
            results["baselines"][baseline]["summary"] = summarise(runs)
            save(complete=False)
    for name in args.ablation_names if args.ablations and "ablations" in args.parts else ():
        results["ablations"][name] = one_run(
            args, dataset, plm_seeds[0], clusterers=False, **ABLATIONS[name]
        )
        save(complete=False)
    save(complete=True)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
