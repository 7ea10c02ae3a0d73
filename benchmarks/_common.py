"""Shared machinery of benchmarks/convergence.py and benchmarks/hierarchy.py.

A run here is a learning curve: the library's own prepared run
(:func:`magnet_jax.training.prepare`: model, sharded jitted steps, cluster refresh) driven
by a small host loop that evaluates at fixed iterations and writes nothing to disk (no
checkpoints), so a benchmark of dozens of runs stays cheap. The loop mirrors
:func:`magnet_jax.training.train` (refresh once per ``refresh_every`` steps before the
step, evaluate, then run the steps up to the next event as one jitted call); two things
differ, both because a benchmark needs them:

- every evaluation scores kNN at several k from one nearest-neighbour search (to
  compare each method with its best evaluator, k chosen on validation), plus kNC (magnet,
  centroids recomputed from the current embeddings with the stored assignments, as
  ``training.evaluate`` does), the softmax classifier's own error, and the fine-label
  Error@k when the dataset has fine labels;
- a run can start from given trunk parameters (warm start, the paper's regime).

Hyperparameters are chosen on a validation split of the training set
(:func:`magnet_jax.data.split_validation`), never on the test set.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# MAGNET_JAX_RESULTS redirects the output (the tests use it so CI leaves the repo clean).
RESULTS = Path(os.environ.get("MAGNET_JAX_RESULTS", Path(__file__).resolve().parent / "results"))
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets"
KS = (1, 5)  # kNN evaluators scored at every evaluation


def enable_compilation_cache(path: str | None = None) -> None:
    """Persistent XLA compilation cache: every run builds fresh jitted closures, so
    without it each run recompiles programs identical to the previous run's (seeds share
    them). Cuts a sweep's compile time, changes no number."""
    import jax

    path = path or os.environ.get("MAGNET_JAX_BENCH_CACHE", "/tmp/magnet_jax_bench_xla_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")


def log(message: str) -> None:
    print(f"[{now()}] {message}", flush=True)


# --------------------------------------------------------------------------------------
# One learning curve.
# --------------------------------------------------------------------------------------


