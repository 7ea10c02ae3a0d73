"""Per-class k-means: magnet_jax.kmeans_per_class against scikit-learn and faiss loops.

The reference refresh of the Magnet Loss cluster index runs scikit-learn's ``KMeans``
once per class; pytorch-metric-learning clusters with faiss. This script times a loop
over classes of each against ``kmeans_per_class`` (all classes in one call; on the CPU,
groups of classes that fit in a core's cache, run side by side on the cores) on three
workloads and compares the per-class inertia:

  (a) 10 classes, 60,000 x 64, k=8        (MNIST-like)
  (b) 1,000 classes, 100,000 x 128, k=8   (many mid-size classes)
  (c) 10,000 classes of 2-12 examples, 128-d, k=2  (Stanford-Online-Products-like)

and two sizes for a GPU (``--cases de``):

  (d) 1,000 classes x 1,000, 128-d, k=8           (1M points)
  (e) 10,000 classes of 2-12 examples, 512-d, k=2

Data: a Gaussian mixture per class (1-4 modes, fixed seed). Ours and scikit-learn use
k-means++ initialisation, at most ``--max-iterations`` (20) Lloyd iterations, tol=1e-4
(the same relative-shift criterion), one initialisation (plus rows with restarts for
ours); faiss (``faiss.Kmeans``, random initialisation, exactly that many iterations, one
run, all threads) is the faiss column, its inertia recomputed from its final centroids;
without faiss installed (a GPU machine, say) the column is left empty. Ours refines Lloyd's result with
Hartigan moves by default (``refine_steps=5``) and, for k=2, solves every class of at
most 12 examples exactly by enumeration (``exhaustive_max_points=12``, the "exact"
column). Case (c) adds a row with the refinement but without the exact step, and rows
with neither (plain Lloyd, like scikit-learn), where ours and scikit-learn have the
same per-class distribution of local minima; cases (a) and (b) add a plain-Lloyd row
too, ours at scikit-learn's inertia.

Run (full, a few minutes; the scikit-learn loop of (c) dominates):
  python benchmarks/kmeans.py
Smoke test (seconds):
  python benchmarks/kmeans.py --quick
Writes benchmarks/results/kmeans.json (kmeans_quick.json with --quick; rewritten after
every case, so a run stopped early keeps the cases it finished) and prints a markdown
table. Every row also states ours against the memory-traffic floor: one pass over the
data (n x dim float32) at the device's measured bandwidth (``_common.memory_bandwidth``),
times the Lloyd iterations of the slowest class; the k-means++ seeding and the
refinement passes come on top, so a ratio near 1 is out of reach by construction. Ours is
the best of 3 warm calls and each peer loop the best of 3 runs (``PEER_REPEATS``). Timings
are only comparable within one run on one machine: the ratios are the result. Since a
shared machine's speed drifts within minutes, cases (a) and (b) also time ours, the
scikit-learn loop and the faiss loop once each in ``--rounds`` interleaved rounds (default
7), for the default and the plain-Lloyd rows, and report the median and range of the
per-round ratios (the row's ``paired`` field). The load average is recorded before and after; on a busy machine
(load above 0.75 per core) the script warns and records the warning, since the
multi-threaded loops slow down far more than one jitted call.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import pathlib
import sys
import time

import jax
import numpy as np
import sklearn
from sklearn.cluster import KMeans

from magnet_jax.kmeans import kmeans_per_class

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

# MAGNET_JAX_RESULTS redirects the output (the tests use it so CI leaves the repo clean).
RESULTS = pathlib.Path(
    os.environ.get("MAGNET_JAX_RESULTS", pathlib.Path(__file__).resolve().parent / "results")
)

CASES = {
    "a": dict(
        name="(a) 10 classes, 60k x 64, k=8",
        num_classes=10,
        n=60_000,
        dim=64,
        k=8,
        sizes=None,
        paired=True,
        unrefined_restarts=(1,),
    ),
    "b": dict(
        name="(b) 1,000 classes, 100k x 128, k=8",
        num_classes=1_000,
        n=100_000,
        dim=128,
        k=8,
        sizes=None,
        paired=True,
        unrefined_restarts=(1,),
    ),
    "c": dict(
        name="(c) 10,000 classes of 2-12, 128-d, k=2",
        num_classes=10_000,
        n=None,
        dim=128,
        k=2,
        sizes=(2, 12),
        extra_restarts=(10,),
        inexact_restarts=(1,),
        unrefined_restarts=(1, 10),
    ),
    "d": dict(
        name="(d) 1,000 classes x 1,000, 128-d, k=8",
        num_classes=1_000,
        n=None,
        dim=128,
        k=8,
        sizes=(1_000, 1_000),
    ),
    "e": dict(
        name="(e) 10,000 classes of 2-12, 512-d, k=2",
        num_classes=10_000,
        n=None,
        dim=512,
        k=2,
        sizes=(2, 12),
    ),
}
QUICK_CASES = {
    "a": dict(
        name="(a, quick) 4 classes, 2k x 16, k=4", num_classes=4, n=2_000, dim=16, k=4, sizes=None
    ),
    "b": dict(
        name="(b, quick) 30 classes, 3k x 16, k=4",
        num_classes=30,
        n=3_000,
        dim=16,
        k=4,
        sizes=None,
        paired=True,
    ),
    "c": dict(
        name="(c, quick) 200 classes of 2-12, 16-d, k=2",
        num_classes=200,
        n=None,
        dim=16,
        k=2,
        sizes=(2, 12),
    ),
    "d": dict(
        name="(d, quick) 20 classes x 100, 16-d, k=4",
        num_classes=20,
        n=None,
        dim=16,
        k=4,
        sizes=(100, 100),
    ),
    "e": dict(
        name="(e, quick) 200 classes of 2-12, 32-d, k=2",
        num_classes=200,
        n=None,
        dim=32,
        k=2,
        sizes=(2, 12),
    ),
}


def make_data(num_classes, n, dim, sizes, seed=0):
    """Gaussian mixture per class: 1-4 modes per class, unit noise, modes ~ N(0, 3²)."""
    rng = np.random.default_rng(seed)
    if sizes is None:
        labels = rng.integers(0, num_classes, n)
    else:
        labels = np.repeat(
            np.arange(num_classes), rng.integers(sizes[0], sizes[1] + 1, num_classes)
        )
        rng.shuffle(labels)
    modes_per_class = rng.integers(1, 5, num_classes)
    modes = rng.normal(scale=3.0, size=(num_classes, 4, dim))
    mode = rng.integers(0, 4, labels.size) % modes_per_class[labels]
    x = modes[labels, mode] + rng.normal(size=(labels.size, dim))
    return x.astype(np.float32), labels.astype(np.int32)


def class_members(labels, num_classes):
    """(class, example indices) of every class that has examples."""
    order = np.argsort(labels, kind="stable")
    bounds = np.cumsum(np.bincount(labels, minlength=num_classes))[:-1]
    return [(c, m) for c, m in enumerate(np.split(order, bounds)) if m.size]


def sklearn_loop(x, labels, num_classes, k, max_iterations, tolerance, seed=0):
    """The reference refresh: one scikit-learn KMeans per class."""
    inertia = np.zeros(num_classes)
    start = time.perf_counter()
    for c, members in class_members(labels, num_classes):
        points = x[members]
        model = KMeans(
            n_clusters=min(k, members.size),
            init="k-means++",
            n_init=1,
            max_iter=max_iterations,
            tol=tolerance,
            random_state=seed + c,
        )
        model.fit(points)
        inertia[c] = model.inertia_
    return time.perf_counter() - start, inertia


def faiss_module():
    """faiss, or None where it is not installed (the column is then left empty)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_loop(x, labels, num_classes, k, max_iterations, seed=0):
    """pytorch-metric-learning's engine: one ``faiss.Kmeans`` per class; (None, None)
    without faiss."""
    faiss = faiss_module()
    if faiss is None:
        return None, None

    inertia = np.zeros(num_classes)
    start = time.perf_counter()
    for c, members in class_members(labels, num_classes):
        points = np.ascontiguousarray(x[members])
        model = faiss.Kmeans(
            points.shape[1],
            min(k, members.size),
            niter=max_iterations,
            nredo=1,
            seed=seed + c,
            min_points_per_centroid=1,
            max_points_per_centroid=members.size,
        )
        model.train(points)
        distances, _ = model.index.search(points, 1)
        inertia[c] = float(distances.sum())
    return time.perf_counter() - start, inertia


