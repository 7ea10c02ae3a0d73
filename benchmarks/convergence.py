"""Convergence: Magnet Loss vs triplet vs softmax at equal network, optimizer, batch and iterations.

The paper (Rippel et al. 2016) claims magnet reaches the triplet baseline's error in 5-30x
fewer iterations. This script measures it in one regime per run:

- ``quick``: digits (MLP), seconds; CI runs it so the script never rots.
- ``fashion_mnist`` / ``mnist``: from scratch, small convnet.
- ``finetune_upper_body``: the paper's regime scaled down: a convnet pretrained briefly with
  softmax on the five Fashion-MNIST classes that are NOT tops (trouser, sandal, sneaker,
  bag, ankle boot), then fine-tuned on the five confusable upper-body classes (T-shirt,
  pullover, dress, coat, shirt). Every method and seed starts from the same pretrained trunk.
- ``stanford_dogs`` / ``oxford_flowers102`` / ``oxford_iiit_pet``: the paper's fine-grained
  datasets through TFDS (needs tensorflow-datasets and the data), images resized to 128²,
  a ResNet, 3 epochs at batch 48; warm-started with ``--init-from DIR`` from a backbone
  pretrained with ``magnet-jax train``. For a GPU/TPU machine: benchmarks/paper_scale.md.

``--init-from DIR`` (any regime) starts the trunk of every sweep and seed run from the
latest checkpoint of a previous ``magnet-jax train`` run (its ``--workdir``); it replaces
finetune_upper_body's own pretraining.

Protocol. Every method uses the same network, Adam, batch size (M·D = 48) and number of
iterations. Its learning rate (and triplet's mining; triplet embeddings are L2-normalised,
margin 0.2 unless overridden) is chosen by a small sweep on a stratified 10% validation
split of the training set (seed 0), never on the test set; the same sweep picks each
method's evaluator (kNN k in {1, 5}; softmax may also be scored by its own classifier;
magnet is scored by kNC). Then every method trains ``--seeds`` seeds on the full training
set and is evaluated on the full test set every ``eval_every`` iterations (and at 0).

Speed-up = iterations triplet needs to reach its best mean test error ÷ iterations magnet
(kNC) needs to reach that same error, linearly interpolated on the mean curves ("not
reached" is a valid result); per seed the same on that seed's curves. Also the relative
error reduction at the final iteration. The numbers printed are recomputed from the JSON
written (``--check PATH`` recomputes and compares them for an existing file).

Commands (results/convergence_<regime>.json and .png):
  python benchmarks/convergence.py --regime quick
  python benchmarks/convergence.py --regime fashion_mnist --steps 1500 --seeds 2 --lrs 1e-3 3e-3
  python benchmarks/convergence.py --check benchmarks/results/convergence_quick.json
  python benchmarks/convergence.py --regime stanford_dogs --init-from runs/backbone --data-dir ~/tensorflow_datasets
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import Method, log  # noqa: E402

# Fashion-MNIST class ids.
UPPER_BODY = (0, 2, 3, 4, 6)  # T-shirt/top, Pullover, Dress, Coat, Shirt
OTHER_FIVE = (1, 5, 7, 8, 9)  # Trouser, Sandal, Sneaker, Bag, Ankle boot

REGIMES = {
    "quick": dict(
        dataset="digits",
        steps=200,
        eval_every=25,
        seeds=2,
        lrs=(3e-3,),
        sweep_steps=100,
        triplet_minings=("batch_all",),
        magnet=dict(clusters_per_class=4, clusters_per_batch=12, examples_per_cluster=4),
        classes_per_batch=6,
    ),
    "fashion_mnist": dict(
        dataset="fashion_mnist",
        steps=3000,
        eval_every=250,
        seeds=3,
        lrs=(3e-4, 1e-3, 3e-3),
        triplet_minings=("batch_all", "semi_hard"),
        magnet=dict(clusters_per_class=4, clusters_per_batch=12, examples_per_cluster=4),
        classes_per_batch=6,
    ),
    "mnist": dict(
        dataset="mnist",
        steps=3000,
        eval_every=250,
        seeds=3,
        lrs=(3e-4, 1e-3, 3e-3),
        triplet_minings=("batch_all", "semi_hard"),
        magnet=dict(clusters_per_class=4, clusters_per_batch=12, examples_per_cluster=4),
        classes_per_batch=6,
    ),
    "finetune_upper_body": dict(
        dataset="fashion_mnist",
        steps=2000,
        eval_every=200,
        seeds=3,
        lrs=(3e-4, 1e-3),
        triplet_minings=("batch_all", "semi_hard"),
        magnet=dict(clusters_per_class=2, clusters_per_batch=8, examples_per_cluster=6),
        classes_per_batch=4,
        pretrain_steps=1000,
        pretrain_lr=1e-3,
    ),
}
BATCH = 48


def _paper_regime(
    builder: str, splits: tuple[str, str], num_train: int, clusters_per_class: int
) -> dict:
    """A paper-scale fine-grained regime (Rippel et al. 2016, section 4.1): TFDS images
    resized to ``image_size``², a ResNet, 3 epochs of the training set at batch 48, magnet
    M=12 clusters of D=4. Meant for a GPU/TPU machine with the data and a pretrained trunk
    (``--init-from``); see benchmarks/paper_scale.md."""
    steps = math.ceil(3 * num_train / BATCH)
    return dict(
        dataset=f"tfds:{builder}",
        tfds_splits=splits,
        image_size=128,
        architecture="resnet",
        embedding_dim=64,
        steps=steps,
        eval_every=max(1, steps // 10),
        seeds=2,
        lrs=(1e-4, 3e-4, 1e-3),
        triplet_minings=("batch_all", "semi_hard"),
        magnet=dict(
            clusters_per_class=clusters_per_class, clusters_per_batch=12, examples_per_cluster=4
        ),
        classes_per_batch=12,
        paper_scale=True,
    )


# The three fine-grained datasets of the paper, with their TFDS builders and splits
# (training-set sizes: Stanford Dogs 12,000 = 100/class x 120; Oxford Flowers 102
# train+validation 2,040 = 20/class x 102; Oxford-IIIT Pet trainval 3,680 ~ 100/class x 37).
# Flowers has 20 images per class, so K=4 keeps about 5 per cluster (>= D).
PAPER_REGIMES = {
    "stanford_dogs": _paper_regime("stanford_dogs", ("train", "test"), 12000, clusters_per_class=8),
    "oxford_flowers102": _paper_regime(
        "oxford_flowers102", ("train+validation", "test"), 2040, clusters_per_class=4
    ),
    "oxford_iiit_pet": _paper_regime(
        "oxford_iiit_pet", ("train", "test"), 3680, clusters_per_class=8
    ),
}
REGIMES.update(PAPER_REGIMES)

# The paper's regime on this machine: the ImageNet-pretrained EfficientNet-Lite0 (see
# _common.CPU_BACKBONE for what trains and what is cached; --full-resolution: 224 px,
# everything trains) on the emoji set. Magnet's grid varies one setting at a time around
# K=8, M=12, D=4, alpha=1, lr=1e-3; the others sweep their learning rate. The index is
# refreshed at every evaluation, so the purity recorded there is the current index's.
_MAGNET_CENTRE = dict(
    clusters_per_class=8, clusters_per_batch=12, examples_per_cluster=4, alpha=1.0
)
EMOJI_MAGNET_GRID = [  # the most telling first (--grid-points N keeps the first N)
    {"lr": 1e-3},
    {"lr": 1e-3, "clusters_per_class": 2},
    {"lr": 3e-3},
    {"lr": 1e-3, "alpha": 4.0},
    {"lr": 1e-3, "clusters_per_batch": 6, "examples_per_cluster": 8},
    {"lr": 1e-3, "clusters_per_class": 4},
    {"lr": 3e-4},
]
EMOJI_REGIMES = {
    # 88 subcategories (those of >= 20 images), 20% of every subcategory's images to test
    # (seed 0; so the test images' emoji occur in training too, which the fine Error@k
    # of the hierarchy view of these same runs needs).
    "emoji_subcategory": dict(
        emoji=("subcategory", "default"),
        steps=600,
        eval_every=50,
        seeds=3,
        lrs=(3e-4, 1e-3, 3e-3),
        sweep_steps=300,
        triplet_minings=("semi_hard",),
        magnet=_MAGNET_CENTRE,
        magnet_grid=EMOJI_MAGNET_GRID,
        classes_per_batch=12,
        embedding_dim=64,
        modern=True,
    ),
    # The set's own class-disjoint split (818 emoji to train, the 818 others to test),
    # Recall@k and MAP@R on the unseen emoji. Magnet K=2: most emoji have 4 images.
    # No sweep of its own: a validation split of 4-image classes leaves one image per
    # class, too few for retrieval; each method's settings come from --settings-from.
    "emoji_zero_shot": dict(
        emoji=("emoji", "classes"),
        steps=600,
        eval_every=50,
        seeds=3,
        lrs=(1e-3,),
        sweep_steps=None,
        triplet_minings=("semi_hard",),
        magnet=dict(_MAGNET_CENTRE, clusters_per_class=2),
        classes_per_batch=12,
        embedding_dim=64,
        modern=True,
        score="recall_at_1_error",
        min_images=0,
    ),
}
REGIMES.update(EMOJI_REGIMES)


def subset_classes(dataset, classes, name):
    """The examples of ``classes`` only, relabelled 0..len(classes)-1 in that order."""
    from magnet_jax.data import Dataset

    remap = np.full(dataset.num_classes, -1, np.int32)
    remap[list(classes)] = np.arange(len(classes), dtype=np.int32)
    train = np.isin(dataset.y_train, classes)
    test = np.isin(dataset.y_test, classes)
    return Dataset(
        name=name,
        x_train=dataset.x_train[train],
        y_train=remap[dataset.y_train[train]],
        x_test=dataset.x_test[test],
        y_test=remap[dataset.y_test[test]],
        class_names=tuple(dataset.class_names[c] for c in classes),
    )


def methods_for(regime: dict, lrs) -> list[Method]:
    lr_grid = [{"lr": lr} for lr in lrs]
    m = regime["magnet"]
    classes = regime["classes_per_batch"]
    triplet_grid = [
        {"lr": lr, "mining": mining} for mining in regime["triplet_minings"] for lr in lrs
    ]
    modern = []
    if regime.get("modern"):  # the modern baselines, class-balanced / uniform batches
        balanced = dict(clusters_per_batch=classes, examples_per_cluster=BATCH // classes)
        modern = [
            Method("multi_similarity", dict(loss="multi_similarity", **balanced), lr_grid),
            Method("proxy_nca", dict(loss="proxy_nca", **balanced), lr_grid),
        ]
    magnet_grid = regime.get("magnet_grid", lr_grid)
    return [
        Method("magnet", dict(loss="magnet", **m), magnet_grid),
        Method(
            "triplet",
            dict(
                loss="triplet",
                normalize=True,
                margin=0.2,
                clusters_per_batch=classes,
                examples_per_cluster=BATCH // classes,
            ),
            triplet_grid,
        ),
        Method(
            "softmax",
            dict(loss="softmax", clusters_per_batch=classes, examples_per_cluster=BATCH // classes),
            lr_grid,
        ),
        *modern,
    ]


def load(
    regime_name: str,
    data_dir: str | None,
    manual_dir: str | None = None,
    regime: dict | None = None,
    min_images: int = _common.EMOJI_MIN_IMAGES,
):
    from magnet_jax.data import load_dataset

    regime = regime if regime is not None else REGIMES[regime_name]
    if regime.get("emoji"):
        level, split = regime["emoji"]
        return _common.load_emoji(level, split, data_dir, min_images=min_images), None
    if regime.get("paper_scale"):
        size = regime["image_size"]
        return load_dataset(
            regime["dataset"],
            data_dir,
            manual_dir=manual_dir,
            splits=regime["tfds_splits"],
            image_size=(size, size),
        ), None
    dataset = load_dataset(regime["dataset"], data_dir)
    source = None
    if regime_name == "finetune_upper_body":
        source = subset_classes(dataset, OTHER_FIVE, "fashion_mnist/other5")
        dataset = subset_classes(dataset, UPPER_BODY, "fashion_mnist/upper_body")
    return dataset, source


def pretrain(source, regime: dict, base: dict) -> tuple[dict, dict]:
    """Softmax on the source task; returns (trunk params, description)."""
    import jax

    from magnet_jax.config import TrainConfig

    steps = regime["pretrain_steps"]
    config = TrainConfig(
        **{
            **base,
            "loss": "softmax",
            "lr": regime["pretrain_lr"],
            "clusters_per_batch": 6,
            "examples_per_cluster": BATCH // 6,
            "steps": steps,
            "seed": 1000,
            "workdir": "/nonexistent-unused",
        }
    )
    curve = _common.learning_curve(config, source, [steps])
    info = {
        "source": source.name,
        "classes": list(source.class_names),
        "loss": "softmax",
        "steps": steps,
        "lr": regime["pretrain_lr"],
        "batch": config.batch_size,
        "seed": 1000,
        "source_test_errors": {k: v[-1] for k, v in curve["metrics"].items()},
        "seconds": round(curve["seconds"], 1),
    }
    log(f"pretrained on {source.name}: {info['source_test_errors']}")
    trunk = jax.tree.map(lambda a: np.array(a, copy=True), _common.trunk_params(curve["params"]))
    return trunk, info


def load_init_trunk(path: str) -> tuple[dict, dict]:
    """The trunk parameters of a previous run's latest checkpoint (``--init-from``): that
    run's workdir or its checkpoints/ folder. Returns (trunk params, description)."""
    import jax

    from magnet_jax.checkpoint import restore_params
    from magnet_jax.warm_start import find_init_checkpoint

    directory, step = find_init_checkpoint(path)
    params = restore_params(directory, step)
    if not isinstance(params, dict) or "trunk" not in params:
        keys = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            f"--init-from {path!r}: the checkpoint {directory}/{step} has no trunk parameters "
            f"(top-level keys: {keys})"
        )
    trunk = jax.tree.map(lambda a: np.array(a, copy=True), params["trunk"])
    info = {"init_from": str(Path(directory).resolve()), "step": int(step)}
    log(f"warm start of every run from {directory} (step {step})")
    return trunk, info


