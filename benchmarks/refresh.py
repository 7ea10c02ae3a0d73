"""The cost of the Magnet index refresh, and what a cheaper refresh does to accuracy.

    python benchmarks/refresh.py           # Fashion-MNIST, convnet, 3,000 steps, 3 seeds x 4 arms
    python benchmarks/refresh.py --dataset mnist --arms full memory   # the same on MNIST
    python benchmarks/refresh.py --quick   # digits, MLP, seconds (CI smoke test)

Every refresh embeds the whole training set and re-clusters every class (issue 13). Arms,
each otherwise the trainer's default (``TrainConfig()``: M=8, D=8, K=4, Adam 1e-3 cosine,
one refresh per epoch):

- ``full``: the default refresh, k-means++ then up to 50 Lloyd iterations;
- ``warm``: ``--kmeans-warm-start``, every refresh after the first starts Lloyd from the
  previous refresh's centroids;
- ``iters10``: ``--kmeans-iterations 10``;
- ``memory``: ``--embedding-memory`` one refresh period: every refresh after the first
  reuses the embeddings the steps since the previous refresh computed, and embeds only
  the examples those steps did not draw;
- ``memory_half``: ``--embedding-memory`` half a refresh period: only the embeddings of the
  last half period's steps are reused (younger ones, and fewer).

Each run trains through the library's loop (:func:`magnet_jax.training.learning_curve`:
the refreshes and steps of ``train``) and is evaluated once, at the end (kNN k=1 and 5, kNC;
the evaluators of ``_common``). Every refresh is timed in two parts: embedding the training
set, and clustering plus building the index from those embeddings. Compilation is kept out
of the timings: before its first seed every arm runs a few steps with two refreshes (not
recorded), and the persistent compilation cache gives the measured runs those programs.
Runs go seed by seed, the arms interleaved, so that load on the shared machine hits every
arm alike.

Reported per arm: test errors, mean ± std over seeds, and the paired difference to ``full``
(same seed: same initial network, same first refresh); the median refresh, in seconds,
over the refreshes after the first (the first always starts from k-means++); and the
refreshes' share of the training time (steps + refreshes; the evaluation is excluded).

Writes results/refresh.json (refresh_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import log  # noqa: E402

ARM_NAMES = ("full", "warm", "iters10", "memory", "memory_half")


def arms(refresh_period: int) -> dict[str, dict]:
    """Each arm's overrides of the trainer's defaults; ``refresh_period`` is the steps
    between two refreshes (one epoch)."""
    return {
        "full": {},
        "warm": {"kmeans_warm_start": True},
        "iters10": {"kmeans_iterations": 10},
        "memory": {"embedding_memory": refresh_period},
        "memory_half": {"embedding_memory": refresh_period // 2},
    }


METRICS = ("knc_error", "knn1_error", "knn5_error")


class TimedRefresh:
    """A method whose every refresh is timed in two parts: ``embed_seconds`` (the training
    set embedded) and ``cluster_seconds`` (k-means and the index built from those
    embeddings). Everything else is the wrapped method's."""

    def __init__(self, method):
        self._method = method
        self.refreshes: list[dict[str, float]] = []

    def __getattr__(self, name):
        return getattr(self._method, name)

    def refresh(self, state, *, embed, params, data, key, diagnostics=False):
        import jax

        started = time.perf_counter()
        embeddings = jax.block_until_ready(embed(params, data.x))
        embedded = time.perf_counter()
        new_state, report = self._method.refresh(
            state,
            embed=lambda params, x: embeddings,
            params=params,
            data=data,
            key=key,
            diagnostics=diagnostics,
        )
        jax.block_until_ready(new_state)
        self.refreshes.append(
            {
                "embed_seconds": embedded - started,
                "cluster_seconds": time.perf_counter() - embedded,
            }
        )
        return new_state, report


def one_run(config, dataset) -> dict:
    """Trains ``config`` (refreshes timed), then evaluates once."""
    from magnet_jax import training

    run = training.prepare(config, dataset)
    timed = TimedRefresh(run.method)
    run.method = timed
    load = list(os.getloadavg())
    started = time.perf_counter()
    curve = training.learning_curve(run, [config.steps], evaluators=())
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    metrics = _common.evaluate(run, curve["state"].params, curve["method_state"])
    eval_seconds = time.perf_counter() - started
    refreshes = [
        {"step": i * run.refresh_every, **times} for i, times in enumerate(timed.refreshes)
    ]
    refresh_seconds = sum(r["embed_seconds"] + r["cluster_seconds"] for r in refreshes)
    extra = {}
    memory = curve["state"].memory
    if memory is not None:  # the share of the training set the last period's steps embedded
        written = np.asarray(memory.step)
        extra["memory_rows_recent"] = float(np.mean(written >= config.steps - run.refresh_every))
    return {
        "seed": config.seed,
        **{name: metrics.get(name) for name in METRICS},
        "final_loss": curve["final_loss"],
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "refresh_seconds": refresh_seconds,
        "refresh_fraction": refresh_seconds / train_seconds,
        "refreshes": refreshes,
        "load_average_at_start": load,
        **extra,
    }