def ours(
    x,
    labels,
    num_classes,
    k,
    max_iterations,
    tolerance,
    num_restarts,
    seed=0,
    refine=True,
    exact=True,
):
    x_dev, labels_dev = jax.device_put(x), jax.device_put(labels)

    options = {}  # the defaults: refine_steps=5, exhaustive_max_points=12
    if not refine:
        options["refine_steps"] = 0
    if not exact:
        options["exhaustive_max_points"] = 0

    def call(s):
        result = kmeans_per_class(
            x_dev,
            labels_dev,
            k,
            key=jax.random.key(s),
            num_classes=num_classes,
            max_iterations=max_iterations,
            tolerance=tolerance,
            num_restarts=num_restarts,
            **options,
        )
        jax.block_until_ready(result)
        return result

    start = time.perf_counter()
    call(seed)
    first = time.perf_counter() - start
    warm_times = []
    for _ in range(3):
        start = time.perf_counter()
        result = call(seed)
        warm_times.append(time.perf_counter() - start)
    assert not np.isnan(np.asarray(result.centroids)).any()
    return first, min(warm_times), result, functools.partial(call, seed)


def paired_rounds(timed, rounds):
    """Ratios measured in interleaved rounds: every round runs each of ``timed`` (name ->
    a function returning its own seconds, or None for an absent peer) once, one after
    the other, so that a round's runs share the machine's state; on a shared virtual
    machine whose speed drifts by tens of percent within minutes, the ratio of two
    best-of-3 times taken minutes apart moves as much.

    Returns ``{peer: {"median", "low", "high", "rounds"}}``, the peer's time over ours
    ("ours" must be a key) in each round, for every peer that is present.
    """
    times = {name: [] for name in timed}
    for _ in range(rounds):
        for name, run in timed.items():
            times[name].append(run())
    ratios = {}
    for name, peer_times in times.items():
        if name == "ours" or peer_times[0] is None:
            continue
        per_round = [float(r) for r in np.asarray(peer_times) / np.asarray(times["ours"])]
        ratios[name] = {**_common.spread(per_round), "rounds": per_round}
    return ratios