def summary_of(results: dict) -> dict:
    """The speed-ups and final errors, recomputed from a results dict (or JSON file)."""
    curves = {name: {"seeds": m["seeds"]} for name, m in results["methods"].items()}
    out = _common.summarise(curves, reference="triplet", candidate="magnet")
    vs_softmax = _common.summarise(
        {k: curves[k] for k in ("softmax", "magnet") if k in curves},
        reference="softmax",
        candidate="magnet",
    )
    for key in ("speedup_vs_softmax", "relative_error_reduction_vs_softmax"):
        if key in vs_softmax:
            out[key] = vs_softmax[key]
    if results.get("emoji"):
        out.update(_common.emoji_summary(results["methods"]))
    return out


def print_summary(results: dict, summary: dict) -> None:
    print(
        f"\nregime {results['regime']}: {results['steps']} iterations, {len(results['seeds'])} seeds, "
        f"batch {BATCH}; test error (mean ± std over seeds) at the final iteration:"
    )
    print("| method | evaluator | chosen | final test error |")
    print("|---|---|---|---|")
    for name, method in results["methods"].items():
        f = summary["final_error"][name]
        chosen = ", ".join(f"{k}={v}" for k, v in method["chosen"].items())
        print(
            f"| {name} | {method['evaluator']} | {chosen} | {100 * f['mean']:.2f} ± {100 * f['std']:.2f}% |"
        )
    if "speedup_vs_triplet" not in summary:  # a part of a run split by method
        return
    s = summary["speedup_vs_triplet"]
    print(f"speed-up vs triplet (mean curves): {_common.format_speedup(s['mean'])}")
    for p in s["per_seed"]:
        print(f"  seed {p['seed']}: {_common.format_speedup(p)}")
    print(
        f"relative error reduction vs triplet at the final iteration: "
        f"{100 * summary['relative_error_reduction_vs_triplet']:.1f}%"
    )
    if "relative_error_reduction_vs_softmax" in summary:
        print(
            f"speed-up vs softmax ({results['methods']['softmax']['evaluator']}): "
            f"{_common.format_speedup(summary['speedup_vs_softmax']['mean'])}; relative error reduction vs softmax: "
            f"{100 * summary['relative_error_reduction_vs_softmax']:.1f}%"
        )


