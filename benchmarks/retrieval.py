"""Retrieval metrics: magnet_jax.retrieval_metrics against pytorch-metric-learning + faiss.

pytorch-metric-learning's ``AccuracyCalculator`` (k="max_bin_count", exact faiss-cpu
``IndexFlatL2`` k-NN, its default path) is the reference implementation of
precision@1, R-precision and MAP@R. This script times both on the same self-gallery
(default 60,000 x 128, 100 classes of Gaussian clusters, fixed seed), compares the metric
values, times NMI/AMI separately (the two sides run different k-means: ours vs faiss'),
and measures the peak resident memory of our path on a 100,000 x 100,000 gallery in a
fresh subprocess, against the 40 GB an N x N float32 distance matrix would take.

JAX gets one CPU device per core (``--cpu-devices``, default ``os.cpu_count()``):
XLA's CPU top-k and (here) matmul run on one thread per device, and
``retrieval_metrics`` splits every query chunk over the local devices; faiss uses one
OpenMP thread per core.

Where faiss is not installed (a GPU machine, say), or with ``--peer torch``, the reference
is the same ``AccuracyCalculator`` with pytorch-metric-learning's own PyTorch k-NN
(``CustomKNN`` over ``LpDistance`` without normalisation, in query batches) on PyTorch's
device (the GPU when there is one). ``--knn-only`` skips NMI/AMI (pml clusters with faiss).

Run (full: several minutes on 2 cores, the 100k peak-memory run dominates):
  python benchmarks/retrieval.py
Smoke test (seconds):
  python benchmarks/retrieval.py --quick
Writes benchmarks/results/retrieval.json (retrieval_quick.json with --quick) and prints
a markdown table. Timings are only comparable within one run on one machine: the ratio
is the result. Our time is a warm call (compiled once before); the first call's time,
compile included, is reported too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import numpy as np

# MAGNET_JAX_RESULTS redirects the output (the tests use it so CI leaves the repo clean).
RESULTS = pathlib.Path(
    os.environ.get("MAGNET_JAX_RESULTS", pathlib.Path(__file__).resolve().parent / "results")
)
KNN_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def make_data(num, dim, num_classes, seed=0, spread=0.16):
    """Gaussian clusters: class centres N(0, spread²·I)·√… with unit noise, shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim)).astype(np.float32) * spread * 3
    labels = rng.integers(0, num_classes, num).astype(np.int64)
    points = centres[labels] + rng.standard_normal((num, dim)).astype(np.float32)
    return points.astype(np.float32), labels