def compare_inertia(ours_inertia, sklearn_inertia, scatter):
    """Ratios ours/sklearn; a class whose sklearn inertia is ~0 (e.g. 2 points, k=2)
    counts as matched when ours is ~0 too (relative to the class's total scatter)."""
    floor = 1e-6 * np.maximum(scatter, 1e-12)
    zero = sklearn_inertia <= floor
    within = np.where(zero, ours_inertia <= floor, ours_inertia <= 1.02 * sklearn_inertia)
    ratios = ours_inertia[~zero] / sklearn_inertia[~zero]
    return dict(
        total_ratio=float(ours_inertia.sum() / sklearn_inertia.sum()),
        worst_class_ratio=float(ratios.max()) if ratios.size else 1.0,
        best_class_ratio=float(ratios.min()) if ratios.size else 1.0,
        fraction_within_2pct=float(within.mean()),
        classes_with_zero_sklearn_inertia=int(zero.sum()),
    )


def _ratio(numerator, denominator):
    return None if numerator is None or denominator is None else numerator / denominator


PEER_REPEATS = 3  # runs of each peer loop per case; the fastest is reported


def _fastest_of_repeats(loop):
    """The ``(seconds, inertia)`` of the fastest of ``PEER_REPEATS`` runs of a peer loop,
    as ours is the best of its warm calls: one run of a multi-threaded loop varies by
    tens of percent on a shared 2-core machine. ``(None, None)`` when the peer is absent."""
    runs = [loop() for _ in range(PEER_REPEATS)]
    return runs[0] if runs[0][0] is None else min(runs, key=lambda run: run[0])


