"""The ``magnet-jax`` command: a thin layer over :mod:`magnet_jax.training`.

    magnet-jax train [--dataset digits] [--loss magnet] [--steps N] ... [--config run.json]
    magnet-jax evaluate --workdir DIR
    magnet-jax plot --workdir DIR [DIR ...]
    magnet-jax embed --workdir DIR --output FILE.npz [--features]

Flags are generated from :class:`~magnet_jax.config.TrainConfig`, so every config field has
exactly one flag (``clusters_per_class`` -> ``--clusters-per-class``), grouped and described
by :data:`magnet_jax.config.FIELDS`. Precedence: built-in defaults < the ``config.json`` of
the run that ``--workdir`` holds (so ``--workdir DIR`` alone resumes it) < ``--config`` JSON
file < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing

from magnet_jax import distributed
from magnet_jax.config import FIELDS, GROUPS, FieldInfo, TrainConfig, flag
from magnet_jax.data import dataset_help
from magnet_jax.workdir import TrainingInterrupted, resolve_config


def _flag_type(annotation):
    """The argparse type for a dataclass field annotation such as ``int | None``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {}, {})  # annotations are postponed strings
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0]
    return annotation


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, listed under its group of ``--help`` (config.FIELDS)."""
    groups = {name: parser.add_argument_group(f"{title} flags") for name, title in GROUPS.items()}
    other = None
    for field in dataclasses.fields(TrainConfig):
        info = FIELDS.get(field.name, FieldInfo("other", ""))
        if info.group in groups:
            group = groups[info.group]
        else:
            other = other or parser.add_argument_group("other flags")
            group = other
        kind = _flag_type(field.type)
        default = info.default if info.default is not None else field.default
        if kind is bool:
            default = info.default or ("on" if field.default else "off")
        if field.name == "dataset":  # the data registry names every source
            info = info._replace(help=dataset_help())
        help_text = info.help if default is None else f"{info.help} (default: {default})"
        if kind is bool:
            group.add_argument(
                flag(field.name),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        group.add_argument(
            flag(field.name),
            # Parse as text and let TrainConfig check the type: one message for flags and
            # config files alike, naming the flag.
            type=_parser_for(kind, field.name),
            default=argparse.SUPPRESS,
            help=help_text,
            choices=info.choices,
            metavar="{" + ",".join(info.choices) + "}" if info.choices else _metavar(kind),
        )


def _metavar(kind) -> str:
    return {int: "N", float: "X"}.get(kind, "TEXT")


def _parser_for(kind, name: str):
    if kind not in (int, float):
        return kind

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            wanted = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Precedence: defaults < the run in --workdir (its config.json) < --config < flags."""
    explicit: dict = {}
    if getattr(args, "config", None):
        TrainConfig.from_json(args.config)  # checks the file: unknown keys, types
        with open(args.config) as f:
            explicit.update(json.load(f))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    explicit.update({k: v for k, v in vars(args).items() if k in names})
    return resolve_config(explicit)


def _print_metrics(metrics: dict) -> None:
    """Every number the run's evaluators yielded, in their order, then steps and seconds."""
    last = ("steps", "seconds")
    keys = [k for k, v in metrics.items() if isinstance(v, int | float) and k not in last]
    keys += [k for k in last if k in metrics]
    if not keys:
        return
    width = max(len(k) for k in keys)
    for key in keys:
        value = metrics[key]
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {text}")


def _cmd_train(args: argparse.Namespace) -> int:
    from magnet_jax.training import train

    config = _config_from_args(args)
    metrics = train(config, progress=not args.no_progress)
    if not distributed.is_main_process():
        return 0
    print(
        f"trained {config.loss} on {config.dataset}; results in {os.path.abspath(config.workdir)}"
    )
    _print_metrics(metrics)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from magnet_jax.training import evaluate, load_for_evaluation

    run, state, method_state = load_for_evaluation(args.workdir)
    metrics = evaluate(run, state.params, method_state)
    metrics["steps"] = int(state.step)
    if not distributed.is_main_process():
        return 0
    path = os.path.join(args.workdir, "evaluation.json")
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    _print_metrics(metrics)
    print(f"written to {path}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from magnet_jax import plotting

    for path in plotting.plot_runs(
        args.workdir, output_dir=args.output, max_points=args.max_points
    ):
        print(path)
    return 0


def _add_process_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several processes (hosts)",
        "run the same command on every host; see magnet_jax.distributed. Each flag may "
        f"instead come from the environment ({distributed.ENV_COORDINATOR}, "
        f"{distributed.ENV_NUM_PROCESSES}, {distributed.ENV_PROCESS_ID}).",
    )
    group.add_argument("--coordinator", help="HOST:PORT where process 0 listens")
    group.add_argument("--num-processes", type=int, help="how many processes cooperate")
    group.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
    group.add_argument(
        "--distributed-auto",
        action="store_true",
        help="let JAX detect the cluster (SLURM, Cloud TPU pods) instead of the three flags",
    )
    group.add_argument(
        "--join-timeout",
        type=int,
        default=distributed.DEFAULT_JOIN_TIMEOUT,
        help="seconds to wait for every process to join before stopping with an error",
    )


def _start_processes(args: argparse.Namespace) -> None:
    """Joins the other processes when the flags or the environment name them."""
    group = distributed.from_environment(args.coordinator, args.num_processes, args.process_id)
    distributed.initialize(group, auto=args.distributed_auto, join_timeout=args.join_timeout)


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
        "train",
        help="train an embedding (resumes if --workdir holds a run)",
        description="Train an embedding. A --workdir that holds a run resumes it: its "
        "config.json supplies every flag not given.",
    )
    train_parser.add_argument("--config", help="JSON file of config values; flags override it")
    train_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(train_parser)
    _add_process_flags(train_parser)
    train_parser.set_defaults(handler=_cmd_train)

    eval_parser = commands.add_parser("evaluate", help="re-evaluate the latest checkpoint of a run")
    eval_parser.add_argument("--workdir", required=True)
    _add_process_flags(eval_parser)
    eval_parser.set_defaults(handler=_cmd_evaluate)

    plot_parser = commands.add_parser("plot", help="embedding maps and learning curves of runs")
    plot_parser.add_argument(
        "--workdir", required=True, nargs="+", help="one or several runs' work directories"
    )
    plot_parser.add_argument(
        "--output", default=None, help="folder for the PNGs (default: the first workdir)"
    )
    plot_parser.add_argument(
        "--max-points",
        type=int,
        default=1000,
        help="embedding maps: t-SNE of at most N random test examples, t-SNE being "
        "quadratic in N (default: 1000)",
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
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a flag argparse refused (it printed why)
        return exit.code if isinstance(exit.code, int) else 2
    try:
        if hasattr(args, "coordinator"):
            _start_processes(args)
        return args.handler(args)
    except TrainingInterrupted as stopped:
        print(f"magnet-jax: {stopped}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("magnet-jax: interrupted before training started", file=sys.stderr)
        return 130
    # OSError: file-system errors (a work directory or checkpoint that cannot be written).
    except (ValueError, OSError, ImportError, FloatingPointError, distributed.JoinError) as error:
        print(f"magnet-jax: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