def max_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    VmHWM (Linux) rather than ru_maxrss: after fork + exec, ru_maxrss still counts the
    forked copy of the parent (here ~3 GB of torch and data).
    """
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def ours(points, labels, clustering):
    from magnet_jax.evaluation import clustering_scores, retrieval_metrics

    if clustering:
        return clustering_scores(points, labels)
    return retrieval_metrics(points, labels, clustering=False)


def has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pml(points, labels, clustering, peer="faiss"):
    """pytorch-metric-learning's metrics; ``peer`` "faiss" (its default exact faiss k-NN,
    on the CPU) or "torch" (its PyTorch k-NN in query batches of 4,096, on
    :func:`torch_device`)."""
    import torch
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    include = ("NMI", "AMI") if clustering else KNN_METRICS
    if peer == "torch":
        knn = CustomKNN(LpDistance(normalize_embeddings=False), batch_size=4096)
        calculator = AccuracyCalculator(
            include=include, k="max_bin_count", device=torch_device(), knn_func=knn
        )
        points, labels = torch.from_numpy(points), torch.from_numpy(labels)
    else:
        calculator = AccuracyCalculator(
            include=include, k="max_bin_count", device=torch.device("cpu")
        )
    result = calculator.get_accuracy(points, labels)
    if clustering:
        return {"nmi": result["NMI"], "ami": result["AMI"]}
    return result


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def peak_child(num, dim, num_classes):
    """Runs in a fresh process: peak RSS of retrieval_metrics on num x num."""
    import jax

    points, labels = make_data(num, dim, num_classes, seed=1)
    jax.numpy.zeros(1).block_until_ready()
    baseline = max_rss_mb()
    metrics, seconds = timed(ours, points, labels, False)
    print(
        json.dumps(
            {
                "num": num,
                "dim": dim,
                "num_classes": num_classes,
                "seconds": seconds,
                "max_rss_mb": max_rss_mb(),
                "rss_before_call_mb": baseline,
                "metrics": metrics,
            }
        )
    )


def versions():
    import jax
    import jaxlib
    import pytorch_metric_learning
    import sklearn
    import torch

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "faiss": __import__("faiss").__version__ if has_faiss() else None,
        "scikit_learn": sklearn.__version__,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--num", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument(
        "--peak-num",
        type=int,
        default=None,
        help="gallery size of the peak-memory run (0 skips it)",
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=os.cpu_count(),
        help="JAX CPU devices (XLA runs one top-k per device on one "
        "thread, so one device per core parallelises it)",
    )
    parser.add_argument(
        "--peer",
        choices=("faiss", "torch", "none"),
        default=None,
        help="pml's k-NN: faiss (default where installed) or its PyTorch k-NN on "
        "PyTorch's device (the GPU when there is one); none times ours alone",
    )
    parser.add_argument(
        "--top-k-bin",
        type=int,
        default=None,
        help="bin size of the GPU's selection top-k (default: the library's; see top_k.py)",
    )
    parser.add_argument("--knn-only", action="store_true", help="skip NMI/AMI")
    parser.add_argument("--output", type=pathlib.Path, default=None, help="JSON file")
    parser.add_argument("--peak-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from magnet_jax import evaluation

    if args.top_k_bin is not None:
        evaluation._GPU_TOP_K_BIN = args.top_k_bin  # read when the kernels are traced

    num = args.num or (3_000 if args.quick else 60_000)
    dim = args.dim or (32 if args.quick else 128)
    num_classes = args.classes or (20 if args.quick else 100)
    peak_num = args.peak_num if args.peak_num is not None else (5_000 if args.quick else 100_000)
    if args.peak_child:
        peak_child(args.peak_child, dim, num_classes)
        return

    peer = args.peer or ("faiss" if has_faiss() else "torch")
    if peer == "faiss" and not has_faiss():
        parser.error("--peer faiss: faiss is not installed (pip install faiss-cpu)")
    clustering = not args.knn_only
    if clustering and not has_faiss():
        parser.error("NMI/AMI: pytorch-metric-learning clusters with faiss; pass --knn-only")
    load_before = os.getloadavg()
    points, labels = make_data(num, dim, num_classes)
    report = {
        "benchmark": "retrieval_metrics vs pytorch-metric-learning AccuracyCalculator "
        "(k='max_bin_count'), self-gallery",
        "peer": (
            "faiss-cpu IndexFlatL2"
            if peer == "faiss"
            else "none"
            if peer == "none"
            else f"pml CustomKNN(LpDistance) on torch {torch_device()}"
        ),
        "jax_backend": jax.default_backend(),
        "gpu_top_k_bin": evaluation._GPU_TOP_K_BIN,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "num": num,
        "dim": dim,
        "num_classes": num_classes,
        "max_class_size": int(np.bincount(labels).max()),
        "cpu_count": os.cpu_count(),
        "faiss_threads": __import__("faiss").omp_get_max_threads() if has_faiss() else None,
        "jax_devices": [str(d) for d in jax.devices()],
        "platform": platform.platform(),
        "versions": versions(),
    }

    out = args.output or RESULTS / ("retrieval_quick.json" if args.quick else "retrieval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = report["seconds"] = {}
    _, seconds["ours_knn_metrics_first_call"] = timed(ours, points, labels, False)
    ours_metrics, seconds["ours_knn_metrics_warm"] = timed(ours, points, labels, False)
    report["knn_metrics"] = {name: {"ours": ours_metrics[name]} for name in KNN_METRICS}
    report["recall_at_k_ours"] = {
        k: v for k, v in ours_metrics.items() if k.startswith("recall_at_")
    }
    # Written now too, so a run stopped during the reference keeps our side.
    out.write_text(json.dumps({**report, "partial": True}, indent=2) + "\n")
    if peer != "none":
        try:
            if peer == "torch":  # warm-up: CUDA context, kernels (like our first call)
                _, report["pml_first_call_seconds"] = timed(pml, points, labels, False, peer)
            pml_metrics, seconds["pml_knn_metrics"] = timed(pml, points, labels, False, peer)
        except Exception as error:  # e.g. pml's label counting holds a classes x N array
            report["peer_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            print(f"the reference failed: {report['peer_error']}", flush=True)
        else:
            seconds["ratio_ours_over_pml"] = (
                seconds["ours_knn_metrics_warm"] / seconds["pml_knn_metrics"]
            )
            for name, row in report["knn_metrics"].items():
                row["pml"] = float(pml_metrics[name])
                row["abs_diff"] = abs(row["ours"] - row["pml"])
    if clustering:
        ours_cluster, seconds["ours_nmi_ami"] = timed(ours, points, labels, True)
        pml_cluster, seconds["pml_faiss_nmi_ami"] = timed(pml, points, labels, True)
        report["clustering_metrics"] = {
            name: {"ours": ours_cluster[name], "pml": float(pml_cluster[name])}
            for name in ("nmi", "ami")
        }
    report["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]

    if peak_num:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--peak-child",
                str(peak_num),
                "--dim",
                str(dim),
                "--classes",
                str(num_classes),
                "--cpu-devices",
                str(args.cpu_devices),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        peak = json.loads(child.stdout.strip().splitlines()[-1])
        peak["nxn_float32_mb"] = peak_num * peak_num * 4 / 2**20
        report["peak_memory"] = peak

    out.write_text(json.dumps(report, indent=2) + "\n")

    lines = [
        f"Self-gallery {num:,} x {dim}, {num_classes} classes "
        f"(largest {report['max_class_size']}), {os.cpu_count()} CPUs",
        "",
        f"| metric | magnet_jax ({jax.default_backend()}) | pml ({report['peer']}) | abs diff |",
        "|---|---|---|---|",
    ]
    for name, row in report["knn_metrics"].items():
        if "pml" in row:
            lines.append(
                f"| {name} | {row['ours']:.6f} | {row['pml']:.6f} | {row['abs_diff']:.1e} |"
            )
        else:
            lines.append(f"| {name} | {row['ours']:.6f} | – | |")
    for name, row in report.get("clustering_metrics", {}).items():
        lines.append(f"| {name} (different k-means) | {row['ours']:.4f} | {row['pml']:.4f} | |")
    s = report["seconds"]
    pml_text = (
        f"{s['pml_knn_metrics']:.2f} | {s['ratio_ours_over_pml']:.2f}x"
        if "pml_knn_metrics" in s
        else "not run (--peer none) |"
        if peer == "none"
        else f"failed: {report['peer_error']} |"
    )
    lines += [
        "",
        "| time (s) | magnet_jax | pml | ratio |",
        "|---|---|---|---|",
        f"| P@1, R-precision, MAP@R | {s['ours_knn_metrics_warm']:.2f} "
        f"(first call {s['ours_knn_metrics_first_call']:.2f}) | {pml_text} |",
    ]
    if clustering:
        lines.append(
            f"| NMI, AMI | {s['ours_nmi_ami']:.2f} | {s['pml_faiss_nmi_ami']:.2f} | "
            f"{s['ours_nmi_ami'] / s['pml_faiss_nmi_ami']:.2f}x |"
        )
    if peak_num:
        p = report["peak_memory"]
        lines += [
            "",
            f"Peak RSS at {peak_num:,} x {peak_num:,}: {p['max_rss_mb']:,.0f} MB "
            f"(before the call {p['rss_before_call_mb']:,.0f} MB; an N x N float32 "
            f"matrix: {p['nxn_float32_mb']:,.0f} MB), {p['seconds']:.1f} s",
        ]
    lines.append(f"\nLoad average before/after: {report['load_average_before_after']}")
    print("\n".join(lines))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
