"""What the benchmarks ran on: library versions, devices, and the device's measured speeds.

    python benchmarks/device_info.py            # 1 GiB copy, 8192^3 matmuls (a GPU's sizes)
    python benchmarks/device_info.py --quick    # small sizes (CI smoke test)

The first step of ``benchmarks/device.sh`` (the one-call GPU run): it fails fast when the
machine's JAX/Flax/Optax cannot run the library, and it records the two numbers the other
results are read against: the memory bandwidth of a jitted elementwise pass (read +
write; the k-means benchmark's floor uses the same function) and the float32 / bfloat16
matrix-product throughput. Writes ``results/device.json`` (``device_quick.json`` with
--quick).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "scikit-learn",
    "torch",
    "pytorch-metric-learning",
    "faiss-cpu",
    "efficientnet-lite-pytorch",
    "grain",
)


def versions() -> dict[str, str | None]:
    """Installed version of every package a benchmark may use (None: not installed)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def matmul_tflops(size: int, dtype, repeats: int = 5) -> float:
    """Best-of-``repeats`` throughput of one jitted ``size``³ matrix product, in TFLOP/s
    (default precision: what a model's layers get)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,memory.total,driver_version,clocks.max.sm,clocks.max.mem"
    done = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or done.stderr.strip()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke test)")
    args = parser.parse_args(argv)
    copy_bytes, size = (2**24, 512) if args.quick else (2**30, 8192)

    import magnet_jax  # the library imports on this machine's versions

    report = {
        "benchmark": "device information",
        "quick": args.quick,
        "environment": _common.environment(),
        "versions": versions(),
        "magnet_jax": magnet_jax.__file__,
        "backend": jax.default_backend(),
        "nvidia_smi": nvidia_smi(),
        "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "copy_bytes": copy_bytes,
        "bandwidth_bytes_per_s": _common.memory_bandwidth(copy_bytes),
        "matmul_size": size,
        "matmul_float32_tflops": matmul_tflops(size, jnp.float32),
        "matmul_bfloat16_tflops": matmul_tflops(size, jnp.bfloat16),
    }
    path = _common.RESULTS / ("device_quick.json" if args.quick else "device.json")
    _common.write_json(path, report)
    print(f"backend {report['backend']}: {report['environment']['devices']}")
    print(f"nvidia-smi: {report['nvidia_smi']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    print(
        f"bandwidth {report['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (read + write), "
        f"matmul {size}^3: float32 {report['matmul_float32_tflops']:.1f} TFLOP/s, "
        f"bfloat16 {report['matmul_bfloat16_tflops']:.1f} TFLOP/s"
    )
    print(f"written to {path}")
    return report


if __name__ == "__main__":
    main()
