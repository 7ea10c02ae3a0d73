"""The top-k of a retrieval block on one device: ``lax.top_k`` against the selection top-k.

    python benchmarks/top_k.py            # [256, 131072] and [1024, 32768] blocks, k 144 and 10
    python benchmarks/top_k.py --quick    # tiny sizes (the CPU rehearsal)

``retrieval_metrics`` ranks a block of ``c`` queries against a reference chunk of ``N``
rows: one matrix product (``[c, d + 1] x [d + 1, N]``) and a top-k of every row, with
``k = max(largest class, max(ks))``. XLA's GPU top-k kernels take ``k`` up to 16; a larger
``k`` becomes a sort of every whole row. The library's selection top-k
(``magnet_jax.evaluation._select_top_k``) takes the maxima of bins of ``B`` columns, the
``k`` bins with the largest maxima, and the top ``k`` of their ``k * B`` columns, with
exactly ``lax.top_k``'s result.

Per block shape and ``k``, this times the matrix product alone (the floor), the product
followed by ``lax.top_k``, by the selection at several ``B``, by the library's own choice
for this platform (``_top_k``), and by a sort of bins of 1,024 columns and then of their
winners (the other exact split). Every variant's indices are checked equal to
``lax.top_k``'s. Each time is the best of ``--repeats`` loops of ``--calls`` calls on
device-resident inputs. Writes ``results/top_k.json`` (``top_k_quick.json`` with
--quick), rewritten after every row, with the fastest ``B`` at the larger ``k``.

    python benchmarks/top_k.py --end-to-end 60000   # whole retrieval_metrics calls

times warm ``retrieval_metrics`` calls with this platform's top-k and with the selection
forced, interleaved, and writes ``results/top_k_end_to_end.json``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from magnet_jax import evaluation  # noqa: E402

RESULTS = Path(os.environ.get("MAGNET_JAX_RESULTS", Path(__file__).resolve().parent / "results"))
SORTED_BIN = 1024


def _block_inputs(rows: int, columns: int, dim: int, seed: int = 0):
    """Device-resident ``[rows, dim + 1]`` queries and ``[columns, dim + 1]`` reference rows
    in the library's augmented form (Gaussian clusters, so neighbours are not uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32) * 0.5
    reference = centres[rng.integers(0, 64, columns)] + rng.standard_normal((columns, dim))
    query = centres[rng.integers(0, 64, rows)] + rng.standard_normal((rows, dim))
    reference_aug = evaluation._augment_reference(jnp.asarray(reference, jnp.float32), columns)
    query_aug = jnp.concatenate(
        [jnp.asarray(query, jnp.float32), jnp.ones((rows, 1), jnp.float32)], axis=1
    )
    return jax.device_put(query_aug), jax.device_put(reference_aug)


def _sorted_bins_top_k(x, k, bin_size=SORTED_BIN):
    """``lax.top_k`` of ``[c, n]`` as the top k of every bin of columns (one short sort
    each), then of the bins' winners; exact, since the winners stay in column order."""
    num_rows, width = x.shape
    num_bins = -(-width // bin_size)
    if not (k < bin_size < width and num_bins * k < width):
        return tuple(jax.lax.top_k(x, k))
    x = jnp.pad(x, ((0, 0), (0, num_bins * bin_size - width)), constant_values=-jnp.inf)
    keys, local = jax.lax.top_k(x.reshape(num_rows, num_bins, bin_size), k)
    indices = local + (jnp.arange(num_bins, dtype=local.dtype) * bin_size)[:, None]
    keys, order = _sorted_bins_top_k(keys.reshape(num_rows, num_bins * k), k, bin_size)
    return keys, jnp.take_along_axis(indices.reshape(num_rows, num_bins * k), order, axis=1)


def _variants(k: int, bins: list[int]) -> dict:
    """name -> function of the ``[c, N]`` keys returning ``(keys, indices)`` or ``None``."""
    variants = {
        "matmul only": None,
        "lax.top_k": lambda x: tuple(jax.lax.top_k(x, k)),
        "library _top_k": lambda x: evaluation._top_k(x, k),
    }
    for bin_size in bins:
        variants[f"select {bin_size}"] = functools.partial(
            evaluation._select_top_k, k=k, bin_size=bin_size
        )
    variants[f"sorted bins {SORTED_BIN}"] = functools.partial(_sorted_bins_top_k, k=k)
    return variants


def _timed(fn, query_aug, reference_aug, calls: int, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, best per-call seconds over ``repeats`` loops)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(query_aug, reference_aug))
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(query_aug, reference_aug)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return first, best


def run_case(rows, columns, dim, k, bins, calls, repeats):
    """Rows of the report for one block shape and k."""
    query_aug, reference_aug = _block_inputs(rows, columns, dim)
    precision = evaluation._matmul_precision()

    def with_top_k(top_k):
        def fn(q, r):
            keys = jnp.matmul(q, r.T, precision=precision)
            return keys if top_k is None else top_k(keys)

        return jax.jit(fn)

    reference_indices = None
    out = []
    for name, top_k in _variants(k, bins).items():
        fn = with_top_k(top_k)
        first, seconds = _timed(fn, query_aug, reference_aug, calls, repeats)
        row = {
            "rows": rows,
            "columns": columns,
            "k": k,
            "variant": name,
            "seconds": seconds,
            "first_call_seconds": first,
        }
        if name == "lax.top_k":
            reference_indices = np.asarray(fn(query_aug, reference_aug)[1])
        elif top_k is not None:
            row["equal_to_lax_top_k"] = bool(
                np.array_equal(np.asarray(fn(query_aug, reference_aug)[1]), reference_indices)
            )
        out.append(row)
        print(
            f"[{rows} x {columns}] k={k} {name}: {seconds * 1e3:.3f} ms"
            + ("" if "equal_to_lax_top_k" not in row else f", equal {row['equal_to_lax_top_k']}"),
            flush=True,
        )
    plain = next(r["seconds"] for r in out if r["variant"] == "lax.top_k")
    for row in out:
        row["speed_up_vs_lax_top_k"] = plain / row["seconds"]
    return out


