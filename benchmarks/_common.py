"""Shared machinery of benchmarks/convergence.py and benchmarks/hierarchy.py.

A run here is a learning curve: the library's own prepared run and loop
(:func:`magnet_jax.training.prepare` and :func:`magnet_jax.training.learning_curve`: the
refreshes, steps and evaluations of ``train``), evaluated at fixed iterations and writing
nothing to disk (no checkpoints), so a benchmark of dozens of runs stays cheap. Two things
are the benchmarks' own:

- the evaluators (:func:`evaluators`): kNN at several k (compare each method with its
  best evaluator, k chosen on validation), the method's own (kNC for magnet, the softmax
  classifier's error), σ² and cluster purity for magnet, and the fine-label Error@k when
  the dataset has fine labels;
- a run can start from given trunk parameters (warm start, the paper's regime).

Hyperparameters are chosen on a validation split of the training set
(:func:`magnet_jax.data.split_validation`), never on the test set.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
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


def evaluators(method, ks: Sequence[int] = KS) -> tuple:
    """What every benchmark scores at each evaluation (library evaluators): the kNN error
    for each k of ``ks`` (``knn{k}_error``), the method's own (kNC for Magnet, the
    classifier's error for softmax), σ² and the clusters' fine-label purity (Magnet), and
    the fine-label errors on coarse-label datasets."""
    from magnet_jax import evaluators as ev
    from magnet_jax.methods import magnet

    extra = (magnet.RunningVariance(), magnet.ClusterFinePurity()) if method.has_refresh else ()
    return (
        *(ev.KnnError(k=k, name=f"knn{k}_error") for k in ks),
        *method.evaluators(),
        *extra,
        ev.FineLabelErrors(ks=tuple(ks)),
        UnseenClassRetrieval(),
    )


@dataclasses.dataclass(frozen=True)
class UnseenClassRetrieval:
    """Under a class-disjoint split (nothing otherwise): Recall@k, MAP@R and R-precision
    of the test set as its own gallery, and ``recall_at_1_error`` = 1 − Recall@1, the
    error the zero-shot regime's curves and speed-ups use."""

    def __call__(self, context):
        from magnet_jax import evaluation

        if context.test_classes_seen:
            return
        dataset = context.dataset
        metrics = evaluation.retrieval_metrics(
            context.test_embeddings,
            np.asarray(dataset.y_test),
            ks=dataset.recall_ks,
            clustering=False,  # NMI's k-means over hundreds of classes at every evaluation
        )
        for name, value in metrics.items():
            yield name, float(value)
        yield "recall_at_1_error", 1.0 - float(metrics["recall_at_1"])


def evaluate(run, params, method_state, ks: Sequence[int] = KS) -> dict[str, float]:
    """Test-set errors of the embedding ``params`` gives (see :func:`evaluators`)."""
    from magnet_jax import training

    return training.evaluate(run, params, method_state, evaluators(run.method, ks))


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
    started = time.perf_counter()
    curve = training.learning_curve(
        run, eval_steps, state=state, evaluators=evaluators(run.method, ks)
    )
    return {
        "iterations": curve["iterations"],
        "metrics": curve["metrics"],
        "seconds": time.perf_counter() - started,
        "final_loss": curve["final_loss"],
        "init": init_note,
        "params": curve["state"].params,
    }


# --------------------------------------------------------------------------------------
# The paper's regime: a pretrained backbone on the emoji set.
# --------------------------------------------------------------------------------------

# Magnet's k-means needs at least K training images in every class: the emoji
# subcategories with fewer images than this (7 of 95, each of at most 3 emoji, 68 images)
# are left out of the emoji regimes.
EMOJI_MIN_IMAGES = 20
# CPU: 64 px, all 9 of EfficientNet-Lite0's stages (stem, 7 block groups, 1x1 head
# convolution) frozen and their output cached once per image: the linear embedding layer
# (and softmax's classifier, ProxyNCA's proxies) train on the pretrained features. On the
# shared 2-core machine an evaluation or refresh through a trainable head convolution cost
# 10-30 s each, too much for 3 regimes x 5 methods x 3 seeds (the README says so).
# GPU (--full-resolution): 224 px, every stage trains (backbone lr x0.1), no cache.
CPU_BACKBONE = dict(
    backbone="efficientnet_lite0",
    pretrained=True,
    image_size=64,
    freeze_stages=9,
    cache_prefix=True,
)
GPU_BACKBONE = dict(
    backbone="efficientnet_lite0",
    pretrained=True,
    image_size=224,
    freeze_stages=0,
    cache_prefix=False,
    backbone_lr_multiplier=0.1,
)