def warm_up(config, dataset) -> None:
    """Compiles what the arm's runs use (the step, the embedding, the first and a later
    refresh): a few steps of the same program with two refreshes, nothing recorded."""
    from magnet_jax import training

    run = training.prepare(dataclasses.replace(config, refresh_every=2), dataset)
    training.learning_curve(run, [4], evaluators=())


def epoch_fraction(run: dict, steps: int) -> float | None:
    """A run's median refresh after the first over the time of the steps of one refresh
    period (an epoch by default): what the refresh adds to an epoch, without the first
    refresh (which every run needs before its first step) and the last period's
    truncation."""
    later = run["refreshes"][1:]
    if not later:
        return None
    period = later[0]["step"]
    step_seconds = (run["train_seconds"] - run["refresh_seconds"]) / steps
    median = _median([r["embed_seconds"] + r["cluster_seconds"] for r in later])
    return median / (period * step_seconds)


def summarise(runs: dict[str, list[dict]], steps: int) -> dict:
    """Per arm: mean ± std of every metric over seeds, the paired difference to ``full``,
    the median refresh (after the first), the refreshes' share of training time and a
    refresh's share of an epoch (:func:`epoch_fraction`)."""
    summary = {}
    for arm, seeds in runs.items():
        later = [r for run in seeds for r in run["refreshes"][1:]]
        fractions = [epoch_fraction(run, steps) for run in seeds]
        entry = {
            "seeds": [run["seed"] for run in seeds],
            "refresh_median_seconds": _median(
                [r["embed_seconds"] + r["cluster_seconds"] for r in later]
            ),
            "embed_median_seconds": _median([r["embed_seconds"] for r in later]),
            "cluster_median_seconds": _median([r["cluster_seconds"] for r in later]),
            "first_cluster_median_seconds": _median(
                [run["refreshes"][0]["cluster_seconds"] for run in seeds]
            ),
            "refresh_fraction_mean": float(np.mean([run["refresh_fraction"] for run in seeds])),
            "epoch_fraction_mean": (None if None in fractions else float(np.mean(fractions))),
            "train_seconds_mean": float(np.mean([run["train_seconds"] for run in seeds])),
        }
        for name in METRICS:
            values = np.array([run[name] for run in seeds], float)
            entry[name] = _mean_std(values)
            if arm != "full" and "full" in runs:
                reference = {run["seed"]: run[name] for run in runs["full"]}
                paired = np.array([run[name] - reference[run["seed"]] for run in seeds], float)
                entry[f"{name}_minus_full"] = _mean_std(paired)
        summary[arm] = entry
    return summary


def _median(values):
    return statistics.median(values) if values else None


def _mean_std(values: np.ndarray) -> dict:
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "values": values.tolist()}