def check(path: Path) -> int:
    results = json.loads(path.read_text())
    recomputed = summary_of(results)
    stored = {k: results[k] for k in recomputed}
    return _common.check_summary(results, recomputed, stored, print_summary)


def _stale_summary(key: str) -> bool:
    """Summary keys that depend on which methods a file holds (recomputed on a merge)."""
    return key.startswith(("speedup_vs_", "relative_error_reduction_vs_", "final_")) or (
        key == "cluster_fine_purity"
    )


def merge(paths, output) -> int:
    """``--merge``: one results file from a regime's per-method files."""
    return _common.merge_command(
        "convergence.py",
        paths,
        output,
        summary_of=summary_of,
        plot=plot,
        print_summary=print_summary,
        stale=_stale_summary,
    )


def plot(results: dict, path: Path) -> None:
    from magnet_jax.plotting import plot_learning_curves

    # Iteration 0 (the untrained network, up to 90% error) is left out of the picture so
    # the curves are readable; it stays in the JSON and in the speed-up's interpolation.
    curves = {
        f"{name} ({m['evaluator']})": [
            (s["iterations"][1:], s["test_error"][1:]) for s in m["seeds"]
        ]
        for name, m in results["methods"].items()
    }
    plot_learning_curves(
        curves, path, title=f"{results['regime']}: test error vs iterations (mean ± std)"
    )