def backbone_settings(full_resolution: bool) -> dict:
    """The TrainConfig fields of the emoji regimes' backbone (see CPU_BACKBONE)."""
    return dict(GPU_BACKBONE if full_resolution else CPU_BACKBONE)


def keep_classes(dataset, classes, name: str):
    """The examples of ``classes`` only, relabelled ``0..len(classes)-1`` in that order;
    fine labels kept as they are."""
    from magnet_jax.data import Dataset

    classes = np.asarray(classes)
    remap = np.full(dataset.num_classes, -1, np.int32)
    remap[classes] = np.arange(len(classes), dtype=np.int32)
    train, test = np.isin(dataset.y_train, classes), np.isin(dataset.y_test, classes)
    fine = dataset.fine_train is not None
    return Dataset(
        name=name,
        x_train=dataset.x_train[train],
        y_train=remap[dataset.y_train[train]],
        x_test=dataset.x_test[test],
        y_test=remap[dataset.y_test[test]],
        class_names=tuple(dataset.class_names[c] for c in classes),
        fine_train=dataset.fine_train[train] if fine else None,
        fine_test=dataset.fine_test[test] if fine else None,
        fine_class_names=dataset.fine_class_names,
        recall_ks=dataset.recall_ks,
    )


def load_emoji(
    level: str,
    split: str,
    data_dir: str | None,
    *,
    min_images: int = EMOJI_MIN_IMAGES,
):
    """The emoji set at ``level`` (``subcategory``, ``category`` or ``emoji``) under the
    protocol ``split`` (``default``: 20% of every class's images to test, seed 0;
    ``classes``: the set's own class-disjoint split), without the classes of fewer than
    ``min_images`` images (train + test; 0 keeps all). The emoji stay the fine labels."""
    from magnet_jax.data import load_dataset

    dataset = load_dataset("emoji", data_dir, label_level=level, split=split)
    counts = np.bincount(
        np.concatenate([dataset.y_train, dataset.y_test]), minlength=dataset.num_classes
    )
    keep = np.flatnonzero(counts >= min_images)
    if len(keep) == dataset.num_classes:
        return dataset
    return keep_classes(dataset, keep, f"{dataset.name}/min{min_images}")


class PrefixMemo:
    """A benchmark's many runs share one pretrained backbone, so the frozen prefix of an
    image is the same in every run: this computes it once per distinct image (rows keyed
    by their bytes) instead of once per run, and checks that the frozen parameters are
    the same as when it was first computed. Install with :meth:`install`.

    ``path`` (default: the environment variable MAGNET_JAX_PREFIX_CACHE, else none) keeps
    the rows in an .npz file too, so the processes of a benchmark split by method share
    them; the file records the settings and a digest of the frozen parameters it holds
    rows for, and is ignored when either differs."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.rows: dict[bytes, np.ndarray] = {}
        self.key = None
        self.frozen = None
        self.original = None
        path = path or os.environ.get("MAGNET_JAX_PREFIX_CACHE")
        self.path = Path(path) if path else None

    @staticmethod
    def _frozen_digest(key, frozen: dict) -> str:
        import hashlib

        h = hashlib.blake2b(repr(key).encode(), digest_size=16)
        for name in sorted(frozen, key=repr):
            h.update(repr(name).encode())
            h.update(np.ascontiguousarray(frozen[name]).tobytes())
        return h.hexdigest()

    def _load(self, digest: str) -> None:
        if self.path is None or not self.path.is_file():
            return
        with np.load(self.path, allow_pickle=False) as f:
            if str(f["frozen_digest"]) != digest:
                return
            for d, row in zip(f["digests"], f["rows"]):
                self.rows.setdefault(d.tobytes(), row)

    def _save(self, digest: str) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp.npz")
        digests = np.array([np.frombuffer(d, np.uint8) for d in self.rows])
        np.savez(
            tmp, frozen_digest=digest, digests=digests, rows=np.stack(list(self.rows.values()))
        )
        os.replace(tmp, self.path)

    @staticmethod
    def _digest(row: np.ndarray) -> bytes:
        import hashlib

        return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest()

    def __call__(self, config, setup_, graphdef, params, x_train, x_test):
        from magnet_jax.backbones import trainer

        key = (config.backbone, config.freeze_stages, config.image_size, config.dtype)
        frozen = trainer._prefix_params(
            dataclasses.replace(setup_, prefix_stages=config.freeze_stages), graphdef, params
        )
        same = (
            self.key == key
            and frozen.keys() == self.frozen.keys()
            and all(np.array_equal(frozen[k], self.frozen[k]) for k in frozen)
        )
        digest = self._frozen_digest(key, frozen)
        if not same:
            self.rows, self.key, self.frozen = {}, key, frozen
        x = np.concatenate([np.asarray(x_train), np.asarray(x_test)])
        digests = [self._digest(row) for row in x]
        if any(d not in self.rows for d in digests):
            self._load(digest)
        missing = sorted({i for i, d in enumerate(digests) if d not in self.rows})
        if missing:
            computed, _ = self.original(config, setup_, graphdef, params, x[missing], x[:1])
            for i, row in zip(missing, computed):
                self.rows[digests[i]] = row
            self._save(digest)
        setup_.prefix_stages = config.freeze_stages
        setup_.prefix_params = frozen
        out = np.stack([self.rows[d] for d in digests])
        return out[: len(x_train)], out[len(x_train) :]

    def uninstall(self) -> None:
        """Puts the library's own cache_prefix back (a no-op when not installed)."""
        from magnet_jax import training

        if self.original is not None and training.backbone_trainer.cache_prefix is self:
            training.backbone_trainer.cache_prefix = self.original

    def install(self) -> PrefixMemo:
        from magnet_jax import training

        if self.original is None:
            self.original = training.backbone_trainer.cache_prefix
            training.backbone_trainer.cache_prefix = self
        return self


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


