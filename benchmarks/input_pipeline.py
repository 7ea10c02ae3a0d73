"""Images/s the streaming input delivers against what the train step consumes.

    python benchmarks/input_pipeline.py                 # 96/64/224 px, 0/1/2 workers
    python benchmarks/input_pipeline.py --sizes 96 --step-repeats 2
    python benchmarks/input_pipeline.py --model convnet --step-sizes 96 64  # light step
    python benchmarks/input_pipeline.py --quick         # tiny sizes, seconds (CI smoke test)

A folder of JPEGs (photograph-like: smooth colour fields plus noise, 300-500 px a side,
12 classes) is written to a temporary directory and deleted afterwards. Two things are
measured at every image size:

* the loader alone (:class:`magnet_jax.streaming.Loader`, what ``--input stream`` runs on
  the host): images/s of training batches of random rows, each image decoded, random
  resized crop + flip to the size (``--augment-crop``) and converted to float32, with
  0, 1 and 2 reading threads (``--loader-workers``);
* the train step of the ImageNet-pretrained EfficientNet-Lite0 (``--backbone
  efficientnet_lite0 --pretrained``, triplet loss, batch M·D = 12·4 = 48) as the trainer
  runs it: ``consume`` on a batch already read (the step alone), against ``run_steps`` with
  ``--input stream`` (the host reads every batch while the device runs the step before).
  The share of a streamed step that the step alone does not account for is the time the
  device waits for input. The two are timed alternately so that machine noise hits both.
  ``--model convnet`` times the small default convnet instead (a step that needs far less
  memory and time: an input-bound case). Each streamed call reads its first batch before
  its first step, as a training run does once per log/refresh/checkpoint interval, so
  ``--steps`` short calls overstate the wait a little.

On a CPU-only machine the "device" is the same CPU that decodes: the waiting share there
measures contention for the cores as much as the loader's speed. Writes
``results/input_pipeline.json`` (``input_pipeline_quick.json`` with --quick) with the load
average before and after; the machine may be shared, so compare numbers only within one
file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from magnet_jax import streaming, training
from magnet_jax.config import TrainConfig
from magnet_jax.data import load_dataset

# MAGNET_JAX_RESULTS redirects the output (the tests use it so CI leaves the repo clean).
RESULTS = Path(os.environ.get("MAGNET_JAX_RESULTS", Path(__file__).resolve().parent / "results"))
CLASSES = 12
BATCH = (12, 4)  # M classes x D examples: a batch of 48


def write_jpegs(root: Path, *, classes: int, per_class: int, side: tuple[int, int], seed: int):
    """``classes`` folders of ``per_class`` JPEGs (quality 90) of random size in ``side``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            height, width = rng.integers(side[0], side[1] + 1, size=2)
            # a smooth colour field (what JPEG compresses well) plus sensor-like noise
            coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
            field = np.asarray(
                Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR),
                np.float32,
            )
            noisy = field + rng.normal(0, 12, field.shape)
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
                folder / f"{i:03d}.jpg", quality=90
            )


def loader_rates(files, *, workers: list[int], batches: int, seed: int) -> list[dict]:
    """Images/s of training batches of random rows for every thread count, timed in turn
    (one batch with each count, then the next round) so that load changes hit all alike."""
    loaders = [streaming.Loader(files, workers=w, host_crop=True, seed=seed) for w in workers]
    rng = np.random.default_rng(seed)
    batch = BATCH[0] * BATCH[1]
    for loader in loaders:  # warm-up: imports, thread pools, the page cache
        loader.batch(rng.integers(0, len(files), batch), step=0)
    seconds = [[] for _ in workers]
    for step in range(1, batches + 1):
        indices = rng.integers(0, len(files), batch)
        for loader, times in zip(loaders, seconds):
            started = time.perf_counter()
            loader.batch(indices, step=step)
            times.append(time.perf_counter() - started)
    return [
        {
            "workers": count,
            "batch": batch,
            "batches": batches,
            "seconds_per_batch": times,
            "images_per_s": batch / statistics.median(times),
        }
        for count, times in zip(workers, seconds)
    ]