def markdown(rows) -> str:
    lines = [
        "| block | k | variant | ms per block | speed-up vs lax.top_k | equal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        equal = {True: "yes", False: "NO"}.get(r.get("equal_to_lax_top_k"), "")
        lines.append(
            f"| {r['rows']} x {r['columns']:,} | {r['k']} | {r['variant']} | "
            f"{r['seconds'] * 1e3:.3f} | {r['speed_up_vs_lax_top_k']:.2f}x | {equal} |"
        )
    return "\n".join(lines)


def best_bin(rows, k: int) -> int | None:
    """The bin size of the fastest exact selection at ``k`` over all block shapes (summed
    time), or None when none was measured."""
    totals: dict[int, float] = {}
    for r in rows:
        if r["k"] == k and r["variant"].startswith("select ") and r.get("equal_to_lax_top_k"):
            size = int(r["variant"].split()[1])
            totals[size] = totals.get(size, 0.0) + r["seconds"]
    return min(totals, key=totals.get) if totals else None


def end_to_end(num: int, dim: int, repeats: int) -> dict:
    """Warm ``retrieval_metrics`` on a ``num``-row self-gallery (benchmarks/retrieval.py's
    data), with this platform's ``_top_k`` and with the selection forced, interleaved."""
    from retrieval import make_data

    points, labels = make_data(num, dim, max(num // 600, 2))
    variants = {
        "platform default": evaluation._top_k,
        f"select {evaluation._GPU_TOP_K_BIN}": lambda x, k: evaluation._select_top_k(
            x, k, evaluation._GPU_TOP_K_BIN
        ),
    }
    seconds = {name: [] for name in variants}
    metrics = {}
    try:
        for round_ in range(repeats):
            for name in list(variants)[:: 1 if round_ % 2 == 0 else -1]:
                evaluation._top_k = variants[name]
                evaluation._compiled.cache_clear()
                evaluation.retrieval_metrics(points, labels, clustering=False)  # compile
                start = time.perf_counter()
                metrics[name] = evaluation.retrieval_metrics(points, labels, clustering=False)
                seconds[name].append(time.perf_counter() - start)
                print(f"end to end, {name}: {seconds[name][-1]:.2f} s", flush=True)
    finally:
        evaluation._top_k = variants["platform default"]
        evaluation._compiled.cache_clear()
    return {
        "num": num,
        "dim": dim,
        "jax_devices": [str(d) for d in jax.devices()],
        "seconds": seconds,
        "min_seconds": {name: min(v) for name, v in seconds.items()},
        "same_metrics": len({tuple(sorted(m.items())) for m in metrics.values()}) == 1,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--end-to-end",
        type=int,
        default=None,
        metavar="NUM",
        help="instead: retrieval_metrics on a NUM-row self-gallery with this platform's "
        "top-k and with the selection, interleaved --repeats times (top_k_end_to_end.json)",
    )
    args = parser.parse_args(argv)
    # One CPU device per core, as benchmarks/retrieval.py runs it (no effect on a GPU).
    jax.config.update("jax_num_cpu_devices", os.cpu_count())
    if args.end_to_end:
        report = {
            "benchmark": "warm retrieval_metrics, self-gallery: this platform's top-k vs the "
            "selection top-k forced",
            "environment": _common.environment(),
            **end_to_end(args.end_to_end, args.dim, args.repeats),
            "load_average_after": list(os.getloadavg()),
        }
        output = args.output or RESULTS / "top_k_end_to_end.json"
        _common.write_json(output, report)
        print(report["min_seconds"], f"same metrics: {report['same_metrics']}")
        print(f"wrote {output}")
        return

    if args.quick:
        shapes, bins, dim, calls = [(16, 4096)], [8, 32], 16, args.calls or 2
        ks = (40, 10)
    else:
        shapes, bins, dim, calls = (
            [(256, 131072), (1024, 32768)],
            [16, 32, 64, 128],
            args.dim,
            args.calls or 10,
        )
        ks = (144, 10)
    warnings = [w for w in [_common.busy_warning()] if w]
    report = {
        "benchmark": "matmul + top-k of one retrieval block: lax.top_k vs the selection top-k",
        "environment": _common.environment(),
        "quick": args.quick,
        "dim": dim,
        "calls": calls,
        "repeats": args.repeats,
        "library_gpu_top_k_bin": evaluation._GPU_TOP_K_BIN,
        "warnings": warnings,
        "rows": [],
    }
    output = args.output or RESULTS / ("top_k_quick.json" if args.quick else "top_k.json")
    for rows, columns in shapes:
        for k in ks:
            bins_here = bins if k == ks[0] else [evaluation._GPU_TOP_K_BIN]
            report["rows"] += run_case(rows, columns, dim, k, bins_here, calls, args.repeats)
            _common.write_json(output, report)
    report["best_bin"] = best_bin(report["rows"], ks[0])
    report["load_average_after"] = list(os.getloadavg())
    _common.write_json(output, report)
    print(markdown(report["rows"]))
    print(f"fastest exact bin at k={ks[0]}: {report['best_bin']}")
    print(f"wrote {output}")
    if not all(r.get("equal_to_lax_top_k", True) for r in report["rows"]):
        sys.exit("a top-k variant differs from lax.top_k")


if __name__ == "__main__":
    main()
