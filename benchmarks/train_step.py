"""The Magnet Loss's overhead per step, and the cost of a refresh.

    python benchmarks/train_step.py                 # Fashion-MNIST, convnet, M=12, D=4 (~3 min on 2 cores)
    python benchmarks/train_step.py --quick         # digits, MLP, seconds (CI smoke test)

Measures, in one process and interleaved so that machine noise hits both alike:
- the Magnet train step (on-device neighbourhood sampling, gather, magnet loss, loss
  recording into the index) against a plain softmax step with the same network and batch
  size (uniform sampling, cross-entropy). Target: ratio <= 1.10. Also the step with
  ``--embedding-memory`` one refresh period (it also writes the batch's embeddings into the
  memory).
- the neighbourhood sampler alone, per call.
- a refresh as a fraction of an epoch of Magnet steps, both ways: the default, the paper's
  (embed the whole training set + k-means in every class), and with the memory after one
  refresh period of steps (embed only the examples those steps did not draw, reuse the
  memory's rows for the others). Target: <= 10%.

Writes benchmarks/results/train_step.json (or train_step_quick.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from magnet_jax import index as index_lib
from magnet_jax import training
from magnet_jax.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

# MAGNET_JAX_RESULTS redirects the output (the tests use it so CI leaves the repo clean).
RESULTS = Path(os.environ.get("MAGNET_JAX_RESULTS", Path(__file__).resolve().parent / "results"))


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets")
    )
    parser.add_argument("--steps", type=int, default=None, help="steps per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--eval-chunk-sizes",
        type=int,
        nargs="*",
        default=[],
        help="also time the refresh's embedding with these --eval-chunk-size values (the "
        "default chunk suits a CPU's cache; a GPU may want larger launches)",
    )
    args = parser.parse_args(argv)

    if args.quick:
        common = dict(
            dataset="digits", clusters_per_batch=8, examples_per_cluster=8, clusters_per_class=4
        )
        steps_per_call = args.steps or 50
    else:
        common = dict(
            dataset="fashion_mnist",
            data_dir=args.data_dir,
            clusters_per_batch=12,
            examples_per_cluster=4,
            clusters_per_class=8,
        )
        steps_per_call = args.steps or 100
    magnet = training.prepare(TrainConfig(loss="magnet", **common))
    period = magnet.refresh_every  # steps between two refreshes: an epoch
    memory = training.prepare(
        TrainConfig(loss="magnet", embedding_memory=period, **common), dataset=magnet.dataset
    )
    softmax = training.prepare(TrainConfig(loss="softmax", **common), dataset=magnet.dataset)
    num_examples = len(magnet.dataset.y_train)
    batch_size = magnet.config.batch_size

    # Warm up: compile everything once (not timed).
    magnet_state, memory_state = magnet.initial_state, memory.initial_state
    softmax_state = softmax.initial_state
    index = training.refresh(magnet, magnet_state, None, 0)
    memory_index = training.refresh(memory, memory_state, None, 0)
    n = jnp.asarray(steps_per_call, jnp.int32)
    magnet_state, index, _ = magnet.steps.run_steps(magnet_state, index, magnet.data, n)
    memory_state, memory_index, _ = memory.steps.run_steps(
        memory_state, memory_index, memory.data, n
    )
    softmax_state, _, _ = softmax.steps.run_steps(softmax_state, None, softmax.data, n)

    magnet_times, memory_times, softmax_times = [], [], []
    for _ in range(args.repeats):  # interleaved
        start = time.perf_counter()
        magnet_state, index, loss = magnet.steps.run_steps(magnet_state, index, magnet.data, n)
        jax.block_until_ready(loss)
        magnet_times.append((time.perf_counter() - start) / steps_per_call)
        start = time.perf_counter()
        memory_state, memory_index, loss = memory.steps.run_steps(
            memory_state, memory_index, memory.data, n
        )
        jax.block_until_ready(loss)
        memory_times.append((time.perf_counter() - start) / steps_per_call)
        start = time.perf_counter()
        softmax_state, _, loss = softmax.steps.run_steps(softmax_state, None, softmax.data, n)
        jax.block_until_ready(loss)
        softmax_times.append((time.perf_counter() - start) / steps_per_call)

    draws = 1000

    @jax.jit
    def sample_many(index, key):
        def body(i, total):
            batch = index_lib.sample_neighbourhood(
                index,
                jax.random.fold_in(key, i),
                clusters_per_batch=magnet.config.clusters_per_batch,
                examples_per_cluster=magnet.config.examples_per_cluster,
            )
            return total + batch.indices.sum()

        return jax.lax.fori_loop(0, draws, body, jnp.zeros((), jnp.int32))

    key = jax.random.PRNGKey(0)
    sample_many(index, key).block_until_ready()
    sampler_times = [t / draws for t in _time(lambda: sample_many(index, key), args.repeats)]

    # A whole refresh, its embedding pass alone, its clustering alone (the index rebuilt
    # from embeddings computed beforehand) and a call of Magnet steps, interleaved so that
    # all of them see the same machine: the refresh / epoch ratio of every repeat then
    # compares times taken seconds apart.
    embeddings = magnet.steps.embed(magnet_state.params, magnet.data.x)
    # The steps donate their state: they run on a copy of the one the refresh embeds with.
    stepped = jax.tree.map(jnp.copy, {"state": magnet_state, "index": index})

    def steps():
        stepped["state"], stepped["index"], loss = magnet.steps.run_steps(
            stepped["state"], stepped["index"], magnet.data, n
        )
        return loss

    def cluster():
        new_index, _ = magnet.method.refresh(
            index,
            embed=lambda params, x: embeddings,
            params=magnet_state.params,
            data=magnet.data,
            key=jax.random.key(1),
        )
        return new_index.centroids

    parts = {
        "steps": steps,
        "refresh": lambda: training.refresh(magnet, magnet_state, index, 1).centroids,
        "embed": lambda: magnet.steps.embed(magnet_state.params, magnet.data.x),
        "cluster": cluster,
    }
    for part in parts.values():
        jax.block_until_ready(part())  # compile
    times = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, part in parts.items():
            times[name] += _time(part, 1)
    refresh_times, embed_times = times["refresh"], times["embed"]
    paired_fractions = [
        refresh / (steps / steps_per_call * num_examples / batch_size)
        for refresh, steps in zip(refresh_times, times["steps"])
    ]

    # The memory's refresh where a run makes it: after one refresh period of steps, whose
    # embeddings the memory holds.
    memory_state, memory_index, _ = memory.steps.run_steps(
        memory_state, memory_index, memory.data, jnp.asarray(period, jnp.int32)
    )
    at = int(memory_state.step)
    _, report = training.refresh(memory, memory_state, memory_index, at, with_diagnostics=True)
    embedded_rows = report["embedded_rows"]  # the examples the period's steps did not draw
    memory_refresh_times = _time(
        lambda: training.refresh(memory, memory_state, memory_index, at).centroids, args.repeats
    )

    # The same parameters embedded in chunks of other sizes (a run prepared per size).
    embed_by_chunk = {magnet.config.eval_chunk_size: statistics.median(embed_times)}
    for chunk in args.eval_chunk_sizes:
        if chunk in embed_by_chunk:
            continue
        other = training.prepare(
            TrainConfig(loss="magnet", eval_chunk_size=chunk, **common), dataset=magnet.dataset
        )
        embed_all = functools.partial(other.steps.embed, magnet_state.params, other.data.x)
        embed_all().block_until_ready()  # compile
        embed_by_chunk[chunk] = statistics.median(_time(embed_all, args.repeats))

    magnet_step = statistics.median(magnet_times)
    memory_step = statistics.median(memory_times)
    softmax_step = statistics.median(softmax_times)
    epoch_seconds = magnet_step * num_examples / batch_size
    refresh_seconds = statistics.median(refresh_times)
    memory_refresh_seconds = statistics.median(memory_refresh_times)
    result = {
        "benchmark": "train_step",
        "quick": args.quick,
        "dataset": magnet.config.dataset,
        "architecture": training.default_architecture(magnet.dataset.x_train.shape[1:]),
        "batch": {
            "clusters_per_batch": magnet.config.clusters_per_batch,
            "examples_per_cluster": magnet.config.examples_per_cluster,
            "batch_size": batch_size,
        },
        "clusters_per_class": magnet.config.clusters_per_class,
        "num_train_examples": num_examples,
        "magnet_step_seconds": magnet_step,
        "magnet_with_memory_step_seconds": memory_step,
        "softmax_step_seconds": softmax_step,
        "magnet_over_softmax": magnet_step / softmax_step,
        "magnet_with_memory_over_softmax": memory_step / softmax_step,
        "sampler_seconds": statistics.median(sampler_times),
        "sampler_fraction_of_magnet_step": statistics.median(sampler_times) / magnet_step,
        "refresh_seconds": refresh_seconds,
        "embed_seconds": statistics.median(embed_times),
        "kmeans_seconds": statistics.median(times["cluster"]),
        "epoch_seconds": epoch_seconds,
        "refresh_fraction_of_epoch": refresh_seconds / epoch_seconds,
        # Each repeat's refresh over an epoch at the step time of the call just before it.
        "refresh_fraction_of_epoch_paired": {
            **_common.spread(paired_fractions),
            "repeats": paired_fractions,
        },
        "refresh_period_steps": period,
        "memory_stale_rows": embedded_rows,
        "memory_refresh_seconds": memory_refresh_seconds,
        "memory_refresh_fraction_of_epoch": memory_refresh_seconds / epoch_seconds,
        "embed_seconds_by_eval_chunk_size": {str(c): t for c, t in embed_by_chunk.items()},
        "targets": {"magnet_over_softmax": 1.10, "refresh_fraction_of_epoch": 0.10},
        "raw": {
            "magnet": magnet_times,
            "magnet_with_memory": memory_times,
            "softmax": softmax_times,
            "refresh": refresh_times,
            "memory_refresh": memory_refresh_times,
            "embed": embed_times,
            "kmeans": times["cluster"],
            "magnet_beside_refresh": [t / steps_per_call for t in times["steps"]],
        },
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("train_step_quick.json" if args.quick else "train_step.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| {result['dataset']} ({result['platform']}, {result['device']}) | value |")
    print("|---|---|")
    print(f"| magnet step | {magnet_step * 1e3:.2f} ms |")
    print(f"| softmax step | {softmax_step * 1e3:.2f} ms |")
    print(f"| magnet / softmax | {result['magnet_over_softmax']:.3f} (target <= 1.10) |")
    print(
        f"| magnet step, --embedding-memory {period} | {memory_step * 1e3:.2f} ms "
        f"({result['magnet_with_memory_over_softmax']:.3f} of softmax) |"
    )
    print(
        f"| sampler alone | {result['sampler_seconds'] * 1e6:.1f} µs ({result['sampler_fraction_of_magnet_step']:.1%} of a step) |"
    )
    print(
        f"| refresh (embed {result['embed_seconds']:.2f} s + k-means {result['kmeans_seconds']:.2f} s) | {refresh_seconds:.2f} s |"
    )
    paired = result["refresh_fraction_of_epoch_paired"]
    print(f"| refresh / epoch | {result['refresh_fraction_of_epoch']:.1%} (target <= 10%) |")
    print(
        f"| refresh / epoch, each refresh beside a call of steps | median {paired['median']:.1%} "
        f"({paired['low']:.1%}-{paired['high']:.1%}) |"
    )
    print(
        f"| refresh, --embedding-memory {period}, after {period} steps (embeds {embedded_rows:,} of "
        f"{num_examples:,} rows) | {memory_refresh_seconds:.2f} s, "
        f"{result['memory_refresh_fraction_of_epoch']:.1%} of an epoch |"
    )
    for chunk, seconds in embed_by_chunk.items():
        print(f"| embed, --eval-chunk-size {chunk} | {seconds:.3f} s |")
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