def step_rates(folder: Path, size: int, *, steps: int, repeats: int, model_name: str) -> dict:
    """Seconds per step of the step alone and of the streamed loop, alternately timed."""
    with tempfile.TemporaryDirectory() as workdir:
        model = (
            {"architecture": model_name}
            if model_name == "convnet"
            else {"backbone": model_name, "pretrained": True}
        )
        config = TrainConfig(
            dataset=f"folder:{folder}",
            image_size=size,
            loss="triplet",
            input="stream",
            augment_crop=True,
            clusters_per_batch=BATCH[0],
            examples_per_cluster=BATCH[1],
            steps=10_000,
            lr_schedule="constant",
            num_devices=1,
            workdir=workdir,
            **model,
        )
        run = training.prepare(config)
        state, method_state = run.initial_state, run.method.init_state(run.info)
        started = time.perf_counter()
        state, method_state, loss = run.steps.run_steps(state, method_state, run.data, 2)
        loss.block_until_ready()
        first = time.perf_counter() - started
        # The step alone: the same batch, already read and on the device.
        on_device = run.data._replace(x=None)
        batch = run.steps.sample(method_state, state.rng, int(state.step), on_device)
        rows, positions, _ = run.data.x.batch(np.asarray(batch.indices), int(state.step))
        replicated = NamedSharding(run.mesh, PartitionSpec())  # as the streamed loop places it
        rows, positions = jax.device_put((rows, positions), replicated)
        state, method_state, loss = run.steps.consume(state, method_state, batch, rows, positions)
        loss.block_until_ready()
        streamed, alone = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            state, method_state, loss = run.steps.run_steps(state, method_state, run.data, steps)
            loss.block_until_ready()
            streamed.append((time.perf_counter() - started) / steps)
            started = time.perf_counter()
            for _ in range(steps):
                state, method_state, loss = run.steps.consume(
                    state, method_state, batch, rows, positions
                )
            loss.block_until_ready()
            alone.append((time.perf_counter() - started) / steps)
    step_s, stream_s = statistics.median(alone), statistics.median(streamed)
    return {
        "model": model,
        "loader_workers": config.loader_workers,
        "first_two_steps_s": first,
        "step_alone_s": step_s,
        "step_alone_s_all": alone,
        "streamed_step_s": stream_s,
        "streamed_step_s_all": streamed,
        "step_images_per_s": BATCH[0] * BATCH[1] / step_s,
        "waiting_share": max(0.0, stream_s - step_s) / stream_s,
    }


def environment() -> dict:
    import grain
    from PIL import __version__ as pillow

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "grain": grain.__version__,
        "pillow": pillow,
        "git_commit": commit,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 64, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=24, help="JPEGs per class (12 classes)")
    parser.add_argument("--batches", type=int, default=8, help="loader batches timed per case")
    parser.add_argument("--steps", type=int, default=3, help="train steps per timing")
    parser.add_argument("--step-repeats", type=int, default=3, help="alternating timings")
    parser.add_argument(
        "--step-sizes", type=int, nargs="*", default=None, help="sizes with a step (default: all)"
    )
    parser.add_argument(
        "--model",
        default="efficientnet_lite0",
        choices=("efficientnet_lite0", "convnet"),
        help="the step's network: the pretrained backbone, or the small default convnet",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.per_class, args.batches = [32], 4, 2
        args.steps, args.step_repeats, side = 2, 1, (40, 60)
        args.model = "convnet"
    else:
        side = (300, 500)

    load_before = list(os.getloadavg())
    path = RESULTS / ("input_pipeline_quick.json" if args.quick else "input_pipeline.json")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        write_jpegs(folder, classes=CLASSES, per_class=args.per_class, side=side, seed=0)
        for size in args.sizes:
            files = load_dataset(f"folder:{folder}", image_size=size, lazy=True).x_train
            row = {"image_size": size, "train_images": len(files)}
            row["loader"] = loader_rates(
                files, workers=args.workers, batches=args.batches, seed=size
            )
            for rate in row["loader"]:
                print(
                    f"{size}px loader, {rate['workers']} workers: "
                    f"{rate['images_per_s']:.0f} images/s",
                    flush=True,
                )
            if args.step_sizes is None or size in args.step_sizes:
                row["train_step"] = step_rates(
                    folder, size, steps=args.steps, repeats=args.step_repeats, model_name=args.model
                )
                step = row["train_step"]
                print(
                    f"{size}px step alone {step['step_alone_s']:.3f} s "
                    f"({step['step_images_per_s']:.0f} images/s), streamed "
                    f"{step['streamed_step_s']:.3f} s: waiting {100 * step['waiting_share']:.0f}%",
                    flush=True,
                )
            rows.append(row)
            # written after every size: the 224 px step is slow on a CPU
            result = {
                "benchmark": "input_pipeline",
                "quick": args.quick,
                "complete": len(rows) == len(args.sizes),
                "environment": environment(),
                "load_average_before": load_before,
                "load_average_after": list(os.getloadavg()),
                "jpeg_side_px": list(side),
                "rows": rows,
            }
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
