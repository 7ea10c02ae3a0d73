"""Hierarchy recovery: train on coarse classes, classify the fine ones from the embedding.

The paper (Rippel et al. 2016, §4.3) trains on coarse labels and reports the fine-label
Error@1 / Error@5 of the embedding (softmax 30.9 / 15.0, triplet 44.6 / 23.4, magnet
28.6 / 7.8 %): Magnet's K clusters per class should keep the sub-modes that the other
losses collapse. Error@k = share of test queries none of whose k nearest training
examples (squared Euclidean) has the query's fine label.

Datasets (``--dataset``):
- ``fashion_mnist_coarse``: tops {T-shirt, Pullover, Dress, Coat, Shirt}, footwear
  {Sandal, Sneaker, Ankle boot}, trouser, bag (4 coarse, 10 fine classes).
- ``mnist_parity``: MNIST even {0,2,4,6,8} / odd {1,3,5,7,9} (2 coarse, 10 fine).
- ``quick``: scikit-learn digits by parity, the same grouping (seconds; CI).

Every method: same network, Adam, batch 48 and iterations; magnet K = 8 clusters per class,
M = 8 clusters of D = 6; triplet batch-all on L2-normalised embeddings, margin 0.2, M = #coarse
classes (all of them) of 48/M; softmax 48 uniform examples. With several ``--lrs`` each
method's learning rate is chosen on a stratified 10% validation split of the training set
by its coarse-label error (kNC for magnet, best kNN for the others) — never on fine labels
and never on the test set; with one value there is no sweep. Also recorded over training:
the coarse test errors and, for magnet, the fine-label purity of its k-means clusters
(share of training examples whose cluster's majority fine label is their own).

Commands (results/hierarchy_<dataset>.json, .png):
  python benchmarks/hierarchy.py --dataset quick
  python benchmarks/hierarchy.py --dataset fashion_mnist_coarse --steps 1500 --seeds 2 --lrs 1e-3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import Method, log  # noqa: E402

DATASETS = {
    "quick": dict(
        source="digits", grouping="MNIST_PARITY", steps=200, eval_every=50, seeds=2, lrs=(3e-3,)
    ),
    "mnist_parity": dict(
        source="mnist",
        grouping="MNIST_PARITY",
        steps=3000,
        eval_every=250,
        seeds=3,
        lrs=(1e-3, 3e-3),
    ),
    "fashion_mnist_coarse": dict(
        source="fashion_mnist",
        grouping="FASHION_MNIST_COARSE",
        steps=3000,
        eval_every=250,
        seeds=3,
        lrs=(1e-3, 3e-3),
    ),
}
# The paper's regime: the pretrained EfficientNet-Lite0 (_common.CPU_BACKBONE) on the
# emoji set's 8 categories, 20% of every category's images to test (seed 0); the fine
# labels are the emoji. Training on the subcategories is convergence.py's emoji_subcategory
# regime: --from-convergence turns its runs into this script's view (no new training).
DATASETS["emoji_category"] = dict(
    emoji=("category", "default"),
    steps=600,
    eval_every=50,
    seeds=3,
    lrs=(1e-3, 3e-3),
    mining="semi_hard",
    embedding_dim=64,
)
BATCH = 48
FINE = ("fine_error_at_1", "fine_error_at_5")


def load(name: str, data_dir: str, min_images: int = _common.EMOJI_MIN_IMAGES):
    from magnet_jax import data

    spec = DATASETS[name]
    if spec.get("emoji"):
        level, split = spec["emoji"]
        return _common.load_emoji(level, split, data_dir, min_images=min_images)
    grouping = getattr(data, spec["grouping"])
    dataset = data.load_dataset(spec["source"], data_dir)
    return data.coarsen(
        dataset,
        grouping.groups,
        grouping.names,
        name=f"{spec['source']}/{spec['grouping'].lower()}",
    )


def methods_for(
    num_coarse: int, lrs, clusters_per_class: int, mining: str = "batch_all"
) -> list[Method]:
    grid = [{"lr": lr} for lr in lrs]
    return [
        Method(
            "magnet",
            dict(
                loss="magnet",
                clusters_per_class=clusters_per_class,
                clusters_per_batch=8,
                examples_per_cluster=6,
            ),
            grid,
        ),
        Method(
            "triplet",
            dict(
                loss="triplet",
                normalize=True,
                margin=0.2,
                mining=mining,
                clusters_per_batch=num_coarse,
                examples_per_cluster=BATCH // num_coarse,
            ),
            grid,
        ),
        Method(
            "softmax",
            dict(
                loss="softmax",
                clusters_per_batch=num_coarse,
                examples_per_cluster=BATCH // num_coarse,
            ),
            grid,
        ),
    ]


def summary_of(results: dict) -> dict:
    """Final fine Error@1/@5 (mean, std, per seed), recomputed from the stored curves."""
    out = {}
    for name, method in results["methods"].items():
        row = {}
        for metric in FINE + ("coarse_error",):
            finals = [s[metric][-1] for s in method["seeds"]]
            row[metric] = {
                "mean": float(np.mean(finals)),
                "std": float(np.std(finals)),
                "per_seed": finals,
            }
        out[name] = row
    return {"final": out}


def print_summary(results: dict, summary: dict) -> None:
    print(
        f"\n{results['dataset']}: trained on {results['num_coarse']} coarse classes, {results['steps']} iterations, "
        f"{len(results['seeds'])} seeds; fine-label kNN errors on the test set at the final iteration:"
    )
    print("| method | lr | fine Error@1 | fine Error@5 | coarse error (evaluator) |")
    print("|---|---|---|---|---|")
    for name, row in summary["final"].items():
        m = results["methods"][name]
        cells = [
            f"{100 * row[k]['mean']:.2f} ± {100 * row[k]['std']:.2f}%"
            for k in FINE + ("coarse_error",)
        ]
        print(
            f"| {name} | {m['chosen']['lr']} | {cells[0]} | {cells[1]} | {cells[2]} ({m['evaluator']}) |"
        )


def check(path: Path) -> int:
    results = json.loads(path.read_text())
    recomputed = summary_of(results)
    return _common.check_summary(results, recomputed, {"final": results["final"]}, print_summary)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, metric, label in zip(
        axes, FINE + ("coarse_error",), ("fine Error@1", "fine Error@5", "coarse test error")
    ):
        for name, method in results["methods"].items():
            its = np.asarray(method["seeds"][0]["iterations"], float)[1:]  # iteration 0 left out
            errs = np.asarray([s[metric][1:] for s in method["seeds"]], float)
            mean, std = errs.mean(0), errs.std(0)
            axis.plot(its, mean, label=f"{name} (n={len(errs)})")
            axis.fill_between(its, mean - std, mean + std, alpha=0.2)
        axis.set_xlabel("iterations")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{results['dataset']}: trained on coarse labels")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def from_convergence(path: Path, output: str | None) -> int:
    """The hierarchy view of a convergence.py emoji result whose runs trained on coarse
    labels: the same runs' fine Error@1/@5 and coarse error, re-read from its curves."""
    source = json.loads(path.read_text())
    if not source.get("emoji") or source["emoji"]["label_level"] == "emoji":
        print(
            f"hierarchy.py: error: --from-convergence {path}: not an emoji result trained on "
            "coarse labels (subcategory or category)",
            file=sys.stderr,
        )
        return 2
    level = source["emoji"]["label_level"]
    results = {
        "dataset": source["dataset"],
        "regime": f"emoji_{level}",
        "from_convergence": str(path),
        "note": f"the runs of {path.name} (trained on the {level} labels), re-read: each "
        "method's settings were chosen there on validation by the coarse-label error",
        "num_train": source["num_train"],
        "num_test": source["num_test"],
        "num_coarse": source["emoji"]["num_classes"],
        "steps": source["steps"],
        "eval_every": source["eval_every"],
        "seeds": source["seeds"],
        "batch_size": source["batch_size"],
        "backbone": source.get("backbone"),
        "emoji": source["emoji"],
        "methods": {},
        "environment": source["environment"],
        "command": "python benchmarks/hierarchy.py --from-convergence " + str(path),
    }
    for name, method in source["methods"].items():
        if "note" in method:  # a pseudo-method: the same runs under another evaluator
            continue
        seeds = []
        for s in method["seeds"]:
            metrics = s["all_metrics"]
            seeds.append(
                {
                    "seed": s["seed"],
                    "iterations": s["iterations"],
                    **{m: metrics[m] for m in FINE},
                    "coarse_error": s["test_error"],
                    "all_metrics": metrics,
                }
            )
        results["methods"][name] = {
            "fixed": method["fixed"],
            "chosen": method["chosen"],
            "evaluator": method["evaluator"],
            "seeds": seeds,
        }
    results = json.loads(json.dumps(results))
    results.update(summary_of(results))
    out = Path(output) if output else _common.RESULTS / f"hierarchy_emoji_{level}.json"
    _common.write_json(out, results)
    plot(results, out.with_suffix(".png"))
    print_summary(results, summary_of(json.loads(out.read_text())))
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def main(argv=None) -> int:
    return _common.run_with_memo(_main, argv)