def main(argv=None) -> int:
    return _common.run_with_memo(_main, argv)


def _main(argv, memo) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regime", choices=sorted(REGIMES), default="quick")
    parser.add_argument("--quick", action="store_true", help="same as --regime quick")
    parser.add_argument(
        "--seeds", type=int, default=None, help="number of seeds (default per regime)"
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=None, help="learning rates swept on validation"
    )
    parser.add_argument("--minings", nargs="+", default=None, help="triplet minings swept")
    parser.add_argument(
        "--sweep-steps", type=int, default=None, help="iterations of a sweep run (default --steps)"
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="finetune_upper_body: softmax pretraining steps on the source (0: random init, the control)",
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="train on a stratified subset of this many training examples (seed 1; the full "
        "test set is kept): a reduced-scale run",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"dataset folder (default {_common.DEFAULT_DATA_DIR}; for the tfds regimes "
        "TFDS's data dir, default TFDS's own ~/tensorflow_datasets)",
    )
    parser.add_argument(
        "--manual-dir",
        default=None,
        help="tfds regimes: TFDS manual download dir, when TFDS cannot download the raw files",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="tfds regimes: resize the images to N x N (default per regime: 128)",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="warm-start every sweep and seed run's trunk from the latest checkpoint of a previous "
        "`magnet-jax train` run (its --workdir or checkpoints/ folder), e.g. a pretrained "
        "backbone; replaces finetune_upper_body's own pretraining",
    )
    parser.add_argument(
        "--full-resolution",
        action="store_true",
        help="emoji regimes: 224 px, every backbone stage trains, no cached prefix (for a GPU); "
        "default: 64 px, the first 8 stages frozen and cached (CPU)",
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="emoji regimes: the backbone without its ImageNet weights (a control; the tests)",
    )
    parser.add_argument(
        "--settings-from",
        type=Path,
        default=None,
        metavar="FILE",
        help="emoji_zero_shot: each method's chosen settings (lr, ...) from this results JSON "
        "(default results/convergence_emoji_subcategory.json)",
    )
    parser.add_argument(
        "--min-images",
        type=int,
        default=None,
        help="emoji regimes: leave out the classes of fewer images (magnet needs >= K per "
        f"class; default {_common.EMOJI_MIN_IMAGES}, emoji_zero_shot 0)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="NAME",
        help="run only these methods (magnet, triplet, softmax; multi_similarity and proxy_nca "
        "in the emoji regimes); default all",
    )
    parser.add_argument(
        "--grid-points",
        type=int,
        default=None,
        metavar="N",
        help="sweep only the first N points of every method's grid (a reduced run)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="emoji regimes: only the first grid point of every method (a rehearsal of the "
        "code path with small --steps, e.g. of --full-resolution on a CPU)",
    )
    parser.add_argument("--output", default=None, help="default results/convergence_<regime>.json")
    parser.add_argument(
        "--check", type=Path, default=None, help="recompute the summary of a results JSON"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="FILE",
        help="merge the results files of one regime run method by method (--methods, "
        "--output) into --output, recomputing the summary",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check(args.check)
    if args.merge:
        return merge(args.merge, args.output)
    regime_name = "quick" if args.quick else args.regime
    regime = copy.deepcopy(REGIMES[regime_name])
    paper_scale = bool(regime.get("paper_scale"))
    emoji = bool(regime.get("emoji"))
    if (args.full_resolution or args.random_init or args.settings_from or args.smoke) and not emoji:
        parser.error(
            "--full-resolution, --random-init, --settings-from and --smoke apply to the emoji regimes "
            f"({', '.join(EMOJI_REGIMES)}) only"
        )
    if args.manual_dir is not None and not paper_scale:
        parser.error(f"--manual-dir applies to the tfds regimes ({', '.join(PAPER_REGIMES)}) only")
    if args.image_size is not None and emoji:
        regime["image_size"] = args.image_size
    elif args.image_size is not None:
        if not paper_scale:
            parser.error(
                f"--image-size applies to the tfds regimes ({', '.join(PAPER_REGIMES)}) only"
            )
        if args.image_size < 8:
            parser.error(f"--image-size must be >= 8, got {args.image_size}")
        regime["image_size"] = args.image_size
    if args.minings:
        regime["triplet_minings"] = tuple(args.minings)
    if args.pretrain_steps is not None:
        regime["pretrain_steps"] = args.pretrain_steps
    steps = args.steps or regime["steps"]
    eval_every = args.eval_every or regime["eval_every"]
    seeds = list(range(args.seeds or regime["seeds"]))
    lrs = tuple(args.lrs or regime["lrs"])
    sweep_steps = args.sweep_steps or regime.get("sweep_steps") or steps
    settings_from = None
    if emoji and regime.get("sweep_steps", steps) is None:
        sweep_steps = None
        path = args.settings_from or _common.RESULTS / "convergence_emoji_subcategory.json"
        if str(path) == "none":  # every method at its first grid point (lr = --lrs[0])
            settings_from = {"file": None, "chosen": {}}
        else:
            try:
                methods_file = json.loads(Path(path).read_text())["methods"]
            except (OSError, ValueError, KeyError) as error:
                print(f"convergence.py: error: --settings-from {path}: {error}", file=sys.stderr)
                return 2
            # The pseudo-methods (with a note) re-score another method's runs.
            chosen = {name: m["chosen"] for name, m in methods_file.items() if "note" not in m}
            settings_from = {"file": str(path), "chosen": chosen}
    output = (
        Path(args.output) if args.output else _common.RESULTS / f"convergence_{regime_name}.json"
    )
    started = time.perf_counter()
    environment = _common.environment()  # at the start: the library version this run used
    _common.enable_compilation_cache()

    from magnet_jax.data import split_validation

    data_dir = args.data_dir
    if data_dir is None and not paper_scale:
        data_dir = str(_common.DEFAULT_DATA_DIR)
    try:
        init_trunk, init_info = load_init_trunk(args.init_from) if args.init_from else (None, None)
        if args.min_images is None:
            args.min_images = regime.get("min_images", _common.EMOJI_MIN_IMAGES)
        dataset, source = load(regime_name, data_dir, args.manual_dir, regime, args.min_images)
    except (ImportError, FileNotFoundError, ValueError) as error:
        print(f"convergence.py: error: {error}", file=sys.stderr)
        return 2
    dataset = _common.subsample_train(dataset, args.train_size)
    if source is not None:
        source = _common.subsample_train(source, args.train_size)
    validation = split_validation(dataset, fraction=0.1, seed=0)
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
    if paper_scale:
        base.update(embedding_dim=regime["embedding_dim"], architecture=regime["architecture"])
    backbone = None
    if emoji:
        backbone = _common.emoji_backbone(args.full_resolution, args.random_init, memo)
        if "image_size" in regime:
            backbone["image_size"] = regime["image_size"]
        # The index is refreshed at every evaluation (its purity is recorded there).
        base.update(embedding_dim=regime["embedding_dim"], refresh_every=eval_every, **backbone)
    pretrain_info = None
    # --pretrain-steps 0: the random-init control. --init-from replaces the pretraining.
    if init_trunk is None and source is not None and regime["pretrain_steps"] > 0:
        init_trunk, pretrain_info = pretrain(source, regime, base)

    methods = _common.select_methods(parser, methods_for(regime, lrs), args.methods)
    points = 1 if args.smoke else args.grid_points
    if points is not None:
        methods = [dataclasses.replace(m, grid=m.grid[:points]) for m in methods]
    eval_steps = _common.evaluation_steps(steps, eval_every)
    results = {
        "regime": regime_name,
        "dataset": dataset.name,
        "num_train": dataset.num_train,
        "num_test": dataset.num_test,
        "steps": steps,
        "eval_every": eval_every,
        "seeds": seeds,
        "batch_size": BATCH,
        "sweep": {
            "split": "stratified 10% of train, seed 0",
            "steps": sweep_steps,
            "seed": 0,
            "lrs": list(lrs),
        },
        "pretrain": pretrain_info,
        "methods": {},
    }
    if emoji:
        level, split = regime["emoji"]
        results.update(
            emoji={
                "label_level": level,
                "split": split,
                "protocol": (
                    "stratified by image: 20% of every class's images to test (seed 0)"
                    if split == "default"
                    else "the set's own class-disjoint split: emoji class id < C/2 train, "
                    "the rest test (unseen classes)"
                ),
                "min_images_per_class": args.min_images,
                "num_classes": dataset.num_classes,
                "num_train_classes": int(len(np.unique(dataset.y_train))),
                "num_test_classes": int(len(np.unique(dataset.y_test))),
            },
            backbone=backbone,
            full_resolution=args.full_resolution,
            refresh_every=eval_every,
            embedding_dim=regime["embedding_dim"],
            grids={m.name: m.grid for m in methods},
        )
        if settings_from is not None:
            results["sweep"] = {"none": "settings taken from another regime", **settings_from}
    if init_info is not None:
        results["init_from"] = init_info
    if paper_scale:
        results.update(
            image_size=regime["image_size"],
            tfds_splits=list(regime["tfds_splits"]),
            architecture=regime["architecture"],
            embedding_dim=regime["embedding_dim"],
        )
    pseudo = {}
    score = regime.get("score")
    for method in methods:
        if sweep_steps is None:  # settings from another regime; its evaluator: `score`
            given = settings_from["chosen"].get(method.name, method.grid[0])
            # K and the batch shape are this regime's (K <= the smallest class).
            given = {k: v for k, v in given.items() if k in ("lr", "alpha", "mining")}
            chosen = {"chosen": given, "metric": score, "trials": None, "chosen_validation": {}}
        else:
            log(
                f"{method.name}: sweep of {len(method.grid)} points on validation ({sweep_steps} it.)"
            )
            chosen = _common.sweep(
                base, method, validation, sweep_steps, score=score, init_trunk=init_trunk
            )
        entry = {
            "fixed": method.fixed,
            "chosen": chosen["chosen"],
            "evaluator": chosen["metric"],
            "sweep": chosen["trials"],
            "seeds": [],
        }
        extra_metric, extra_name = None, None
        if score is not None:  # one evaluator for all (retrieval on unseen classes)
            pass
        elif method.name == "softmax" and chosen["metric"] != "classifier_error":
            extra_metric, extra_name = "classifier_error", "softmax_classifier"
        elif method.name == "softmax":  # the classifier won: keep the best kNN curve too
            vals = chosen["chosen_validation"]
            extra_metric = min((m for m in vals if m.startswith("knn")), key=vals.get)
            extra_name = "softmax_embedding_knn"
        elif method.name == "magnet":  # magnet's embedding scored by its best kNN too
            vals = chosen["chosen_validation"]
            extra_metric = min((m for m in vals if m.startswith("knn")), key=vals.get)
            extra_name = "magnet_knn"
        if extra_name:
            pseudo[extra_name] = {
                "fixed": method.fixed,
                "chosen": chosen["chosen"],
                "evaluator": extra_metric,
                "note": f"the same runs as {method.name}, scored by {extra_metric}",
                "seeds": [],
            }
        for seed in seeds:
            config = _common.make_config(base, method, {**chosen["chosen"], "steps": steps}, seed)
            curve = _common.learning_curve(config, dataset, eval_steps, init_trunk=init_trunk)
            entry["seeds"].append(
                {
                    "seed": seed,
                    "iterations": curve["iterations"],
                    "test_error": curve["metrics"][chosen["metric"]],
                    "all_metrics": curve["metrics"],
                    "seconds": round(curve["seconds"], 1),
                    "init": curve["init"],
                }
            )
            if extra_name:
                pseudo[extra_name]["seeds"].append(
                    {
                        "seed": seed,
                        "iterations": curve["iterations"],
                        "test_error": curve["metrics"][extra_metric],
                    }
                )
            log(
                f"{method.name} seed {seed}: final {chosen['metric']} = {curve['metrics'][chosen['metric']][-1]:.4f} "
                f"({curve['seconds']:.0f} s)"
            )
        results["methods"][method.name] = entry
    results["methods"].update(pseudo)
    results["environment"] = environment
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["command"] = "python benchmarks/convergence.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    # The summary is computed from the curves exactly as stored (a JSON round trip).
    results = json.loads(json.dumps(results))
    summary = summary_of(results)
    results.update(summary)
    _common.write_json(output, results)
    plot(results, output.with_suffix(".png"))
    print_summary(results, summary_of(json.loads(output.read_text())))
    log(f"wrote {output} and {output.with_suffix('.png')} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
