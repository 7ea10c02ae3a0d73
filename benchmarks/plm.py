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

Ablations (one seed, ``--ablations``): no subset selection, binary similarity.

    python benchmarks/plm.py                                  # the full benchmark
    python benchmarks/plm.py --seeds 0 --steps 20 --eval-steps 0 20 --no-ablations  # smoke

Writes ``results/plm.json`` (command, commit, load, seeds, settings, every number) and
``results/plm.png``.
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
    return out


def pretrained_features(args, dataset) -> dict:
    """Retrieval metrics of the backbone's pooled features on the test set (no head)."""
    import jax.numpy as jnp

    from magnet_jax import evaluation, training
    from magnet_jax.backbones import trainer as backbone_trainer

    run = training.prepare(base_config(args, 0), dataset)
    params = training.model_params(run.initial_state.params)
    features = backbone_trainer.pooled_features(run.graphdef, params, run.x_test, chunk_size=256)
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    metrics = evaluation.retrieval_metrics(
        jnp.asarray(features), jnp.asarray(np.asarray(dataset.y_test)), ks=(1, 2, 4, 8)
    )
    return {name: float(value) for name, value in metrics.items()}


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
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--output", default="plm")
    parser.add_argument("--quick", action="store_true", help="synthetic images, seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.eval_steps, args.ablations = [0], [0, 2], False
        args.anchors, args.examples_per_anchor, args.neighbours = 4, 3, 6
        args.embedding_dim, args.proxies, args.refresh_every = 16, 5, 1
        args.output = "plm_quick"

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

    results["pretrained_features"] = pretrained_features(args, dataset)
    log(f"pooled pretrained features: {json.dumps(results['pretrained_features'])}")
    results["runs"], results["ablations"] = [], {}
    # The clusterers' quality (minutes per call here) is measured on the first seed.
    for seed in args.seeds:
        results["runs"].append(one_run(args, dataset, seed, clusterers=seed == args.seeds[0]))
        results["summary"] = summarise(results["runs"])
        save(complete=False)
    ablations = {
        "no_subset_selection": {"plm_subset_selection": False},
        "binary_similarity": {"plm_similarity": "binary"},
    }
    for name, overrides in ablations.items() if args.ablations else ():
        results["ablations"][name] = one_run(
            args, dataset, args.seeds[0], clusterers=False, **overrides
        )
        save(complete=False)
    save(complete=True)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
