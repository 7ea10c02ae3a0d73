"""Images/s of a full train step of the backbones, JAX against PyTorch in the same run.

    python benchmarks/backbone.py                       # every case (for a GPU machine)
    python benchmarks/backbone.py --cases efficientnet_lite0@96 --batch-sizes 48 --steps 3
    python benchmarks/backbone.py --quick               # tiny sizes, seconds (CI smoke test)

A step is what fine-tuning does: the forward pass (preprocessing of uint8 images, every
stage, pooling, the 1,000-way classifier), cross-entropy against labels, the backward
pass, and an SGD-with-momentum (0.9) update of every parameter; batch norm on its running
statistics (the fine-tuning default), dropout/drop-connect off. JAX runs
``magnet_jax.backbones`` under one ``jax.jit`` with donated parameters; PyTorch runs
``efficientnet_lite_pytorch.EfficientNet`` (the reference the weights are checked
against) and torchvision's ResNet-50 (or the same network written with torch.nn when
torchvision is absent) in eager mode on the same device, with the same inputs. The two
are timed interleaved (JAX, PyTorch, JAX, ...) so that machine noise hits both alike.

Cases: EfficientNet-Lite0 at 224 and 96, ResNet-50 at 224; batch 48 and 256. Writes
``results/backbone.json`` (``backbone_quick.json`` with --quick) with the device, the load
average before and after, library versions and thread counts.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from magnet_jax import backbones
from magnet_jax.backbones import torch_resnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

# MAGNET_JAX_RESULTS redirects the output (the tests use it so CI leaves the repo clean).
RESULTS = Path(os.environ.get("MAGNET_JAX_RESULTS", Path(__file__).resolve().parent / "results"))
CASES = ("efficientnet_lite0@224", "efficientnet_lite0@96", "resnet50@224")
BATCH_SIZES = (48, 256)
LR = 1e-3


def _parse_case(case: str) -> tuple[str, int]:
    name, _, size = case.partition("@")
    if name not in backbones.BACKBONES or not size.isdigit():
        raise SystemExit(
            f"bad case {case!r}: write NAME@SIZE, NAME one of {list(backbones.BACKBONES)}"
        )
    return name, int(size)


# --------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------


def jax_step(name: str, size: int):
    """(run(images, labels) -> loss, state) for one jitted train step."""
    module = backbones.create(name, rngs=nnx.Rngs(0), image_size=size)
    # Only the nnx.Param leaves are differentiated and updated, as PyTorch's SGD sees
    # model.parameters(): the batch-norm running statistics ride along as constants.
    graphdef, param_state, rest = nnx.split(module, nnx.Param, ...)
    params = nnx.to_pure_dict(param_state)
    optimizer = optax.sgd(LR, momentum=0.9)
    carry = {"params": params, "opt": optimizer.init(params)}

    def step(carry, images, labels):
        def loss_of(params):
            model = nnx.merge(graphdef, nnx.State(params), rest)
            logits = model.classify(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_of)(carry["params"])
        updates, opt = optimizer.update(grads, carry["opt"], carry["params"])
        return {"params": optax.apply_updates(carry["params"], updates), "opt": opt}, loss

    step = jax.jit(step, donate_argnums=0)

    def run(images, labels):
        nonlocal carry
        carry, loss = step(carry, images, labels)
        return loss

    return run


# --------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------


def _torch_resnet50(torch):
    try:
        import torchvision

        return torchvision.models.resnet50(), "torchvision.models.resnet50"
    except ImportError:
        pass
    model = torch_resnet.resnet50(torch)
    return model, "torch.nn ResNet-50 (torchvision layout; torchvision not installed)"


def torch_step(name: str, size: int, device: str):
    """(run(images, labels) -> loss, description), or (None, why) without PyTorch."""
    try:
        import torch
    except ImportError:
        return None, "torch not installed"
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            return None, "efficientnet-lite-pytorch not installed"
        model = EfficientNet.from_name("efficientnet-lite0", image_size=size)
        what = "efficientnet_lite_pytorch.EfficientNet (efficientnet-lite0)"
    else:
        model, what = _torch_resnet50(torch)
    model = model.to(device).eval()  # batch norm on running statistics, no dropout
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    mean, std = (
        ((0.5,) * 3, (0.5,) * 3) if name == "efficientnet_lite0" else
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    )  # fmt: skip
    mean = torch.tensor(mean, device=device)[:, None, None]
    std = torch.tensor(std, device=device)[:, None, None]
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(images, labels):
        x = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), labels)
        loss.backward()
        optimizer.step()
        return loss

    return run, what


# --------------------------------------------------------------------------------------


def _sync_jax(value):
    jax.block_until_ready(value)


def measure(name, size, batch, steps, repeats, torch_device) -> dict:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, (batch,), dtype=np.int32)
    row = {"backbone": name, "image_size": size, "batch": batch, "steps_per_timing": steps}

    j_run = jax_step(name, size)
    j_images, j_labels = jax.device_put(images), jax.device_put(labels)
    start = time.perf_counter()
    _sync_jax(j_run(j_images, j_labels))  # compile + first step
    row["jax_first_step_s"] = time.perf_counter() - start

    t_run, what = torch_step(name, size, torch_device)
    row["torch_model"] = what
    if t_run is not None:
        import torch

        t_images = torch.from_numpy(images).to(torch_device)
        t_labels = torch.from_numpy(labels.astype(np.int64)).to(torch_device)

        def t_sync(loss):
            loss.item()

        t_sync(t_run(t_images, t_labels))  # warm-up step

    jax_times, torch_times = [], []
    for _ in range(repeats):  # interleaved
        start = time.perf_counter()
        for _ in range(steps):
            loss = j_run(j_images, j_labels)
        _sync_jax(loss)
        jax_times.append((time.perf_counter() - start) / steps)
        if t_run is not None:
            start = time.perf_counter()
            for _ in range(steps):
                loss = t_run(t_images, t_labels)
            t_sync(loss)
            torch_times.append((time.perf_counter() - start) / steps)
    row["jax_step_s"] = statistics.median(jax_times)
    row["jax_images_per_s"] = batch / row["jax_step_s"]
    row["jax_step_s_all"] = jax_times
    if torch_times:
        row["torch_step_s"] = statistics.median(torch_times)
        row["torch_images_per_s"] = batch / row["torch_step_s"]
        row["torch_step_s_all"] = torch_times
        row["ratio_jax_over_torch"] = row["jax_images_per_s"] / row["torch_images_per_s"]
    return row


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None


def environment(torch_device: str) -> dict:
    info = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": __import__("flax").__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": _git_commit(),
    }
    try:
        import torch

        info.update(
            torch=torch.__version__,
            torch_device=torch_device,
            torch_threads=torch.get_num_threads(),
            torch_cuda_device=torch.cuda.get_device_name() if torch_device == "cuda" else None,
            torch_cudnn_benchmark=torch.backends.cudnn.benchmark,
            torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    except ImportError:
        info["torch"] = None
    return info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="NAME@SIZE ...")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES))
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timings per case")
    parser.add_argument("--output", default=None, help="JSON file (default: results/backbone.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.batch_sizes = ["efficientnet_lite0@32", "resnet50@32"], [2]
        args.steps, args.repeats = 1, 2

    torch_device = "cpu"
    if jax.default_backend() == "gpu":
        try:
            import torch

            torch_device = "cuda" if torch.cuda.is_available() else "cpu"
            # What a PyTorch user sets for fixed input shapes: cuDNN picks the fastest
            # convolution algorithms (XLA autotunes its own the same way).
            torch.backends.cudnn.benchmark = torch_device == "cuda"
        except ImportError:
            pass
    path = (
        Path(args.output)
        if args.output
        else RESULTS / ("backbone_quick.json" if args.quick else "backbone.json")
    )
    cases = [_parse_case(case) for case in args.cases]
    result = {
        "benchmark": "backbone train step (forward + backward + SGD momentum update)",
        "quick": args.quick,
        "environment": environment(torch_device),
        "load_average_before": list(os.getloadavg()),
        "rows": [],
    }
    rows = result["rows"]
    for name, size in cases:
        for batch in args.batch_sizes:
            row = measure(name, size, batch, args.steps, args.repeats, torch_device)
            rows.append(row)
            result["load_average_after"] = list(os.getloadavg())
            _common.write_json(path, result)  # after every case: a stopped run keeps its rows
            ratio = row.get("ratio_jax_over_torch")
            print(
                f"{name}@{size} batch {batch}: JAX {row['jax_images_per_s']:.1f} img/s, "
                f"PyTorch {row.get('torch_images_per_s', float('nan')):.1f} img/s, "
                f"ratio {ratio if ratio is None else round(ratio, 2)}",
                flush=True,
            )
    print("| case | batch | JAX img/s | PyTorch img/s | JAX / PyTorch |")
    print("|---|---|---|---|---|")
    for row in rows:
        torch_ips = row.get("torch_images_per_s")
        torch_text = "–" if torch_ips is None else f"{torch_ips:.1f}"
        ratio_text = "–" if torch_ips is None else f"{row['ratio_jax_over_torch']:.2f}"
        print(
            f"| {row['backbone']} @ {row['image_size']} | {row['batch']} | "
            f"{row['jax_images_per_s']:.1f} | {torch_text} | {ratio_text} |"
        )
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
