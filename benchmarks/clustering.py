"""Clustering for the Magnet index: k-means vs k-means with restarts vs agglomerative.

Observed in early prototypes: trained from scratch, k-means clusters of the embedding match the true
modes of a class poorly and the Magnet Loss then pulls examples onto those mixed
clusters. This script measures whether a better clustering helps, every method trained
with the same network, steps, batches (M·D) and seed; only ``--clustering`` and its
options differ:

  kmeans            k-means++ then Lloyd, one initialisation (the default)
  kmeans_restarts   best of 5 k-means++ initialisations by inertia, per class
  agglomerative     Ward, relative threshold τ (a split must explain ≥ τ of a class's
                    sum of squares), at most K clusters per class
  agglomerative_single   (toy only) single linkage, cut at τ' × the median merge height

Parts:
  (a) a 2-D toy: 3 classes whose modes are interleaved spiral arms, elongated ellipses and
      round blobs (fine label = mode); kNC error of the trained Magnet embedding, cluster
      purity, and a picture of the clusters each method finds in the input plane.
  (b) coarse classes with several modes: MNIST even/odd, Fashion-MNIST tops/footwear/
      trouser/bag: coarse kNC error, fine-label Error@1/@5 (hierarchy recovery), cluster
      purity against the fine labels over training, refresh time.
  (c) the 10-class MNIST and Fashion-MNIST: kNC error at equal steps.

Run:
  python benchmarks/clustering.py --quick     # smoke test: (a) and (b) on digits even/odd, 150 steps,
                                              # k-means vs agglomerative only (about a minute, mostly compilation)
  python benchmarks/clustering.py --parts a,b,c --steps 1500 --train-size 10000
What fitted this session's CPU budget (2 shared cores; recorded in clustering.json):
  python benchmarks/clustering.py --steps 1500 --toy-steps 1500 --train-size 10000 \
      --test-size 2000 --architecture mlp --data-dir ../shared/datasets          # seed 0
  python benchmarks/clustering.py --parts b,c --seeds 1 ... --output seed1.json  # seed 1
  python benchmarks/clustering.py --parts b --seeds 0,1 \
      --methods agglomerative_tau0.02,agglomerative_count ... --output variants.json
  python benchmarks/clustering.py --merge clustering.json seed1.json variants.json
Writes benchmarks/results/clustering.json (clustering_quick.json with --quick) and PNGs
clustering*_*.png next to it, and prints markdown tables. The settings actually used
(steps, subsample sizes, seeds) are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

from magnet_jax import plotting, training
from magnet_jax.clustering import cluster_per_class, clustering_diagnostics
from magnet_jax.config import TrainConfig
from magnet_jax.data import Dataset, coarsen, load_dataset

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

# MAGNET_JAX_RESULTS redirects the output (the tests use it so CI leaves the repo clean).
RESULTS = pathlib.Path(
    os.environ.get("MAGNET_JAX_RESULTS", pathlib.Path(__file__).resolve().parent / "results")
)
WARD_THRESHOLD = 0.05

METHODS = {
    "kmeans": {},
    "kmeans_restarts": {"kmeans_restarts": 5},
    "agglomerative": {
        "clustering": "agglomerative",
        "linkage": "ward",
        "distance_threshold": WARD_THRESHOLD,
    },
}
TOY_METHODS = {
    **METHODS,
    "agglomerative_single": {
        "clustering": "agglomerative",
        "linkage": "single",
        "distance_threshold": 8.0,
    },
}
# Variants, chosen with --methods (e.g. --methods kmeans,agglomerative_tau0.02).
VARIANTS = {
    "agglomerative_tau0.02": {
        "clustering": "agglomerative",
        "linkage": "ward",
        "distance_threshold": 0.02,
    },
    "agglomerative_count": {
        "clustering": "agglomerative",
        "linkage": "ward",
        "distance_threshold": None,
    },
}
ALL_METHODS = {**TOY_METHODS, **VARIANTS}


# --------------------------------------------------------------------------------------
# Data.


def toy_dataset(num_train: int = 3000, num_test: int = 1500, seed: int = 0) -> Dataset:
    """3 classes, 2 modes each (6 fine labels): two interleaved spiral arms (classes 0, 1),
    two elongated ellipses (classes 0, 1), two round blobs (class 2)."""
    rng = np.random.default_rng(seed)

    def sample(mode: int, n: int) -> np.ndarray:
        if mode in (0, 1):  # spiral arms, offset by π
            t = np.sqrt(rng.uniform(0.05, 1.0, n)) * 3.0 * np.pi
            angle = t + mode * np.pi
            radius = t / (3.0 * np.pi) * 4.0
            points = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
            return points + rng.normal(scale=0.12, size=(n, 2))
        if mode in (2, 3):  # long thin ellipses, one above, one below
            along = rng.normal(scale=2.0, size=n)
            across = rng.normal(scale=0.15, size=n)
            centre = np.array([0.0, 6.0 if mode == 2 else -6.0])
            direction = np.array([1.0, 0.35 if mode == 2 else -0.35])
            direction /= np.linalg.norm(direction)
            normal = np.array([-direction[1], direction[0]])
            return centre + along[:, None] * direction + across[:, None] * normal
        centre = np.array([6.5, 0.0]) if mode == 4 else np.array([-6.5, 0.0])
        return centre + rng.normal(scale=0.6, size=(n, 2))

    class_of_mode = np.array([0, 1, 0, 1, 2, 2])

    def split(n: int):
        modes = rng.integers(0, 6, size=n)
        x = np.zeros((n, 2))
        for mode in range(6):
            x[modes == mode] = sample(mode, int(np.sum(modes == mode)))
        x = (x / 4.0).astype(np.float32)
        return x, class_of_mode[modes].astype(np.int32), modes.astype(np.int32)

    x_train, y_train, fine_train = split(num_train)
    x_test, y_test, fine_test = split(num_test)
    return Dataset(
        "toy_spirals",
        x_train,
        y_train,
        x_test,
        y_test,
        ("spiral+ellipse A", "spiral+ellipse B", "two blobs"),
        fine_train,
        fine_test,
        ("arm A", "arm B", "ellipse A", "ellipse B", "blob right", "blob left"),
    )


def subsample(
    dataset: Dataset, train_size: int | None, test_size: int | None, seed: int = 0
) -> Dataset:
    """A stratified-by-fine-label random subset (fixed seed) of the train and test sets."""
    rng = np.random.default_rng(seed)

    def pick(y, size):
        if size is None or size >= len(y):
            return np.arange(len(y))
        return np.sort(rng.permutation(len(y))[:size])

    train = pick(dataset.y_train, train_size)
    test = pick(dataset.y_test, test_size)
    fine = dataset.fine_train is not None
    return Dataset(
        f"{dataset.name}[{len(train)}/{len(test)}]",
        dataset.x_train[train],
        dataset.y_train[train],
        dataset.x_test[test],
        dataset.y_test[test],
        dataset.class_names,
        dataset.fine_train[train] if fine else None,
        dataset.fine_test[test] if fine else None,
        dataset.fine_class_names if fine else None,
    )


def named_dataset(name: str, data_dir: str | None) -> Dataset:
    if name == "digits_parity":
        return coarsen(
            load_dataset("digits"),
            [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]],
            ["even", "odd"],
            name="digits_parity",
        )
    return load_dataset(name, data_dir)


# --------------------------------------------------------------------------------------
# Runs.


def train_one(dataset: Dataset, base: dict, method: str, overrides: dict, workdir: str) -> dict:
    config = TrainConfig(**{**base, **overrides, "workdir": workdir})
    started = time.perf_counter()
    final = training.train(config, progress=False, dataset=dataset)
    seconds = time.perf_counter() - started
    history = plotting.read_history(workdir)
    evals = [h for h in history if h["kind"] == "eval"]
    refreshes = [h for h in history if h["kind"] == "refresh"]
    keep = ("knc_error", "knn_error", "fine_error_at_1", "fine_error_at_5", "precision_at_1")
    return {
        "method": method,
        "config": {k: v for k, v in config.to_dict().items() if k != "workdir"},
        "final": {k: final[k] for k in keep if k in final},
        "evals": [{k: h[k] for k in ("step", *keep) if k in h} for h in evals],
        "refreshes": refreshes,
        "refresh_seconds_mean": float(
            np.mean([h["refresh_seconds"] for h in refreshes[1:] or refreshes])
        ),
        "wall_seconds": seconds,
        "history": history,
    }


def run_dataset(dataset: Dataset, base: dict, methods: dict, seeds, tag: str, root: str) -> dict:
    results = {}
    for method, overrides in methods.items():
        runs = []
        for seed in seeds:
            workdir = os.path.join(root, f"{tag}-{method}-{seed}")
            print(
                f"  {time.strftime('%H:%M:%S')} {tag} {method} seed {seed} ...",
                flush=True,
                file=sys.stderr,
            )
            runs.append(train_one(dataset, {**base, "seed": seed}, method, overrides, workdir))
        results[method] = runs
    return results


def summarise(runs: list[dict]) -> dict:
    """Mean (and values) over seeds of the final metrics and the clustering diagnostics."""
    summary = {}
    for key in runs[0]["final"]:
        values = [r["final"][key] for r in runs]
        summary[key] = {"mean": float(np.mean(values)), "values": values}
    first = [r["refreshes"][0] for r in runs]
    last = [r["refreshes"][-1] for r in runs]
    for name in ("purity", "clusters_per_class_mean", "inertia"):
        if name in first[0]:
            summary[f"{name}_first"] = float(np.mean([h[name] for h in first]))
            summary[f"{name}_last"] = float(np.mean([h[name] for h in last]))
    summary["refresh_seconds"] = float(np.mean([r["refresh_seconds_mean"] for r in runs]))
    summary["wall_seconds"] = float(np.mean([r["wall_seconds"] for r in runs]))
    return summary


def plot_dataset(tag: str, results: dict, suffix: str) -> list[str]:
    written = []
    histories = {method: runs[0]["history"] for method, runs in results.items()}
    written.append(
        plotting.plot_clustering_diagnostics(
            histories, RESULTS / f"clustering{suffix}_{tag}_diagnostics.png", title=tag
        )
    )
    for metric in ("knc_error", "fine_error_at_1"):
        curves = {
            method: [
                ([h["step"] for h in r["evals"]], [h[metric] for h in r["evals"]]) for r in runs
            ]
            for method, runs in results.items()
            if metric in runs[0]["final"]
        }
        if curves:
            written.append(
                plotting.plot_learning_curves(
                    curves,
                    RESULTS / f"clustering{suffix}_{tag}_{metric}.png",
                    ylabel=metric.replace("_", " "),
                    title=tag,
                )
            )
    return written


def plot_toy_clusters(
    dataset: Dataset, methods: dict, path: pathlib.Path, clusters_per_class: int
) -> dict:
    """The clusters every method finds in the toy's input plane (what the index would get
    from an embedding that is the identity), and their purity against the modes."""
    import matplotlib.pyplot as plt

    purities = {}
    figure, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4.2), squeeze=False)
    markers = ("o", "^", "s")
    for axis, (method, overrides) in zip(axes[0], methods.items()):
        result = cluster_per_class(
            dataset.x_train,
            dataset.y_train,
            clusters_per_class=clusters_per_class,
            key=jax.random.key(0),
            method=overrides.get("clustering", "kmeans"),
            num_restarts=overrides.get("kmeans_restarts", 1),
            linkage=overrides.get("linkage", "ward"),
            distance_threshold=overrides.get("distance_threshold"),
            min_clusters=2 if overrides.get("clustering") == "agglomerative" else 1,
        )
        flat = dataset.y_train * clusters_per_class + np.asarray(result.assignments)
        diagnostics = clustering_diagnostics(
            dataset.x_train,
            dataset.y_train,
            result.assignments,
            num_classes=3,
            clusters_per_class=clusters_per_class,
            fine_labels=dataset.fine_train,
        )
        purities[method] = diagnostics
        colours = plt.get_cmap("tab20")
        for c in range(3):
            mask = dataset.y_train == c
            axis.scatter(
                dataset.x_train[mask, 0],
                dataset.x_train[mask, 1],
                s=3,
                marker=markers[c],
                color=colours(flat[mask] % 20),
            )
        axis.set_title(
            f"{method}\nclusters/class {diagnostics['clusters_per_class_mean']:.1f}, purity {diagnostics['purity']:.2f}",
            fontsize=9,
        )
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_aspect("equal")
    figure.suptitle(
        f"clusters found in the input plane (K={clusters_per_class}; marker = class, colour = cluster)",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return purities


# --------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = [
        "| dataset | method | kNC error (per seed) | fine Error@1 | fine Error@5 | purity first → last | clusters/class first → last | refresh s | run s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(summary, key):
        if key not in summary:
            return "–"
        values = summary[key]["values"]
        text = f"{100 * summary[key]['mean']:.2f}%"
        return (
            text
            if len(values) == 1
            else text + " (" + ", ".join(f"{100 * v:.2f}" for v in values) + ")"
        )

    for tag, methods in results.items():
        for method, summary in methods.items():
            purity = (
                f"{summary['purity_first']:.3f} → {summary['purity_last']:.3f}"
                if "purity_first" in summary
                else "–"
            )
            count = f"{summary['clusters_per_class_mean_first']:.1f} → {summary['clusters_per_class_mean_last']:.1f}"
            lines.append(
                f"| {tag} | {method} | {pct(summary, 'knc_error')} | {pct(summary, 'fine_error_at_1')} | "
                f"{pct(summary, 'fine_error_at_5')} | {purity} | {count} | {summary['refresh_seconds']:.2f} | "
                f"{summary['wall_seconds']:.0f} |"
            )
    return "\n".join(lines)


def merge(paths: list[str], output: pathlib.Path) -> int:
    """Concatenates the runs (seeds, methods) of several result files part by part, dataset
    by dataset, method by method; recomputes the summaries; redraws the curves."""
    records = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    merged = {**records[0], "merged_from": [str(p) for p in paths], "parts": {}}
    merged["seeds"] = sorted({s for r in records for s in r["seeds"]})
    for record in records:
        for part, content in record["parts"].items():
            target = merged["parts"].setdefault(part, {"runs": {}, "setup": {}, "summary": {}})
            for key in content:
                if key not in ("runs", "summary", "setup"):
                    target.setdefault(key, content[key])
            for name, setup in content.get("setup", {}).items():
                target["setup"].setdefault(name, setup)
            for name, methods in content["runs"].items():
                for method, runs in methods.items():
                    target["runs"].setdefault(name, {}).setdefault(method, []).extend(runs)
    for content in merged["parts"].values():
        for name, methods in content["runs"].items():
            content["summary"][name] = {m: summarise(r) for m, r in methods.items()}
            results = {
                m: [{**run, "history": run["refreshes"]} for run in r] for m, r in methods.items()
            }
            plot_dataset(name, results, "")
    output.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    for part in sorted(merged["parts"]):
        print(f"\n### ({part})\n")
        print(table(merged["parts"][part]["summary"]))
    print(f"\nwritten to {output}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="digits for (b) and (c), few steps (CI)"
    )
    parser.add_argument("--parts", default=None, help="default: a,b with --quick, else a,b,c")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per run (default: 300 quick, 1500 full)"
    )
    parser.add_argument("--toy-steps", type=int, default=None)
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="random training subset of (b), (c) (default: all)",
    )
    parser.add_argument(
        "--test-size", type=int, default=None, help="random test subset of (b), (c) (default: all)"
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--datasets-b", default=None)
    parser.add_argument("--datasets-c", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--architecture",
        default=None,
        help="(b), (c): mlp, convnet (default: the dataset's default)",
    )
    parser.add_argument(
        "--output", default=None, help="JSON path (default: results/clustering[_quick].json)"
    )
    parser.add_argument(
        "--methods", default=None, help=f"comma list for (b), (c) from {', '.join(ALL_METHODS)}"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="no training: merge the runs of these result JSONs (e.g. other seeds or methods) into --output",
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, pathlib.Path(args.output or RESULTS / "clustering.json"))
    methods = {m: ALL_METHODS[m] for m in args.methods.split(",")} if args.methods else METHODS
    # The smoke test trains only the default and the new clustering (the picture shows all).
    trained_toy_methods = TOY_METHODS
    if args.quick and not args.methods:
        methods = trained_toy_methods = {m: METHODS[m] for m in ("kmeans", "agglomerative")}

    quick = args.quick
    suffix = "_quick" if quick else ""
    parts = (args.parts or ("a,b" if quick else "a,b,c")).split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = args.steps or (150 if quick else 1500)
    toy_steps = args.toy_steps or (150 if quick else 1500)
    datasets_b = (
        args.datasets_b or ("digits_parity" if quick else "mnist_parity,fashion_mnist_coarse")
    ).split(",")
    datasets_c = (args.datasets_c or ("digits" if quick else "fashion_mnist,mnist")).split(",")
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = pathlib.Path(args.output) if args.output else RESULTS / f"clustering{suffix}.json"

    common = dict(
        loss="magnet",
        lr=1e-3,
        embedding_dim=32,
        clusters_per_class=8,
        kmeans_iterations=50,
        num_devices=1,
        log_every=50,
        max_checkpoints=1,
    )
    if "lr_schedule" in TrainConfig.__dataclass_fields__:
        # The runs recorded in results/clustering.json predate the cosine schedule.
        common["lr_schedule"] = "constant"
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": _common.environment(),
        "quick": quick,
        "methods": {k: v for k, v in TOY_METHODS.items()},
        "seeds": seeds,
        "parts": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="magnet-clustering-") as root:
        if "a" in parts:
            print("(a) toy", file=sys.stderr, flush=True)
            toy = toy_dataset()
            toy_base = dict(
                common,
                dataset="toy",
                steps=toy_steps,
                clusters_per_class=4,
                clusters_per_batch=4,
                examples_per_cluster=16,
                refresh_every=max(1, toy_steps // 6),
                eval_every=max(1, toy_steps // 6),
                checkpoint_every=toy_steps,
                num_nearest_clusters=12,
            )
            input_clusters = plot_toy_clusters(
                toy, TOY_METHODS, RESULTS / f"clustering{suffix}_toy_clusters.png", 4
            )
            results = run_dataset(toy, toy_base, trained_toy_methods, seeds, "toy", root)
            plot_dataset("toy", results, suffix)
            record["parts"]["a"] = {
                "setup": {**toy_base, "train": len(toy.y_train), "test": len(toy.y_test)},
                "input_plane_clusters": input_clusters,
                "summary": {"toy": {m: summarise(r) for m, r in results.items()}},
                "runs": {
                    "toy": {
                        m: [{k: v for k, v in run.items() if k != "history"} for run in r]
                        for m, r in results.items()
                    }
                },
            }
        for part, names, per_batch in (("b", datasets_b, (4, 16)), ("c", datasets_c, (8, 8))):
            if part not in parts:
                continue
            record["parts"][part] = {"summary": {}, "runs": {}, "setup": {}}
            for name in names:
                print(f"({part}) {name}", file=sys.stderr, flush=True)
                dataset = subsample(
                    named_dataset(name, args.data_dir), args.train_size, args.test_size
                )
                epoch = math.ceil(len(dataset.y_train) / (per_batch[0] * per_batch[1]))
                base = dict(
                    common,
                    dataset=name,
                    steps=steps,
                    architecture=args.architecture,
                    clusters_per_batch=per_batch[0],
                    examples_per_cluster=per_batch[1],
                    refresh_every=min(epoch, max(1, steps // 6)),
                    eval_every=max(1, steps // 6),
                    checkpoint_every=steps,
                )
                results = run_dataset(dataset, base, methods, seeds, name, root)
                plot_dataset(name, results, suffix)
                record["parts"][part]["setup"][name] = {
                    **base,
                    "train": len(dataset.y_train),
                    "test": len(dataset.y_test),
                }
                record["parts"][part]["summary"][name] = {
                    m: summarise(r) for m, r in results.items()
                }
                record["parts"][part]["runs"][name] = {
                    m: [{k: v for k, v in run.items() if k != "history"} for run in r]
                    for m, r in results.items()
                }
                # Write after every dataset, so a run cut short keeps what it measured.
                record["seconds"] = time.perf_counter() - started
                output.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    record["seconds"] = time.perf_counter() - started
    output.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    for part in ("a", "b", "c"):
        if part in record["parts"]:
            print(f"\n### ({part})\n")
            print(table(record["parts"][part]["summary"]))
    if "a" in record["parts"]:
        print("\nclusters of the toy's input plane:")
        for method, d in record["parts"]["a"]["input_plane_clusters"].items():
            print(
                f"  {method}: clusters/class {d['clusters_per_class_mean']:.2f}, purity {d['purity']:.3f}"
            )
    print(f"\nwritten to {output} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