def _seconds(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run_case(case, restarts, max_iterations, tolerance, bandwidth, rounds=0):
    x, labels = make_data(case["num_classes"], case["n"], case["dim"], case["sizes"])
    num_classes, k = case["num_classes"], case["k"]
    counts = np.bincount(labels, minlength=num_classes)
    means = np.zeros((num_classes, x.shape[1]))
    np.add.at(means, labels, x)
    means /= np.maximum(counts, 1)[:, None]
    scatter = np.bincount(labels, ((x - means[labels]) ** 2).sum(1), num_classes)

    sk_seconds, sk_inertia = _fastest_of_repeats(
        lambda: sklearn_loop(x, labels, num_classes, k, max_iterations, tolerance)
    )
    faiss_seconds, faiss_inertia = _fastest_of_repeats(
        lambda: faiss_loop(x, labels, num_classes, k, max_iterations)
    )
    rows = []
    # Rows without the exact step, and without the Hartigan refinement too (plain
    # Lloyd, as scikit-learn), show how much of the per-class gap is each step's and
    # how much the restarts'.
    configs = (
        [(r, True, True) for r in list(restarts) + list(case.get("extra_restarts", ()))]
        + [(r, True, False) for r in case.get("inexact_restarts", ())]
        + [(r, False, False) for r in case.get("unrefined_restarts", ())]
    )
    for num_restarts, refine, exact in configs:
        first, warm, result, call = ours(
            x,
            labels,
            num_classes,
            k,
            max_iterations,
            tolerance,
            num_restarts,
            refine=refine,
            exact=exact,
        )
        row = dict(
            case=case["name"],
            n=int(x.shape[0]),
            dim=int(x.shape[1]),
            num_classes=num_classes,
            k=k,
            num_restarts=num_restarts,
            refine=refine,
            exact=exact and k == 2,
            sklearn_seconds=sk_seconds,
            ours_first_call_seconds=first,
            ours_warm_seconds=warm,
            speedup_warm=sk_seconds / warm,
            speedup_incl_compile=sk_seconds / first,
            faiss_seconds=faiss_seconds,
            speedup_vs_faiss=_ratio(faiss_seconds, warm),
            faiss_inertia_ratio=_ratio(
                None if faiss_inertia is None else float(faiss_inertia.sum()),
                float(sk_inertia.sum()),
            ),
            ours_over_faiss_inertia=_ratio(
                float(np.asarray(result.inertia, np.float64).sum()),
                None if faiss_inertia is None else float(faiss_inertia.sum()),
            ),
            iterations=int(result.iterations),
            converged=bool(result.converged),
        )
        data_bytes = x.size * x.itemsize
        floor = max(int(result.iterations), 1) * data_bytes / bandwidth
        row.update(
            data_bytes=int(data_bytes),
            bandwidth_bytes_per_s=bandwidth,
            floor_seconds=floor,
            ours_over_floor=warm / floor,
        )
        row.update(compare_inertia(np.asarray(result.inertia, np.float64), sk_inertia, scatter))
        if rounds and num_restarts == 1 and case.get("paired"):
            row["paired"] = paired_rounds(
                {
                    "ours": functools.partial(_seconds, call),
                    "sklearn": lambda: sklearn_loop(
                        x, labels, num_classes, k, max_iterations, tolerance
                    )[0],
                    "faiss": lambda: faiss_loop(x, labels, num_classes, k, max_iterations)[0],
                },
                rounds,
            )
            print(
                f"  {case['name']}, refine={refine}: {paired_text(row['paired'], rounds)}",
                flush=True,
            )
        rows.append(row)
        print(
            f"  {case['name']}, restarts={num_restarts}, refine={refine}, "
            f"exact={row['exact']}: "
            f"sklearn {sk_seconds:.2f}s, faiss {_text(faiss_seconds, '.2f')}s, "
            f"ours {warm:.3f}s warm / {first:.2f}s first ({row['ours_over_floor']:.1f}x the floor), "
            f"inertia ours/sk {row['total_ratio']:.4f}, faiss/sk {_text(row['faiss_inertia_ratio'], '.4f')}, "
            f"within 2% {100 * row['fraction_within_2pct']:.2f}%",
            flush=True,
        )
    return rows


def paired_text(paired, rounds) -> str:
    """One line of :func:`paired_rounds`' ratios."""
    return f"speed-up in {rounds} interleaved rounds (median, range): " + ", ".join(
        f"vs {name} {r['median']:.2f}x ({r['low']:.2f}-{r['high']:.2f}x)"
        for name, r in paired.items()
    )


def _text(value, spec: str, suffix: str = "") -> str:
    """``value`` formatted, or "–" where a peer is missing."""
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown(rows):
    lines = [
        "| case | restarts | refine | exact (k=2) | sklearn loop (s) | faiss loop (s) | "
        "ours warm (s) | ours 1st call (s) | speed-up vs sklearn | speed-up vs faiss | "
        "speed-up vs sklearn incl. compile | inertia ours/sk | inertia faiss/sk | "
        "worst class ours/sk | classes within 2% | ours / memory floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['num_restarts']} | {'yes' if r['refine'] else 'no'} | "
            f"{'-' if r['k'] != 2 else 'yes' if r['exact'] else 'no'} | "
            f"{r['sklearn_seconds']:.2f} | {_text(r['faiss_seconds'], '.2f')} | "
            f"{r['ours_warm_seconds']:.3f} | {r['ours_first_call_seconds']:.2f} | "
            f"{r['speedup_warm']:.1f}x | {_text(r['speedup_vs_faiss'], '.2f', 'x')} | "
            f"{r['speedup_incl_compile']:.1f}x | "
            f"{r['total_ratio']:.4f} | {_text(r['faiss_inertia_ratio'], '.4f')} | "
            f"{r['worst_class_ratio']:.3f} | "
            f"{100 * r['fraction_within_2pct']:.1f}% | {r['ours_over_floor']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--cases", default="abc", help="subset of 'abcde' ('de': the GPU sizes)")
    parser.add_argument(
        "--restarts",
        default="1,3",
        help="comma-separated num_restarts for ours (sklearn: n_init=1)",
    )
    parser.add_argument("--max-iterations", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--output", type=pathlib.Path, default=None)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds of ours, sklearn and faiss on (a) and (b) (default 7; "
        "2 with --quick; 0: none)",
    )
    args = parser.parse_args(argv)
    rounds = (2 if args.quick else 7) if args.rounds is None else args.rounds

    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"--cases: unknown case(s) {sorted(unknown)}; choose from {sorted(CASES)}")
    faiss = faiss_module()
    cases = QUICK_CASES if args.quick else CASES
    restarts = [int(r) for r in args.restarts.split(",")]
    environment = _common.environment(
        sklearn=sklearn.__version__, faiss=None if faiss is None else faiss.__version__
    )
    warnings = [w for w in [_common.busy_warning()] if w]
    for warning in warnings:
        print(f"WARNING: {warning}", flush=True)
    bandwidth = _common.memory_bandwidth(2**26 if args.quick else 2**30)
    print(f"device memory bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s", flush=True)
    output = args.output or RESULTS / ("kmeans_quick.json" if args.quick else "kmeans.json")
    report = dict(
        benchmark="kmeans_per_class vs scikit-learn and faiss KMeans looped over classes",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        quick=args.quick,
        environment=environment,
        faiss_threads=None if faiss is None else faiss.omp_get_max_threads(),
        bandwidth_bytes_per_s=bandwidth,
        max_iterations=args.max_iterations,
        tolerance=args.tolerance,
        rows=[],
    )
    for name in args.cases:
        report["rows"].extend(
            run_case(cases[name], restarts, args.max_iterations, args.tolerance, bandwidth, rounds)
        )
        report.update(load_average_after=list(os.getloadavg()), busy_warnings=warnings)
        _common.write_json(output, report)  # after every case: a stopped run keeps its rows
    after = _common.busy_warning()
    if after:
        print(f"WARNING (at the end): {after}", flush=True)
        warnings.append(f"at the end: {after}")
    _common.write_json(output, report)
    rows = report["rows"]
    table = markdown(rows)
    print(table)
    for row in rows:
        if "paired" in row:
            print(f"\n{row['case']}, refine={row['refine']}: {paired_text(row['paired'], rounds)}")
    print(f"\nwrote {output}")
    return report


if __name__ == "__main__":
    main()