def _vote(neighbour_labels: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """Majority vote of the k nearest, ties to the tied class whose member ranks first
    (the rule of ``magnet_jax.evaluation.knn_predict``)."""
    labels = neighbour_labels[:, :k]
    rows = np.arange(len(labels))[:, None]
    votes = np.zeros((len(labels), num_classes), np.int64)
    np.add.at(votes, (np.broadcast_to(rows, labels.shape), labels), 1)
    first = np.full((len(labels), num_classes), k, np.int64)
    for rank in range(k - 1, -1, -1):  # last write wins: the earliest rank
        first[rows[:, 0], labels[:, rank]] = rank
    return np.argmax(votes * (k + 1) + (k - first), axis=1)


def evaluate(run, params, index, ks: Sequence[int] = KS) -> dict[str, float]:
    """Test-set errors of the embedding ``params`` gives (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from magnet_jax import evaluation
    from magnet_jax import index as index_lib

    dataset = run.dataset
    train_emb = run.steps.embed(params, run.data.x)
    test_emb = run.steps.embed(params, run.x_test)
    y_train, y_test = np.asarray(dataset.y_train), np.asarray(dataset.y_test)
    _, neighbours = evaluation.nearest_neighbours(test_emb, train_emb, k=max(ks))
    neighbours = np.asarray(neighbours)
    out: dict[str, float] = {}
    for k in ks:
        predicted = _vote(y_train[neighbours], k, dataset.num_classes)
        out[f"knn{k}_error"] = float(np.mean(predicted != y_test))
    if index is not None:
        fresh = index_lib.recompute_centroids(index, train_emb)
        predicted = evaluation.knc_predict(
            test_emb, fresh, num_nearest_clusters=run.config.num_nearest_clusters
        )
        out["knc_error"] = float(np.mean(np.asarray(predicted) != y_test))
        out["sigma2"] = float(index.variance)
    if run.objective.classifier:
        model = nnx.merge(run.graphdef, nnx.State(params))
        logits = jax.jit(model.logits)(test_emb)
        out["classifier_error"] = float(np.mean(np.asarray(jnp.argmax(logits, -1)) != y_test))
    if dataset.fine_test is not None:
        fine_train, fine_test = np.asarray(dataset.fine_train), np.asarray(dataset.fine_test)
        hits = fine_train[neighbours] == fine_test[:, None]
        for k in ks:
            out[f"fine_error_at_{k}"] = float(1.0 - np.mean(np.any(hits[:, :k], axis=1)))
        if index is not None:
            out["cluster_fine_purity"] = cluster_purity(np.asarray(index.cluster_ids), fine_train)
    return out


def subsample_train(dataset, size: int | None, seed: int = 1):
    """A stratified subset of ``size`` training examples (by fine label when there is one);
    the test set is untouched. ``size`` None or >= N: the dataset itself."""
    from magnet_jax.data import Dataset, stratified_split

    if size is None or size >= dataset.num_train:
        return dataset
    strata = dataset.fine_train if dataset.fine_train is not None else dataset.y_train
    _, keep = stratified_split(np.asarray(strata), size / dataset.num_train, seed)
    fine = dataset.fine_train is not None
    return Dataset(
        name=f"{dataset.name}[train {len(keep)}]",
        x_train=dataset.x_train[keep],
        y_train=dataset.y_train[keep],
        x_test=dataset.x_test,
        y_test=dataset.y_test,
        class_names=dataset.class_names,
        fine_train=dataset.fine_train[keep] if fine else None,
        fine_test=dataset.fine_test,
        fine_class_names=dataset.fine_class_names,
    )


def cluster_purity(cluster_ids: np.ndarray, fine_labels: np.ndarray) -> float:
    """Share of training examples whose cluster's majority fine label is their own."""
    num_fine = int(fine_labels.max()) + 1
    table = np.zeros((int(cluster_ids.max()) + 1, num_fine), np.int64)
    np.add.at(table, (cluster_ids, fine_labels), 1)
    return float(table.max(axis=1).sum() / len(fine_labels))


def trunk_params(params: dict) -> dict:
    """The embedding network's parameters (no classifier head, no proxies)."""
    return params["trunk"]


def learning_curve(
    config,
    dataset,
    eval_steps: Sequence[int],
    *,
    init_trunk: dict | None = None,
    ks: Sequence[int] = KS,
) -> dict:
    """Trains ``config`` on ``dataset`` and evaluates at ``eval_steps`` (0 allowed).

    Returns {"iterations": [...], "metrics": {name: [...]}, "seconds", "final_loss",
    "init": description of the warm start}. ``init_trunk`` (a trunk parameter tree)
    replaces the matching trunk parameters before the first step; the optimizer state is
    initialised afresh for them.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from magnet_jax import training
    from magnet_jax.warm_start import graft_params

    run = training.prepare(config, dataset)
    state = run.initial_state
    init_note = "random"
    if init_trunk is not None:
        # Fresh device copies: the train step donates its state, so arrays shared with
        # init_trunk would be deleted (or overwritten) by the first run.
        init_trunk = jax.tree.map(lambda a: jnp.array(np.asarray(a), copy=True), init_trunk)
        params = jax.tree.map(lambda a: a, state.params)
        params["trunk"], copied, skipped = graft_params(params["trunk"], init_trunk)
        init_note = f"warm: {len(copied)}/{len(copied) + len(skipped)} trunk arrays copied"
        state = training.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=run.optimizer.init(params),
            rng=state.rng,
        )
        state = jax.device_put(state, NamedSharding(run.mesh, P()))
    eval_steps = sorted(set(int(s) for s in eval_steps))
    steps_total = max(eval_steps)
    refresh_every = run.refresh_every if run.objective.uses_index else None
    index = None
    iterations, records = [], []
    started = time.perf_counter()
    step, loss = 0, float("nan")
    while True:
        if refresh_every and step < steps_total and step % refresh_every == 0:
            index = training.refresh(run, state, index, step)
        if step in eval_steps:
            if index is None and run.objective.uses_index:  # eval at the very end only
                index = training.refresh(run, state, index, step)
            iterations.append(step)
            records.append(evaluate(run, state.params, index, ks))
        if step >= steps_total:
            break
        events = [s for s in eval_steps if s > step]
        if refresh_every:
            events.append((step // refresh_every + 1) * refresh_every)
        target = min(min(events), steps_total)
        if run.dataset.x_train.ndim > 2:
            # One jitted step per call for image models: on the CPU, run_steps' fori_loop
            # is ~13x slower per step than single train_step calls with the convnet
            # (measured at 528625a, Fashion-MNIST, batch 48: 640-750 vs 45-57 ms/step,
            # whatever the training-set size); the same steps, the same numbers.
            for _ in range(target - step):
                state, index, step_loss = run.steps.train_step(state, index, run.data)
            mean_loss = step_loss
        else:
            state, index, mean_loss = run.steps.run_steps(
                state, index, run.data, jnp.asarray(target - step, jnp.int32)
            )
        loss = float(mean_loss)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"{config.loss}: loss {loss} between steps {step} and {target} (lr {config.lr})"
            )
        step = target
    metrics = {name: [r.get(name) for r in records] for name in records[-1]}
    return {
        "iterations": iterations,
        "metrics": metrics,
        "seconds": time.perf_counter() - started,
        "final_loss": loss,
        "init": init_note,
        "params": state.params,
    }


# --------------------------------------------------------------------------------------
# Methods, sweeps, selection.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """One compared method: its fixed settings and its sweep (lists of overrides)."""

    name: str
    fixed: dict
    grid: list  # list of dicts of TrainConfig overrides, tried on validation

    def primary_metrics(self) -> list[str]:
        """The errors this method may be scored by (its best one is chosen on validation)."""
        if self.fixed["loss"] == "magnet":
            return ["knc_error"]
        if self.fixed["loss"] == "softmax":
            return [f"knn{k}_error" for k in KS] + ["classifier_error"]
        return [f"knn{k}_error" for k in KS]


def make_config(base: dict, method: Method, overrides: dict, seed: int):
    from magnet_jax.config import TrainConfig

    values = {**base, **method.fixed, **overrides, "seed": seed, "workdir": "/nonexistent-unused"}
    return TrainConfig(**values)


def sweep(
    base: dict,
    method: Method,
    val_dataset,
    steps: int,
    seed: int = 0,
    score: str | None = None,
    init_trunk: dict | None = None,
) -> dict:
    """Tries every grid point on the validation split; returns the winner and all scores.

    Each point is scored by the lowest final validation error over the method's
    evaluators (or by ``score`` when given); the evaluator that scored it is kept.
    """
    trials = []
    for overrides in method.grid:
        config = make_config(base, method, {**overrides, "steps": steps}, seed)
        try:
            curve = learning_curve(config, val_dataset, [steps], init_trunk=init_trunk)
            every = {m: v[-1] for m, v in curve["metrics"].items()}
            finals = {m: every[m] for m in (method.primary_metrics() if score is None else [score])}
            metric = min(finals, key=finals.get)
            trials.append(
                {
                    "overrides": overrides,
                    "validation_errors": every,
                    "metric": metric,
                    "error": finals[metric],
                    "seconds": round(curve["seconds"], 1),
                }
            )
        except FloatingPointError as error:
            trials.append({"overrides": overrides, "error": None, "diverged": str(error)})
        t = trials[-1]
        log(f"  sweep {method.name} {overrides}: {t.get('metric')} = {t['error']}")
    finite = [t for t in trials if t["error"] is not None]
    if not finite:
        raise RuntimeError(f"every sweep point of {method.name} diverged")
    best = min(finite, key=lambda t: t["error"])
    return {
        "chosen": best["overrides"],
        "metric": best["metric"],
        "trials": trials,
        "chosen_validation": best["validation_errors"],
    }


# --------------------------------------------------------------------------------------
# Curves: speed-up and final errors, recomputable from a results JSON.
# --------------------------------------------------------------------------------------


def first_crossing(
    iterations: Sequence[float], errors: Sequence[float], target: float
) -> float | None:
    """The first iteration at which the piecewise-linear curve reaches ``target`` (<=),
    linearly interpolated between evaluations; None when it never does."""
    its, errs = np.asarray(iterations, float), np.asarray(errors, float)
    for i, (it, err) in enumerate(zip(its, errs)):
        if err <= target:
            if i == 0 or errs[i - 1] == err:
                return float(it)
            fraction = (errs[i - 1] - target) / (errs[i - 1] - err)
            return float(its[i - 1] + fraction * (it - its[i - 1]))
    return None


def speedup(iterations, reference_errors, candidate_errors) -> dict:
    """Iterations the reference needs to reach its best error ÷ iterations the candidate
    needs to reach that same error (interpolated). ``speedup`` None: not reached."""
    reference_errors = np.asarray(reference_errors, float)
    best = float(reference_errors.min())
    ref_its = first_crossing(iterations, reference_errors, best)
    cand_its = first_crossing(iterations, candidate_errors, best)
    value = None
    if cand_its is not None:
        value = float("inf") if cand_its == 0 else ref_its / cand_its
    return {
        "target_error": best,
        "reference_iterations": ref_its,
        "candidate_iterations": cand_its,
        "speedup": value,
    }


def mean_curve(seeds: list[dict]) -> tuple[list, list]:
    its = seeds[0]["iterations"]
    for s in seeds:
        if s["iterations"] != its:
            raise ValueError("seeds evaluated at different iterations")
    return its, np.mean([s["test_error"] for s in seeds], axis=0).tolist()


def summarise(methods: dict, reference: str = "triplet", candidate: str = "magnet") -> dict:
    """Speed-ups and final errors from the stored per-seed curves ({method: {"seeds": [
    {"seed", "iterations", "test_error"}]}}). Used both to print and to check a JSON."""
    out: dict[str, Any] = {"final_error": {}}
    for name, method in methods.items():
        its, mean = mean_curve(method["seeds"])
        finals = [s["test_error"][-1] for s in method["seeds"]]
        out["final_error"][name] = {
            "mean": mean[-1],
            "std": float(np.std(finals)),
            "per_seed": finals,
            "iterations": its[-1],
        }
    if reference in methods and candidate in methods:
        ref, cand = methods[reference]["seeds"], methods[candidate]["seeds"]
        its, ref_mean = mean_curve(ref)
        _, cand_mean = mean_curve(cand)
        per_seed = []
        cand_by_seed = {s["seed"]: s for s in cand}
        for r in ref:
            c = cand_by_seed.get(r["seed"])
            if c is not None:
                per_seed.append(
                    {
                        "seed": r["seed"],
                        **speedup(r["iterations"], r["test_error"], c["test_error"]),
                    }
                )
        out[f"speedup_vs_{reference}"] = {
            "mean": speedup(its, ref_mean, cand_mean),
            "per_seed": per_seed,
        }
        ref_final, cand_final = ref_mean[-1], cand_mean[-1]
        out[f"relative_error_reduction_vs_{reference}"] = (
            (ref_final - cand_final) / ref_final if ref_final > 0 else None
        )
    return out


def format_speedup(s: dict) -> str:
    if s["speedup"] is None:
        return f"not reached (target {100 * s['target_error']:.2f}% at {s['reference_iterations']:.0f} it.)"
    return (
        f"{s['speedup']:.2f}x (target {100 * s['target_error']:.2f}%: reference {s['reference_iterations']:.0f} it., "
        f"magnet {s['candidate_iterations']:.0f} it.)"
    )


def environment() -> dict:
    import subprocess

    import jax

    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "magnet_jax"],
                cwd=repo,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = None, None
    return {
        "git_commit": commit,
        "magnet_jax_modified": dirty,
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