# The final numbers of the emoji regimes besides each method's own evaluator: kNN for all,
# the hierarchy view, unseen-class retrieval, and the index's fine-label purity.
EMOJI_FINAL_METRICS = (
    "knn1_error",
    "knn5_error",
    "fine_error_at_1",
    "fine_error_at_5",
    "recall_at_1",
    "recall_at_2",
    "recall_at_4",
    "recall_at_8",
    "mean_average_precision_at_r",
)


def emoji_summary(methods: dict) -> dict:
    """From the stored per-seed ``all_metrics``: each metric of EMOJI_FINAL_METRICS at
    the final iteration (mean, std, per seed), and magnet's cluster fine purity at every
    evaluation (mean over seeds; the index is refreshed at each)."""
    final, purity = {}, {}
    for name, method in methods.items():
        seeds = [s for s in method["seeds"] if "all_metrics" in s]
        if not seeds:
            continue
        row = {}
        for metric in EMOJI_FINAL_METRICS:
            values = [s["all_metrics"].get(metric, [None])[-1] for s in seeds]
            if all(v is not None for v in values):
                row[metric] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values)),
                    "per_seed": values,
                }
        final[name] = row
        curves = [s["all_metrics"].get("cluster_fine_purity") for s in seeds]
        if all(c is not None for c in curves):
            purity[name] = {
                "iterations": seeds[0]["iterations"],
                "mean": np.mean(curves, axis=0).tolist(),
            }
    return {"final_other": final, "cluster_fine_purity": purity}