def _pm(stats: dict, scale: float = 100.0, signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{stats['mean'] * scale:{sign}.2f}"
    return text if stats["std"] is None else f"{text} ± {stats['std'] * scale:.2f}"


def table(summary: dict) -> str:
    lines = [
        "| arm | kNC error % | kNC − full (paired) | 1-NN error % | 5-NN error % "
        "| refresh s (embed + cluster), median | first refresh's cluster s "
        "| refreshes / training time | a refresh / an epoch of steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, entry in summary.items():
        paired = entry.get("knc_error_minus_full")
        lines.append(
            f"| {arm} | {_pm(entry['knc_error'])} "
            f"| {'–' if paired is None else _pm(paired, signed=True)} "
            f"| {_pm(entry['knn1_error'])} | {_pm(entry['knn5_error'])} "
            f"| {entry['refresh_median_seconds']:.2f} ({entry['embed_median_seconds']:.2f} + "
            f"{entry['cluster_median_seconds']:.2f}) "
            f"| {entry['first_cluster_median_seconds']:.2f} "
            f"| {entry['refresh_fraction_mean']:.1%} "
            f"| {_percent(entry.get('epoch_fraction_mean'))} |"
        )
    return "\n".join(lines)


def _percent(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def resummarise(names: list[str], output: str | None = None) -> dict:
    """Recomputes the summary of ``results/<name>.json`` from its runs (e.g. after a column
    was added) and rewrites the file. Several names are merged into one result, seeds
    of each arm concatenated, written to ``results/<output>.json``: runs with different
    seeds on the same setting (the same dataset, steps, arms and configuration, checked
    here) pool into one paired comparison."""
    import json

    results = [json.loads((_common.RESULTS / f"{name}.json").read_text()) for name in names]
    result = results[0]
    if len(results) > 1:
        if output is None:
            raise SystemExit("--summarise with several names needs --output for the merged file")
        for name, other in zip(names[1:], results[1:]):
            for field in ("dataset", "num_train_examples", "steps", "arms", "config"):
                if other[field] != result[field]:
                    raise SystemExit(
                        f"--summarise: {name}.json differs from {names[0]}.json in {field!r}; "
                        "only runs of the same setting can be merged"
                    )
        seeds = [seed for other in results for seed in other["seeds"]]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"--summarise: the files repeat seeds ({seeds})")
        result = {
            **result,
            "seeds": seeds,
            "runs": {
                arm: [run for other in results for run in other["runs"][arm]]
                for arm in result["runs"]
            },
            "seconds": sum(other["seconds"] for other in results),
            "merged_from": [
                {
                    "name": name,
                    "command": other["command"],
                    "environment": other["environment"],
                    "load_average_after": other["load_average_after"],
                }
                for name, other in zip(names, results)
            ],
        }
    result["summary"] = summarise(result["runs"], result["steps"])
    path = _common.RESULTS / f"{output or names[0]}.json"
    _common.write_json(path, result)
    print(table(result["summary"]))
    print(f"written to {path}")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data-dir", default=str(_common.DEFAULT_DATA_DIR))
    parser.add_argument(
        "--dataset",
        choices=("fashion_mnist", "mnist"),
        default="fashion_mnist",
        help="the full run's dataset (--quick always runs digits)",
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--arms", nargs="+", choices=ARM_NAMES, default=list(ARM_NAMES))
    parser.add_argument(
        "--output", default=None, help="results file name (default refresh / refresh_quick)"
    )
    parser.add_argument(
        "--summarise",
        metavar="NAME",
        nargs="+",
        help="recompute the summary of results/NAME.json from its runs; several names are "
        "merged into results/OUTPUT.json (--output); nothing is trained",
    )
    args = parser.parse_args(argv)
    if args.summarise:
        return resummarise(args.summarise, args.output)

    from magnet_jax.config import TrainConfig
    from magnet_jax.data import load_dataset

    environment_before = _common.environment()
    _common.enable_compilation_cache()
    if args.quick:
        base = {"dataset": "digits", "steps": args.steps or 300, "refresh_every": 50}
        seeds = args.seeds or [0, 1]
        dataset = load_dataset("digits")
    else:
        base = {"dataset": args.dataset, "data_dir": args.data_dir, "steps": args.steps or 3000}
        seeds = args.seeds or [0, 1, 2]
        dataset = load_dataset(args.dataset, args.data_dir)
    if warning := _common.busy_warning():
        log(warning)
    base.update(num_devices=1, workdir="unused")
    batch = TrainConfig(**base).batch_size
    overrides = arms(base.get("refresh_every") or -(-int(dataset.num_train) // batch))
    configs = {arm: TrainConfig(**base, **overrides[arm]) for arm in args.arms}
    started = time.perf_counter()
    for arm in args.arms:
        warm_up(configs[arm], dataset)
    log(f"warm-up (compilation) {time.perf_counter() - started:.0f} s")
    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for seed in seeds:
        for arm in args.arms:
            result = one_run(dataclasses.replace(configs[arm], seed=seed), dataset)
            runs[arm].append(result)
            log(
                f"{arm} seed {seed}: kNC {result['knc_error']:.4f} 1-NN "
                f"{result['knn1_error']:.4f}, train {result['train_seconds']:.0f} s, "
                f"refreshes {result['refresh_seconds']:.1f} s "
                f"({result['refresh_fraction']:.1%}), load {result['load_average_at_start'][0]:.2f}"
            )
    summary = summarise(runs, base["steps"])
    config = TrainConfig(**base)
    result = {
        "benchmark": "refresh",
        "quick": args.quick,
        "dataset": config.dataset,
        "num_train_examples": int(dataset.num_train),
        "steps": config.steps,
        "seeds": seeds,
        "arms": {arm: overrides[arm] for arm in args.arms},
        "config": {k: v for k, v in config.to_dict().items() if k not in ("workdir", "seed")},
        "summary": summary,
        "runs": runs,
        "seconds": time.perf_counter() - started,
        "command": "python benchmarks/refresh.py" + (" " + " ".join(argv) if argv else ""),
        "environment": environment_before,
        "load_average_after": list(os.getloadavg()),
    }
    name = args.output or ("refresh_quick" if args.quick else "refresh")
    path = _common.RESULTS / f"{name}.json"
    _common.write_json(path, result)
    print(table(summary))
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