def _main(argv, memo) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="quick")
    parser.add_argument("--quick", action="store_true", help="same as --dataset quick")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=None,
        help="learning rates; several: chosen on validation by coarse error",
    )
    parser.add_argument("--clusters-per-class", type=int, default=8, help="magnet's K")
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="train on a stratified subset of this many training examples (seed 1; the full "
        "test set is kept): a reduced-scale run",
    )
    parser.add_argument("--data-dir", default=str(_common.DEFAULT_DATA_DIR))
    parser.add_argument(
        "--full-resolution",
        action="store_true",
        help="emoji_category: 224 px, every backbone stage trains, no cached prefix (a GPU)",
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="emoji_category: the backbone without its ImageNet weights (a control; the tests)",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="emoji_category: backbone resolution"
    )
    parser.add_argument(
        "--min-images",
        type=int,
        default=_common.EMOJI_MIN_IMAGES,
        help="emoji_category: leave out the classes of fewer images",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="NAME",
        help="run only these methods (magnet, triplet, softmax); default all",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="FILE",
        help="merge the results files of one dataset run method by method into --output",
    )
    parser.add_argument(
        "--from-convergence",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the hierarchy view (fine Error@k of the emoji) of a convergence.py emoji "
        "results file whose runs trained on coarse labels (emoji_subcategory), no training",
    )
    parser.add_argument("--output", default=None, help="default results/hierarchy_<dataset>.json")
    parser.add_argument(
        "--check", type=Path, default=None, help="recompute the summary of a results JSON"
    )
    args = parser.parse_args(argv)
    if args.check:
        return check(args.check)
    if args.from_convergence:
        return from_convergence(args.from_convergence, args.output)
    if args.merge:
        return _common.merge_command(
            "hierarchy.py",
            args.merge,
            args.output,
            summary_of=summary_of,
            plot=plot,
            print_summary=print_summary,
        )
    name = "quick" if args.quick else args.dataset
    spec = copy.deepcopy(DATASETS[name])
    emoji = bool(spec.get("emoji"))
    if (args.full_resolution or args.random_init or args.image_size) and not emoji:
        parser.error("--full-resolution, --random-init and --image-size apply to emoji_category")
    steps = args.steps or spec["steps"]
    eval_every = args.eval_every or spec["eval_every"]
    seeds = list(range(args.seeds or spec["seeds"]))
    lrs = tuple(args.lrs or spec["lrs"])
    output = Path(args.output) if args.output else _common.RESULTS / f"hierarchy_{name}.json"
    started = time.perf_counter()
    environment = _common.environment()  # at the start: the library version this run used
    _common.enable_compilation_cache()

    from magnet_jax.data import split_validation

    dataset = _common.subsample_train(load(name, args.data_dir, args.min_images), args.train_size)
    # A constant learning rate: a schedule tied to the total would distort the curves' middle.
    base = dict(
        dataset=dataset.name,
        embedding_dim=32,
        optimizer="adam",
        lr_schedule="constant",
        eval_every=10**9,
        checkpoint_every=10**9,
        log_every=10**9,
        num_nearest_clusters=128,
    )
    backbone = None
    if emoji:
        backbone = _common.emoji_backbone(args.full_resolution, args.random_init, memo)
        if args.image_size:
            backbone["image_size"] = args.image_size
        # The index is refreshed at every evaluation (its purity is recorded there).
        base.update(embedding_dim=spec["embedding_dim"], refresh_every=eval_every, **backbone)
    eval_steps = _common.evaluation_steps(steps, eval_every)
    results = {
        "dataset": dataset.name,
        "regime": name,
        "num_train": dataset.num_train,
        "num_test": dataset.num_test,
        "num_coarse": dataset.num_classes,
        "coarse_classes": list(dataset.class_names),
        "fine_classes": list(dataset.fine_class_names),
        "steps": steps,
        "eval_every": eval_every,
        "seeds": seeds,
        "batch_size": BATCH,
        "lrs": list(lrs),
        "methods": {},
    }
    if emoji:
        results.update(
            emoji={
                "label_level": spec["emoji"][0],
                "protocol": "stratified by image: 20% of every class's images to test (seed 0)",
                "min_images_per_class": args.min_images,
            },
            backbone=backbone,
            full_resolution=args.full_resolution,
            refresh_every=eval_every,
            embedding_dim=spec["embedding_dim"],
            sweep_split="stratified 10% of train, seed 0; chosen by the coarse-label error",
        )
    validation = split_validation(dataset, fraction=0.1, seed=0) if len(lrs) > 1 else None
    mining = spec.get("mining", "batch_all")
    methods = methods_for(dataset.num_classes, lrs, args.clusters_per_class, mining)
    methods = _common.select_methods(parser, methods, args.methods)
    for method in methods:
        if validation is not None:
            log(
                f"{method.name}: sweep of {len(method.grid)} learning rates on validation ({steps} it.)"
            )
            swept = _common.sweep(base, method, validation, steps)
            chosen, sweep_trials = swept["chosen"], swept["trials"]
        else:
            chosen, sweep_trials = method.grid[0], None
        coarse_metric = "knc_error" if method.fixed["loss"] == "magnet" else None
        entry = {"fixed": method.fixed, "chosen": chosen, "sweep": sweep_trials, "seeds": []}
        for seed in seeds:
            config = _common.make_config(base, method, {**chosen, "steps": steps}, seed)
            curve = _common.learning_curve(config, dataset, eval_steps)
            metrics = curve["metrics"]
            if coarse_metric is None:  # the better kNN at the end of seed 0, kept for all seeds
                coarse_metric = min(
                    (m for m in metrics if m.startswith("knn")), key=lambda m: metrics[m][-1]
                )
            seed_entry = {
                "seed": seed,
                "iterations": curve["iterations"],
                **{m: metrics[m] for m in FINE},
                "coarse_error": metrics[coarse_metric],
                "all_metrics": metrics,
                "seconds": round(curve["seconds"], 1),
            }
            entry["seeds"].append(seed_entry)
            log(
                f"{method.name} seed {seed}: fine Error@1/@5 = {metrics['fine_error_at_1'][-1]:.4f} / "
                f"{metrics['fine_error_at_5'][-1]:.4f}, coarse {coarse_metric} = {metrics[coarse_metric][-1]:.4f}"
                + (
                    f", cluster fine purity {metrics['cluster_fine_purity'][-1]:.3f}"
                    if "cluster_fine_purity" in metrics
                    else ""
                )
                + f" ({curve['seconds']:.0f} s)"
            )
        entry["evaluator"] = coarse_metric
        results["methods"][method.name] = entry
    results["environment"] = environment
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["command"] = "python benchmarks/hierarchy.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    results = json.loads(json.dumps(results))
    results.update(summary_of(results))
    _common.write_json(output, results)
    plot(results, output.with_suffix(".png"))
    print_summary(results, summary_of(json.loads(output.read_text())))
    log(f"wrote {output} and {output.with_suffix('.png')} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