def format_speedup(s: dict) -> str:
    if s["speedup"] is None:
        return f"not reached (target {100 * s['target_error']:.2f}% at {s['reference_iterations']:.0f} it.)"
    return (
        f"{s['speedup']:.2f}x (target {100 * s['target_error']:.2f}%: reference {s['reference_iterations']:.0f} it., "
        f"magnet {s['candidate_iterations']:.0f} it.)"
    )


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, lowest and highest of repeated measurements (e.g. per-round ratios)."""
    return {
        "median": float(np.median(values)),
        "low": float(np.min(values)),
        "high": float(np.max(values)),
    }


def environment(**versions: str) -> dict:
    """What a result depends on besides the code: commit, machine, load, devices,
    versions (``versions`` adds more, e.g. ``sklearn=sklearn.__version__``)."""
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
        "numpy": np.__version__,
        **versions,
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def memory_bandwidth(num_bytes: int = 2**30, repeats: int = 5) -> float:
    """Bytes per second the default JAX device moves in a jitted elementwise pass
    (``x + 1`` over ``num_bytes`` of float32, counted as read + written; best of
    ``repeats`` warm calls): the denominator of a memory-traffic floor."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros(num_bytes // 4, jnp.float32)
    bump = jax.jit(lambda a: a + 1)
    bump(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        bump(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * (num_bytes // 4) * 4 / best


# A machine is busy when its 1-minute load average exceeds this share of its cores
# (1.5 on 2 cores): multi-threaded references (scikit-learn, faiss) then slow down far
# more than one jitted call, and timing ratios stop meaning anything.
BUSY_LOAD_PER_CORE = 0.75


def busy_warning() -> str | None:
    """A warning to print and record when the machine is busy, else None."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= BUSY_LOAD_PER_CORE * cores:
        return None
    return (
        f"machine busy: load average {load:.2f} on {cores} cores (> "
        f"{BUSY_LOAD_PER_CORE * cores:.2f}); timings and their ratios are not reliable"
    )


def merge_parts(paths: Sequence[Path]) -> dict:
    """One results dict from the files of a benchmark run split by method (``--methods``,
    one process each): the methods of all, the rest from the first; every part's command,
    time and environment kept under ``parts``. The parts must agree on the protocol."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    same = ("regime", "dataset", "steps", "eval_every", "seeds", "batch_size")
    merged = {k: v for k, v in first.items() if k not in ("command", "seconds")}
    merged["methods"] = {}
    for path, part in zip(paths, parts):
        for key in same:
            if part.get(key) != first.get(key):
                raise ValueError(
                    f"{path}: {key} = {part.get(key)!r}, but {paths[0]} has {first.get(key)!r}"
                )
        overlap = set(part["methods"]) & set(merged["methods"])
        if overlap:
            raise ValueError(f"{path}: methods {sorted(overlap)} are in an earlier part too")
        merged["methods"].update(part["methods"])
        for key in ("grids",):
            if key in part:
                merged[key] = {**merged.get(key, {}), **part[key]}
    merged["parts"] = [
        {
            "file": str(Path(p).name),
            "command": part["command"],
            "seconds": part["seconds"],
            "methods": list(part["methods"]),
            "environment": part["environment"],
        }
        for p, part in zip(paths, parts)
    ]
    merged["command"] = " && ".join(part["command"] for part in parts)
    merged["seconds"] = round(sum(part["seconds"] for part in parts), 1)
    return merged


def run_with_memo(main, argv) -> int:
    """``main(argv, memo)`` with a :class:`PrefixMemo` that the emoji runs install; the
    memo is undone on the way out, also on an error."""
    memo = PrefixMemo()
    try:
        return main(argv, memo)
    finally:
        memo.uninstall()


def select_methods(parser, methods: list, names: Sequence[str] | None) -> list:
    """``--methods``: the methods named, in their own order; a name that is not one of
    them is a parser error that lists the choices."""
    if not names:
        return methods
    unknown = sorted(set(names) - {m.name for m in methods})
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {[m.name for m in methods]}")
    return [m for m in methods if m.name in names]


def evaluation_steps(steps: int, eval_every: int) -> list[int]:
    """0, eval_every, 2·eval_every, … and always ``steps`` itself."""
    points = list(range(0, steps + 1, eval_every))
    return points if points[-1] == steps else [*points, steps]


def emoji_backbone(full_resolution: bool, random_init: bool, memo: PrefixMemo) -> dict:
    """The emoji runs' backbone settings (:func:`backbone_settings`; ``random_init``: no
    ImageNet weights); installs ``memo`` when the frozen prefix is cached."""
    backbone = backbone_settings(full_resolution)
    if random_init:
        backbone["pretrained"] = False
    if backbone["cache_prefix"]:
        memo.install()
    return backbone


def check_summary(results: dict, recomputed: dict, stored: dict, print_summary) -> int:
    """``--check``: prints the recomputed summary; 0 when it equals the stored one."""
    same = json.dumps(recomputed, sort_keys=True) == json.dumps(stored, sort_keys=True)
    print_summary(results, recomputed)
    print(
        f"\nstored summary {'equals' if same else 'DIFFERS FROM'} the one recomputed from the curves"
    )
    return 0 if same else 1


def merge_command(
    script: str, paths, output, *, summary_of, plot, print_summary, stale=lambda key: False
) -> int:
    """``--merge``: one results file (and its picture) from a run's per-method files
    (:func:`merge_parts`), its summary recomputed; ``stale(key)`` names summary keys of
    the first part that the merged methods replace. Errors name the file; exit status 2."""
    if output is None:
        print(f"{script}: error: --merge needs --output", file=sys.stderr)
        return 2
    try:
        results = merge_parts(paths)
    except (OSError, ValueError, KeyError) as error:
        print(f"{script}: error: --merge: {error}", file=sys.stderr)
        return 2
    for key in [key for key in results if stale(key)]:
        del results[key]
    results.update(summary_of(results))
    output = Path(output)
    write_json(output, results)
    plot(results, output.with_suffix(".png"))
    print_summary(results, summary_of(json.loads(output.read_text())))
    log(f"merged {len(paths)} files into {output}")
    return 0


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
