"""The training program: mesh, input, sharded train step, and the host loop.

Data flow, one direction::

    dataset ──indices──▶ method.sample(method state) ──batch──▶ train_step ──▶ TrainState
                              ▲  method.update(stats) ◀──────────────┘
    every refresh: method.refresh(embed all, sharded) ──▶ new method state

The training method (:mod:`magnet_jax.methods`: the Magnet loss with its cluster index,
the pair, triplet and classification losses) is a value; its state is an opaque pytree
to the trainer. Everything numeric is a jitted pure function of explicit pytrees
(:class:`TrainState`, the method state, :class:`~magnet_jax.methods.TrainingData`).
The host loop in :func:`train` only decides when to refresh, evaluate, log and
checkpoint, never what a refresh does. Steps between two such events are dispatched asynchronously, one jitted call
each; the host waits only when it logs.

Sharding: one ``data`` mesh axis over all devices (all hosts after
``jax.distributed.initialize()``). Parameters, optimizer state, the method state and the
training set are replicated; the sampled batch is constrained to be split along ``data``,
so the forward and backward passes are data-parallel and XLA inserts the collectives. The
loss is the loss of the global batch whatever the number of devices.

Input: ``--input memory`` holds the training set on every device and the step gathers its
batch there; ``--input stream`` keeps it on the host and reads each batch's rows there
(:mod:`magnet_jax.streaming`), the step split into a jitted sampler and a step that
consumes the rows read; ``--input auto`` (the default) picks one of them once, before
training, from the data's size (:func:`resolve_input`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from magnet_jax import (
    augment,
    distributed,
    embedding_memory,
    finite,
    input_choice,
    methods,
    sampling,
    streaming,
)
from magnet_jax.backbones import finetune
from magnet_jax.backbones import trainer as backbone_trainer
from magnet_jax.checkpoint import Checkpointer
from magnet_jax.config import TrainConfig
from magnet_jax.data import Dataset, load_dataset
from magnet_jax.data.lazy import is_lazy
from magnet_jax.evaluators import EvalContext, default_evaluators, run_evaluators
from magnet_jax.evaluators import fine_label_errors as fine_label_errors
from magnet_jax.methods import DataInfo, Method, TrainingData
from magnet_jax.models import create_model, default_architecture
from magnet_jax.warm_start import WarmStart, find_init_checkpoint, warm_start_params
from magnet_jax.workdir import (
    StopOnInterrupt,
    TrainingInterrupted,
    Workdir,
    check_same_run,
    device_record,
    keep_input,
)

_AUGMENT_STREAM = 0x617567  # folded into a step's key for its augmentations
_CROP_STREAM = 0x63726F70  # folded into a step's key for its random resized crops


@struct.dataclass
class TrainState:
    """Everything that changes from step to step, as one pytree.

    Attributes:
        step: [] int32, the number of steps taken.
        params: nested dict of parameter arrays (``nnx.to_pure_dict`` of the model).
        opt_state: the Optax optimizer state.
        rng: [2] uint32 base key; step ``t`` uses ``fold_in(rng, t)``, so the randomness of
            a step depends only on the seed and the step number (exact resume).
        memory: the embeddings the steps computed (``--embedding-memory``, see
            :mod:`magnet_jax.embedding_memory`); None without it.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    memory: embedding_memory.EmbeddingMemory | None = None


class StepFunctions(NamedTuple):
    """The jitted functions of a run.

    run_steps: (state, method_state, data, num_steps) -> (state, method_state, mean loss []),
        the jitted step called ``num_steps`` times; state and method state are donated.
    train_step: one step, (state, method_state, data) -> (state, method_state, loss []).
    embed: (params, x [N, ...]) -> embeddings [N, d], in jitted chunks sharded over ``data``;
        ``x`` may be a :class:`~magnet_jax.streaming.Loader` (``--input stream``), whose
        chunks are read on the host and prefetched.
    sample: (method_state, rng [2], step [], data) -> the batch of step ``step`` (its
        ``indices`` [B]), the first half of ``train_step``, jitted.
    consume: (state, method_state, batch, rows [B, ...], positions [B]) -> (state,
        method_state, loss []), the second half: the step on the batch ``rows[positions]``
        read on the host (:meth:`magnet_jax.streaming.Loader.batch`).
    run_steps_with_metrics: as ``run_steps``, returning also the mean over the steps of
        each of the method's step metrics (:meth:`~magnet_jax.methods.Method.step_metrics`),
        ``{name: []}``.
    embed_into: (params, x, rows [R] host ints, into [N, d]) -> a copy of ``into`` with
        the rows ``rows`` of ``x`` embedded (``--embedding-memory``).
    """

    run_steps: Any
    train_step: Any
    embed: Any
    sample: Any = None
    consume: Any = None
    run_steps_with_metrics: Any = None
    embed_into: Any = None


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``data`` mesh over the first ``num_devices`` devices (default: all)."""
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if num_devices > len(devices):
        raise ValueError(
            f"num_devices={num_devices} but only {len(devices)} devices are available: {devices}"
        )
    return Mesh(np.asarray(devices[:num_devices]), ("data",))


def make_optimizer(config: TrainConfig, labels: Any = None) -> optax.GradientTransformation:
    """Adam (or SGD with momentum 0.9) with a constant or cosine-decayed learning rate.

    With ``labels`` (a ``--backbone`` run's :func:`magnet_jax.backbones.finetune.param_labels`),
    the backbone's learning rate is ``lr x backbone_lr_multiplier`` and frozen leaves get
    exactly zero updates."""
    lr = (
        optax.cosine_decay_schedule(config.lr, config.steps)
        if config.lr_schedule == "cosine"
        else config.lr
    )
    if labels is not None:
        return finetune.finetune_optimizer(
            lambda lr: _base_optimizer(config, lr),
            lr,
            labels,
            backbone_lr_multiplier=config.backbone_lr_multiplier,
        )
    return _base_optimizer(config, lr)


def _base_optimizer(config: TrainConfig, lr) -> optax.GradientTransformation:
    if config.optimizer == "sgd":
        sgd = optax.sgd(lr, momentum=0.9)
        return (
            optax.chain(optax.add_decayed_weights(config.weight_decay), sgd)
            if config.weight_decay > 0
            else sgd
        )
    if config.weight_decay > 0:
        return optax.adamw(lr, weight_decay=config.weight_decay)
    return optax.adam(lr)


def model_params(params: dict) -> dict:
    """The model's part of the run's parameters (without a method's own, see
    :meth:`magnet_jax.methods.Method.init_params`)."""
    return (
        {k: v for k, v in params.items() if k != _METHOD_PARAMS}
        if _METHOD_PARAMS in params
        else params
    )


_METHOD_PARAMS = "method"  # the key of a method's own parameters in TrainState.params


class _Means:
    """Running sums of the loss and the step metrics of a stretch of steps, on device."""

    def __init__(self):
        self.loss, self.metrics = jnp.zeros(()), None

    def add(self, loss: jax.Array, metrics: dict) -> None:
        self.loss = self.loss + loss
        self.metrics = (
            metrics if self.metrics is None else jax.tree.map(jnp.add, self.metrics, metrics)
        )

    def result(self, num_steps: int) -> tuple[jax.Array, dict]:
        """(mean loss [], {name: mean []}) over ``num_steps`` steps."""
        count = max(num_steps, 1)
        return self.loss / count, {k: v / count for k, v in (self.metrics or {}).items()}


def build_step_functions(
    method: Method,
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    config: TrainConfig,
    mesh: Mesh,
    setup: backbone_trainer.FinetuneSetup | None = None,
    *,
    host_crop: bool = False,
) -> StepFunctions:
    """Builds the jitted train step, its multi-step loop and the chunked embedding.

    ``setup`` (``--backbone`` runs): frozen leaves are kept out of the backward pass, the
    step runs ``setup.train_graphdef`` and, with ``train_bn``, keeps the batch statistics
    that its forward pass computed. ``host_crop``: ``--augment-crop`` is done by the
    streaming loader on the host (image files), not on the device."""
    num_devices = mesh.devices.size
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    device_crop = config.augment_crop and not host_crop

    def train_step(state: TrainState, method_state, data: TrainingData):
        key = jax.random.fold_in(state.rng, state.step)
        batch = method.sample(method_state, key, data)
        return step_on_batch(state, method_state, batch, data.x[batch.indices], key)

    def sample_step(method_state, rng, step, data: TrainingData):
        return method.sample(method_state, jax.random.fold_in(rng, step), data)

    def consume_step(state: TrainState, method_state, batch, rows, positions):
        key = jax.random.fold_in(state.rng, state.step)
        return step_on_batch(state, method_state, batch, rows[positions], key)

    def consume_current_step(state: TrainState, method_state, data: TrainingData, rows, read):
        # --sample-ahead 0: the batch is drawn again inside the step, from the state it was
        # drawn from on the host, so that the program is train_step's (XLA simplifies the
        # loss for the batch's known structure, e.g. the Magnet loss's D repeated cluster
        # ids) but with rows read on the host: the same numbers as the in-memory input.
        key = jax.random.fold_in(state.rng, state.step)
        batch = method.sample(method_state, key, data)
        if host_crop:  # one crop per position, in batch order
            inputs = rows
        else:  # read: the distinct rows, sorted (padded with the largest int32)
            inputs = rows[jnp.searchsorted(read, batch.indices)]
        return step_on_batch(state, method_state, batch, inputs, key)

    def step_on_batch(state: TrainState, method_state, batch, inputs, key):
        if config.augment_shift:
            inputs = augment.random_shift(
                jax.random.fold_in(key, _AUGMENT_STREAM), inputs, config.augment_shift
            )
        if device_crop:
            inputs = augment.random_resized_crop_flip(jax.random.fold_in(key, _CROP_STREAM), inputs)
        inputs = jax.lax.with_sharding_constraint(inputs, batch_sharding)

        def loss_of(params):
            if setup is None:
                model = nnx.merge(graphdef, nnx.State(model_params(params)))
            else:
                params = finetune.stop_frozen_gradients(params, setup.labels)
                model = nnx.merge(setup.train_graphdef, nnx.State(model_params(params)))
            embeddings = model(inputs)
            loss, stats = method.loss(model, params, embeddings, batch)
            # --train-bn: the batch statistics the forward pass computed, kept after the update
            batch_stats = finetune.updated_batch_stats(model) if config.train_bn else None
            return loss, (stats, batch_stats, embeddings)

        (loss, (stats, batch_stats, embeddings)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if batch_stats is not None:
            params = finetune.with_batch_stats(params, batch_stats)
        method_state = method.update(method_state, batch, stats, params)
        memory = state.memory
        if memory is not None:
            memory = embedding_memory.remember(memory, batch.indices, embeddings, state.step)
        new_state = TrainState(state.step + 1, params, opt_state, state.rng, memory)
        return new_state, method_state, loss, method.step_metrics(stats)

    jitted_step = jax.jit(train_step, donate_argnums=(0, 1))
    jitted_sample = jax.jit(sample_step)
    jitted_consume = jax.jit(consume_step, donate_argnums=(0, 1))
    jitted_consume_current = jax.jit(consume_current_step, donate_argnums=(0, 1))

    # The public one-step functions keep returning (state, method_state, loss); the step
    # metrics are read by the multi-step loops.
    def one_step(state: TrainState, method_state, data: TrainingData):
        state, method_state, loss, _ = jitted_step(state, method_state, data)
        return state, method_state, loss

    def consume_one(state: TrainState, method_state, batch, rows, positions):
        state, method_state, loss, _ = jitted_consume(state, method_state, batch, rows, positions)
        return state, method_state, loss

    # XLA:CPU runs the per-device parts of all dispatched programs, and the intra-op work
    # of their convolutions, on one shared thread pool. With several CPU devices, a program
    # whose device-0 part waits in a collective can hold the thread that device 1's part of
    # the previous program needs: a deadlock (seen with 2 CPU devices on 2 cores, on
    # consecutive train steps and on independent embedding chunks). So on a multi-device
    # CPU every program is finished before the next is dispatched; GPUs and TPUs queue
    # programs per device and keep asynchronous dispatch.
    serialize = num_devices > 1 and mesh.devices.flat[0].platform == "cpu"

    def run_steps_with_metrics(state: TrainState, method_state, data: TrainingData, num_steps):
        # A host loop over the jitted step rather than one jitted fori_loop: XLA on CPU runs
        # convolutions inside a while-loop body ~10x slower (measured: the Fashion-MNIST
        # convnet at batch 48, 208 ms vs 17-21 ms per step), and asynchronous dispatch keeps
        # the host off the critical path (the MLP on digits: 0.6 vs 0.7 ms per step).
        num_steps = int(num_steps)
        means = _Means()
        for _ in range(num_steps):
            state, method_state, loss, metrics = jitted_step(state, method_state, data)
            if serialize:
                loss.block_until_ready()
            means.add(loss, metrics)
        return state, method_state, *means.result(num_steps)

    def run_stream_steps(state: TrainState, method_state, data: TrainingData, num_steps):
        """``run_steps_with_metrics`` with ``data.x`` a :class:`~magnet_jax.streaming.Loader`.

        The batch of step ``t`` is drawn from the method state entering step
        ``t - sample_ahead`` (but never from one before this call's first step), so that its
        rows are read on the host while the device still runs step ``t - 1``. With
        ``--sample-ahead 1`` (the default) the Magnet loss's seed clusters are thus chosen
        from cluster losses one step old; ``--sample-ahead 0`` draws every batch from the
        current state, as the in-memory input does (the same batches), and the device waits
        for each read. Calls start where the host loop's events are (log, refresh,
        evaluation, checkpoint), so a resumed run draws the same batches.
        """
        loader, ahead = data.x, config.sample_ahead
        on_device = data._replace(x=None)
        start = int(state.step)
        end = start + int(num_steps)
        drawn = {
            t: jitted_sample(method_state, state.rng, t, on_device)
            for t in range(start, min(start + ahead, end))
        }
        read = {}

        def load(t):
            rows, positions, read = loader.batch(np.asarray(jax.device_get(drawn[t].indices)), t)
            return jax.device_put((rows, positions, read), replicated)

        means = _Means()
        for t in range(start, end):
            if t + ahead < end:  # before the step below donates this method state
                drawn[t + ahead] = jitted_sample(method_state, state.rng, t + ahead, on_device)
            rows, positions, rows_read = read.pop(t) if t in read else load(t)
            if ahead == 0:
                drawn.pop(t)
                state, method_state, loss, metrics = jitted_consume_current(
                    state, method_state, on_device, rows, rows_read
                )
            else:
                state, method_state, loss, metrics = jitted_consume(
                    state, method_state, drawn.pop(t), rows, positions
                )
            if t + 1 in drawn:  # read the next batch while the device runs this step
                read[t + 1] = load(t + 1)
            if serialize:
                loss.block_until_ready()
            means.add(loss, metrics)
        return state, method_state, *means.result(end - start)

    def run_any_steps_with_metrics(state: TrainState, method_state, data: TrainingData, num_steps):
        if isinstance(data.x, streaming.Loader):
            return run_stream_steps(state, method_state, data, num_steps)
        return run_steps_with_metrics(state, method_state, data, num_steps)

    def run_any_steps(state: TrainState, method_state, data: TrainingData, num_steps):
        state, method_state, loss, _ = run_any_steps_with_metrics(
            state, method_state, data, num_steps
        )
        return state, method_state, loss

    # The embedding output stays sharded like the input rows: a per-row model needs no
    # collective inside a chunk.
    @functools.partial(jax.jit, static_argnames="chunk")
    def embed_chunk(params, x: jax.Array, start: jax.Array, chunk: int) -> jax.Array:
        return embed_rows(params, jax.lax.dynamic_slice_in_dim(x, start, chunk))

    def embed_rows(params, rows: jax.Array) -> jax.Array:
        chunk = rows.shape[0]
        if device_crop:  # the evaluation view of what training crops at random
            rows = augment.center_crop(rows)
        sharding = batch_sharding if chunk % num_devices == 0 else replicated
        rows = jax.lax.with_sharding_constraint(rows, sharding)
        embeddings = nnx.merge(graphdef, nnx.State(model_params(params)))(rows)
        return jax.lax.with_sharding_constraint(embeddings, sharding)

    jitted_embed_rows = jax.jit(embed_rows)

    def embed_one(params, x, start, chunk):
        out = embed_chunk(params, x, start, chunk)
        return out.block_until_ready() if serialize else out

    def embed(params, x: jax.Array) -> jax.Array:
        """Embeds ``x [N, ...]`` → ``[N, E]`` (replicated on the mesh) in fixed-size chunks."""
        # One compilation for all chunks, dispatched from the host: on CPU a lax.map over
        # the chunks ran 1.5x slower (the while-loop penalty of run_steps). The last chunk
        # is shifted back to end at N and overlaps the one before it.
        num_examples = x.shape[0] if not isinstance(x, streaming.Loader) else len(x)
        chunk = min(config.eval_chunk_size, num_examples)
        starts = list(range(0, num_examples - chunk + 1, chunk))
        covered = starts[-1] + chunk
        if covered < num_examples:
            starts.append(num_examples - chunk)
        if isinstance(x, streaming.Loader):
            # The same chunks as in memory, read on the host (the next while this one embeds).
            parts = []
            for rows in x.chunks(starts, chunk):
                out = jitted_embed_rows(params, to_rows_array(rows, chunk))
                parts.append(out.block_until_ready() if serialize else out)
        else:
            parts = [embed_one(params, x, start, chunk) for start in starts]
        if covered < num_examples:
            parts[-1] = parts[-1][chunk - (num_examples - covered) :]
        return jax.device_put(jnp.concatenate(parts, axis=0), replicated)

    # --embedding-memory: chosen rows embedded into a copy of the memory, chunk by chunk;
    # `source` is the whole training set (gather=True) or the chunk's rows read on the host.
    @functools.partial(jax.jit, static_argnames="gather", donate_argnums=2)
    def embed_chunk_into(params, source: jax.Array, into: jax.Array, rows: jax.Array, gather):
        inputs = source[rows] if gather else source
        return into.at[rows].set(embed_rows(params, inputs).astype(into.dtype))

    def embed_into(params, x, rows: np.ndarray, into: jax.Array) -> jax.Array:
        """``into`` [N, E] with the rows ``rows`` (host ints) of ``x`` [N, ...] (or a
        :class:`~magnet_jax.streaming.Loader`) replaced by their embeddings, computed in
        chunks of ``--eval-chunk-size`` (the last padded by repeating its final row)."""
        into = jnp.copy(into)  # the chunks below update it in place; the caller's stays
        if rows.size == 0:
            return into
        chunk = min(config.eval_chunk_size, rows.size)
        padded = np.concatenate([rows, np.full(-rows.size % chunk, rows[-1])]).astype(np.int32)
        pieces = [padded[start : start + chunk] for start in range(0, padded.size, chunk)]
        stream = isinstance(x, streaming.Loader)
        reads = x.rows_in_chunks(padded, chunk) if stream else [None] * len(pieces)
        for piece, read in zip(pieces, reads):
            source = to_rows_array(read, chunk) if stream else x
            into = embed_chunk_into(
                params, source, into, to_rows_array(piece, chunk), gather=not stream
            )
            if serialize:
                into.block_until_ready()
        return jax.device_put(into, replicated)

    def to_rows_array(host: np.ndarray, chunk: int) -> jax.Array:
        sharding = batch_sharding if chunk % num_devices == 0 else replicated
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return StepFunctions(
        run_steps=run_any_steps,
        train_step=one_step,
        embed=embed,
        embed_into=embed_into,
        sample=jitted_sample,
        consume=consume_one,
        run_steps_with_metrics=run_any_steps_with_metrics,
    )


# --------------------------------------------------------------------------------------
# Setting up a run: every check happens here, before the work directory is touched.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A prepared run: data on device, the model's structure, the jitted functions."""

    config: TrainConfig
    dataset: Dataset
    method: Method
    info: DataInfo
    mesh: Mesh
    graphdef: Any
    optimizer: optax.GradientTransformation
    steps: StepFunctions
    data: TrainingData  # data.x: a streaming.Loader with --input stream
    x_test: jax.Array  # a streaming.Loader with --input stream
    initial_state: TrainState
    warm_start: WarmStart | None = None  # what --init-from copied into initial_state
    finetune: backbone_trainer.FinetuneSetup | None = None  # --backbone runs
    input_choice: str | None = None  # --input auto: the mode chosen and why (resolve_input)

    @property
    def refresh_every(self) -> int:
        if self.config.refresh_every is not None:
            return self.config.refresh_every
        return max(1, math.ceil(self.info.num_examples / self.config.batch_size))

    def model(self, params):
        """The model with ``params`` (the run's, or a checkpoint's) merged in."""
        return nnx.merge(self.graphdef, nnx.State(model_params(params)))


def _check_against_data(
    config: TrainConfig, dataset: Dataset, method: Method, info: DataInfo, num_devices: int
) -> None:
    if config.batch_size % num_devices:
        raise ValueError(
            f"the batch of M·D = {config.clusters_per_batch}·{config.examples_per_cluster} = "
            f"{config.batch_size} examples cannot be split evenly over {num_devices} devices; "
            f"choose M and D so that M·D is a multiple of {num_devices}"
        )
    if config.augment_shift and dataset.x_train.ndim != 4:
        raise ValueError(
            f"--augment-shift {config.augment_shift} translates images [N, H, W, C], but "
            f"{dataset.name} has examples of shape {dataset.x_train.shape[1:]}"
        )
    if config.augment_crop and dataset.x_train.ndim != 4:
        raise ValueError(
            f"--augment-crop crops images [N, H, W, C], but {dataset.name} has examples of "
            f"shape {dataset.x_train.shape[1:]}"
        )
    if config.embedding_memory and not method.refresh_embeds_model:
        why = (
            "has no refresh"
            if not method.has_refresh
            else "refreshes from embeddings of another network than the one the steps train"
        )
        raise ValueError(
            f"--embedding-memory reuses the train steps' embeddings at a refresh; "
            f"--loss {config.loss} {why}"
        )
    method.check_data(info)


def data_info(config: TrainConfig, dataset: Dataset, method_class: type[Method]) -> DataInfo:
    """What the method may know of ``dataset`` (no labels for a label-free method)."""
    return DataInfo(
        num_examples=int(dataset.x_train.shape[0]),
        num_classes=dataset.num_classes,
        class_names=dataset.class_names,
        labels=np.asarray(dataset.y_train) if method_class.needs_labels else None,
        embedding_dim=config.embedding_dim,
    )


def resolve_input(
    config: TrainConfig, dataset: Dataset | None = None
) -> tuple[TrainConfig, Dataset | None, str | None]:
    """``config`` with ``--input auto`` resolved to memory or stream
    (:mod:`magnet_jax.input_choice`), from ``dataset`` or the data it names.

    Returns:
      ``(config, dataset, line)``: the config with ``input`` ``"memory"`` or ``"stream"``;
      the dataset loaded for it (None: :func:`prepare` loads it); the line saying which
      and why (None when ``config.input`` was not ``auto``, and nothing was loaded).
    """
    if config.input != "auto":
        return config, dataset, None
    blocker = input_choice.stream_blocker(config)
    loaded = dataset is None
    if loaded:
        # Image files are listed without decoding them (their decoded size is known).
        probe = dataclasses.replace(config, input="memory" if blocker else "stream")
        dataset = load_dataset(config.dataset, config.data_dir, **probe.load_options())
    devices = list(make_mesh(config.num_devices).devices.flat)
    choice = input_choice.choose(
        input_choice.memory_mode_bytes(dataset.x_train, dataset.x_test),
        input_choice.device_budget(devices),
        blocker=blocker,
    )
    if jax.process_count() > 1:  # the hosts' memories may differ: process 0 decides for all
        from jax.experimental import multihost_utils

        stream = bool(multihost_utils.broadcast_one_to_all(np.int32(choice.input == "stream")))
        choice = choice._replace(input="stream" if stream else "memory")
    if loaded and choice.input == "memory" and is_lazy(dataset.x_train):
        dataset = None  # decoded by prepare (which also skips undecodable files when asked)
    line = f"--input auto: {choice.input} ({choice.reason})"
    return dataclasses.replace(config, input=choice.input), dataset, line


def prepare(config: TrainConfig, dataset: Dataset | None = None, *, warm_start: bool = True) -> Run:
    """Loads the data, builds the model and the jitted functions; raises on bad input.

    With ``config.init_from`` and ``warm_start`` (the default), the initial parameters are
    those of a fresh model with every leaf that the source run's latest checkpoint has at
    the same path and shape copied in (:func:`magnet_jax.warm_start.graft_params`); the optimizer state is
    initialised from them, and ``run.warm_start`` says what was copied. :func:`train`
    passes ``warm_start=False`` when it resumes the run's own checkpoint, which already
    holds the warm-started parameters.
    """
    config.validate()
    # The source is looked up before the data is loaded: a mistyped path fails at once.
    source = (
        find_init_checkpoint(config.init_from)
        if config.init_from is not None and warm_start
        else None
    )
    method_class = methods.get_method_class(config.loss)
    config, dataset, input_line = resolve_input(config, dataset)
    if dataset is None:
        # image_size / tfds_splits / manual_dir (tfds only; validate() refused them otherwise).
        dataset = load_dataset(config.dataset, config.data_dir, **config.load_options())
    mesh = make_mesh(config.num_devices)
    info = data_info(config, dataset, method_class)
    method = methods.from_config(
        config, info, fine_labels=dataset.fine_train if method_class.needs_labels else None
    )
    _check_against_data(config, dataset, method, info, mesh.devices.size)

    input_shape = dataset.x_train.shape[1:]
    setup = None
    if config.backbone is not None:
        model = backbone_trainer.create_model(
            config,
            input_shape,
            num_classes=dataset.num_train_classes,  # no head or proxy for an unseen class
            classifier=method.classifier,
            proxies=method.proxies,
        )
        setup = backbone_trainer.setup(config, model)
    else:
        model = create_model(
            config.architecture or default_architecture(input_shape),
            input_shape,
            embedding_dim=config.embedding_dim,
            seed=config.seed,
            normalize=config.normalize,
            num_classes=dataset.num_train_classes,  # no head or proxy for an unseen class
            classifier=method.classifier,
            proxies=method.proxies,
        )
    graphdef, params_state = nnx.split(model)
    params = nnx.to_pure_dict(params_state)
    # The model's structure, for a method whose state copies it (a momentum network).
    info = dataclasses.replace(info, model_params=jax.eval_shape(lambda: params))
    warm = None
    if source is not None:
        params, warm = warm_start_params(config.init_from, *source, params)
    own_params = method.init_params(jax.random.PRNGKey(config.seed + 2), info)
    if own_params:
        params = {**params, _METHOD_PARAMS: own_params}
        if setup is not None:  # a method's own parameters train at the head's rate
            labels = {**setup.labels, _METHOD_PARAMS: jax.tree.map(lambda _: "head", own_params)}
            setup = dataclasses.replace(setup, labels=labels)
    optimizer = make_optimizer(config, None if setup is None else setup.labels)

    x_train, x_test = dataset.x_train, dataset.x_test
    if config.cache_prefix:  # the frozen stages' output, once per dataset
        x_train, x_test = backbone_trainer.cache_prefix(
            config, setup, graphdef, model_params(params), x_train, x_test
        )
    replicated = NamedSharding(mesh, P())
    stream = config.input == "stream"
    if stream:
        streaming.require_grain()
    # Image files are cropped from their full resolution on the host; arrays on the device.
    host_crop = stream and config.augment_crop and is_lazy(x_train)
    # A label-free method gets no labels at all: the step cannot read them by mistake.
    labels = jnp.asarray(dataset.y_train, jnp.int32) if method.needs_labels else None
    data = TrainingData(
        x=None if stream else jnp.asarray(x_train),
        labels=labels,
        class_table=(
            sampling.group_table(labels, num_groups=dataset.num_classes)
            if labels is not None
            else None
        ),
    )
    data = jax.device_put(data, replicated)
    if stream:  # the training and test sets stay on the host, read by index
        data = data._replace(x=_loader(config, x_train, host_crop))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(config.seed),
        memory=_empty_memory(graphdef, params, x_train) if config.embedding_memory else None,
    )
    state = jax.device_put(state, replicated)
    steps = build_step_functions(
        method, graphdef, optimizer, config, mesh, setup, host_crop=host_crop
    )
    if stream:
        x_test = _loader(config, x_test, host_crop)
    else:
        x_test = jax.device_put(jnp.asarray(x_test), replicated)
    return Run(
        config,
        dataset,
        method,
        info,
        mesh,
        graphdef,
        optimizer,
        steps,
        data,
        x_test,
        state,
        warm,
        setup,
        input_line,
    )


def _empty_memory(graphdef, params, x_train) -> embedding_memory.EmbeddingMemory:
    """An ``--embedding-memory`` of one row per training example, as wide as the model's
    embedding of them."""
    dtype = np.float32 if is_lazy(x_train) else x_train.dtype
    example = jax.ShapeDtypeStruct((1, *x_train.shape[1:]), dtype)
    embedded = jax.eval_shape(
        lambda p, x: nnx.merge(graphdef, nnx.State(model_params(p)))(x), params, example
    )
    return embedding_memory.empty(x_train.shape[0], embedded.shape[-1])


def _loader(config: TrainConfig, x, host_crop: bool) -> streaming.Loader:
    """``x`` (image files, or an array kept in host memory) read by index on the host."""
    return streaming.Loader(
        x if is_lazy(x) else np.asarray(x),
        workers=config.loader_workers,
        host_crop=host_crop,
        seed=config.seed,
    )


def _with_current_prefix(run: Run, params) -> Run:
    """A resumed ``--cache-prefix`` run whose checkpoint holds other frozen values than the
    cache was computed from (e.g. warm-started by --init-from): the cache recomputed."""
    params = model_params(params)  # a method's own parameters are no part of the graph
    if backbone_trainer.prefix_is_current(run.finetune, run.graphdef, params):
        return run
    x_train, x_test = backbone_trainer.cache_prefix(
        run.config, run.finetune, run.graphdef, params, run.dataset.x_train, run.dataset.x_test
    )
    replicated = NamedSharding(run.mesh, P())
    data = jax.device_put(run.data._replace(x=jnp.asarray(x_train)), replicated)
    x_test = jax.device_put(jnp.asarray(x_test), replicated)
    return dataclasses.replace(run, data=data, x_test=x_test)


# --------------------------------------------------------------------------------------
# Refresh and evaluation.
# --------------------------------------------------------------------------------------


def _refresh_key(config: TrainConfig, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step)


def refresh(
    run: Run, state: TrainState, method_state, step: int, *, with_diagnostics: bool = False
):
    """The method state rebuilt from the training set embedded with the current parameters
    (for the Magnet loss: every class re-clustered into a new index).

    Returns the new method state; with ``with_diagnostics=True``, ``(method_state,
    diagnostics)`` where diagnostics are what the method reports of its refresh (the
    Magnet loss: :func:`magnet_jax.clustering.clustering_diagnostics` and the number of
    valid clusters) plus ``embedded_rows``, how many training examples it embedded (fewer
    than all with ``--embedding-memory``), and ``refresh_seconds``, the wall time of the
    whole refresh.

    Raises:
        magnet_jax.finite.NonFiniteError: the training set's embeddings hold NaN or inf.
    """
    started = time.perf_counter()
    embed, embedded_rows = run.steps.embed, run.info.num_examples
    if state.memory is not None:
        embed, embedded_rows = _embed_with_memory(run, state.memory, step)
    new_state, diagnostics = run.method.refresh(
        method_state,
        embed=_checked_embed(embed, "training set"),
        params=state.params,
        data=run.data,
        key=_refresh_key(run.config, step),
        diagnostics=with_diagnostics,
    )
    new_state = jax.device_put(new_state, NamedSharding(run.mesh, P()))
    if not with_diagnostics:
        return new_state
    jax.block_until_ready(new_state)
    seconds = time.perf_counter() - started
    return new_state, {**diagnostics, "embedded_rows": embedded_rows, "refresh_seconds": seconds}


def _embed_with_memory(run: Run, memory: embedding_memory.EmbeddingMemory, step: int):
    """The refresh's embedding function with ``--embedding-memory``: the memory's rows at
    most ``embedding_memory`` steps old, the others embedded with the given parameters
    (every row, as without a memory, when no row is recent enough); and how many rows it
    embeds."""
    stale = embedding_memory.stale_rows(memory, step, run.config.embedding_memory)

    def embed(params, x):
        if stale.size == memory.step.shape[0]:
            return run.steps.embed(params, x)
        return run.steps.embed_into(params, x, stale, memory.embeddings)

    return embed, int(stale.size)


def _refresh_line(run: Run) -> str:
    """What a refresh embeds, for the start of a run."""
    memory = run.config.embedding_memory
    what = (
        f"only the examples the train steps did not embed in the last {memory} steps "
        f"(--embedding-memory {memory})"
        if memory
        else "the whole training set"
    )
    return f"refresh every {run.refresh_every} steps, embedding {what}"


def _checked_embed(embed, what: str):
    """``embed`` that raises :class:`~magnet_jax.finite.NonFiniteError` on NaN or inf."""

    def checked(params, x: jax.Array) -> jax.Array:
        return finite.check_embeddings(embed(params, x), what)

    return checked


def evaluate(run: Run, params, method_state, evaluators=None) -> dict[str, float]:
    """Test-set metrics of the current embedding: what every evaluator yields, in order.

    ``evaluators`` default to :func:`magnet_jax.evaluators.default_evaluators`: retrieval
    metrics of the test set as its own gallery (Recall@k for the dataset's ``recall_ks``,
    MAP@R, R-precision, NMI), the kNN error (test queries against the training set), the
    method's own (kNC against centroids recomputed from the current embeddings for the
    Magnet loss; the classifier's error for softmax) and, with fine labels, the hierarchy
    errors. When the test classes were not seen in training (``--split classes``) only the
    retrieval metrics apply: classifying by the training set cannot name an unseen class,
    and the training set is then not even embedded.

    Raises:
        magnet_jax.finite.NonFiniteError: an embedding the evaluators read holds NaN or inf
            (metrics of non-finite embeddings would be meaningless, not an error).
    """
    if evaluators is None:
        evaluators = default_evaluators(run.method, knn_k=run.config.knn_k)
    embed = run.steps.embed
    context = EvalContext(
        params=params,
        method_state=method_state,
        model=run.model(params),
        train_embeddings=lambda: _checked_embed(embed, "training set")(params, run.data.x),
        test_embeddings=lambda: _checked_embed(embed, "test set")(params, run.x_test),
        dataset=run.dataset,
    )
    return run_evaluators(evaluators, context)


# --------------------------------------------------------------------------------------
# The host loop.
# --------------------------------------------------------------------------------------


def _next_event(step: int, run: Run) -> int:
    config = run.config
    periods = (config.log_every, run.refresh_every, config.eval_every, config.checkpoint_every)
    candidates = [((step // period) + 1) * period for period in periods]
    return min(min(candidates), config.steps)


def _refresh_due(run: Run, step: int, total_steps: int) -> bool:
    """Whether the method refreshes before ``step``: at step 0 and every ``refresh_every``
    steps after, never after the last step."""
    return run.method.has_refresh and step < total_steps and step % run.refresh_every == 0


def learning_curve(
    run: Run,
    eval_steps,
    *,
    state: TrainState | None = None,
    evaluators=None,
) -> dict[str, Any]:
    """Trains ``run`` in memory (no work directory) and evaluates at ``eval_steps``.

    The refreshes, steps and evaluations are those of :func:`train`; only the events
    differ (evaluation at the given steps, 0 allowed; no logging, no checkpoints).

    Args:
        run: from :func:`prepare`.
        eval_steps: the steps after which to evaluate; training stops at the last.
        state: the state to start from (default: ``run.initial_state``).
        evaluators: as in :func:`evaluate`.

    Returns:
        ``{"iterations": [steps], "metrics": {name: [value per iteration]}, "final_loss":
        the mean loss of the last stretch of steps, "state", "method_state"}``.

    Raises:
        FloatingPointError: when the loss becomes non-finite.
    """
    state = run.initial_state if state is None else state
    method_state = run.method.init_state(run.info)
    eval_steps = sorted({int(s) for s in eval_steps})
    total_steps = eval_steps[-1]
    iterations, records = [], []
    step, loss, refreshed = 0, float("nan"), False
    while True:
        # An evaluation at step 0 of a run with no steps still needs a refreshed state.
        if _refresh_due(run, step, total_steps) or (
            run.method.has_refresh and not refreshed and step in eval_steps
        ):
            method_state = refresh(run, state, method_state, step)
            refreshed = True
        if step in eval_steps:
            iterations.append(step)
            records.append(evaluate(run, state.params, method_state, evaluators))
        if step >= total_steps:
            break
        events = [s for s in eval_steps if s > step]
        if run.method.has_refresh:
            events.append((step // run.refresh_every + 1) * run.refresh_every)
        target = min(min(events), total_steps)
        state, method_state, mean_loss = run.steps.run_steps(
            state, method_state, run.data, jnp.asarray(target - step, jnp.int32)
        )
        loss = float(mean_loss)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"{run.config.loss}: loss {loss} between steps {step} and {target} "
                f"(lr {run.config.lr})"
            )
        step = target
    names = list(dict.fromkeys(name for record in records for name in record))
    return {
        "iterations": iterations,
        "metrics": {name: [record.get(name) for record in records] for name in names},
        "final_loss": loss,
        "state": state,
        "method_state": method_state,
    }


def train(
    config: TrainConfig, *, progress: bool = True, dataset: Dataset | None = None
) -> dict[str, float]:
    """Trains (or resumes) the run described by ``config``; returns the final metrics.

    Writes ``config.json``, ``history.jsonl`` (one JSON line per logged step, with the mean
    loss and the method's step metrics such as ``active`` over the steps since the previous
    event; one per refresh and evaluation; a ``"start"`` line with the number and kind of
    devices each time the run starts or resumes, and first an ``"init"`` line when
    ``config.init_from`` warm-starts a fresh run, see :meth:`WarmStart.record`),
    ``metrics.json`` (final metrics) and
    ``checkpoints/`` under ``config.workdir``. Running it again with the same work directory
    resumes from the newest checkpoint that restores (:mod:`magnet_jax.workdir` says what may
    change) and ends with the same parameters and metrics as an uninterrupted run.

    Raises:
        ValueError: a bad config, or one that the run in the work directory cannot resume.
        OSError: the work directory or a checkpoint cannot be written.
        FloatingPointError: the loss, the train state (checked after every stretch of
            steps, so before any checkpoint) or the embeddings at a refresh or an
            evaluation became non-finite; nothing non-finite is saved, and the message
            names the step and the checkpoint kept.
        TrainingInterrupted: Ctrl-C; a checkpoint of the steps taken was saved first.
    """
    from tqdm.auto import tqdm

    config.validate()  # a bad flag is reported as such, before any comparison with a saved run
    workdir = Workdir(config.workdir)
    # A directory without a complete checkpoint holds no run: a command starts afresh there.
    # A run that resumes its own checkpoint ignores --init-from: the checkpoint already
    # holds the warm-started parameters, and the source need not exist any more.
    checkpoint_steps = workdir.checkpoint_steps()
    saved = workdir.saved_config() if checkpoint_steps else None
    asked_input = config.input
    if saved is not None:
        config = keep_input(saved, config)  # --input auto: the mode the run started in
        check_same_run(saved, config, workdir.path, checkpoint_steps[-1])
    workdir.check_writable()
    run = prepare(config, dataset, warm_start=not checkpoint_steps)  # raises before any write
    config = run.config  # --input auto resolved: config.json records memory or stream
    input_line = run.input_choice
    if input_line is None and asked_input == "auto":
        input_line = f"--input auto: {config.input} (the mode this run started in)"
    # With several processes only the main one writes the run's files; all of them save
    # and restore checkpoints together (magnet_jax.distributed).
    main = distributed.is_main_process()
    workdir.create()
    if main:
        workdir.write_json(workdir.config, config.to_dict())
    checkpointer = Checkpointer(workdir.checkpoints, max_to_keep=config.max_checkpoints)

    state, method_state = run.initial_state, run.method.init_state(run.info)
    history_lines, seconds_before = 0, 0.0
    method_template = method_state_template(run) if checkpoint_steps else None
    restored = checkpointer.restore_latest(state, method_template) if checkpoint_steps else None
    latest = None if restored is None else restored.step
    if restored is not None:
        state = restored.state
        if restored.index is not None:
            method_state = restored.index
        run = _with_current_prefix(run, state.params)
        history_lines = restored.meta["history_lines"]
        seconds_before = restored.meta["seconds"]
    if main:
        workdir.truncate_history(history_lines)
    step = int(state.step)

    started = time.perf_counter()
    history = open(workdir.history, "a") if main else None
    metrics: dict[str, float] = {}

    def log(record: dict) -> None:
        nonlocal history_lines
        if history is not None:
            history.write(json.dumps(record, sort_keys=True) + "\n")
            history.flush()
        history_lines += 1  # counted on every process: it goes into the checkpoint

    if main and input_line is not None:
        print(input_line, flush=True)
    if latest is None and run.warm_start is not None:
        log(run.warm_start.record())
        if main:
            print(run.warm_start.summary(), flush=True)
    devices = device_record(run.mesh)
    log({"kind": "start", "step": step, **devices})
    if main:
        print(
            f"{'resuming at step ' + str(step) if latest is not None else 'training'} in "
            f"{workdir.path} on {devices['devices']} {devices['platform']} device(s) "
            f"({devices['device_kind']})",
            flush=True,
        )
        if run.method.has_refresh:
            print(_refresh_line(run), flush=True)

    bar = tqdm(
        total=config.steps,
        initial=step,
        disable=not (progress and main),
        desc=f"{config.loss} on {config.dataset}",
        unit="step",
    )
    # One process alone stops cleanly at a checkpoint on Ctrl-C; several must all save
    # together, and a Ctrl-C reaches only one of them, so there it interrupts at once (the
    # run resumes from the last periodic checkpoint).
    stopping = _Stopping(workdir, checkpointer)
    stop = StopOnInterrupt()
    if distributed.num_processes() == 1:
        stop.install()
    try:
        while True:
            if _refresh_due(run, step, config.steps):
                with _stop_if_nonfinite(f"at the refresh of step {step}", step, stopping):
                    method_state, diagnostics = refresh(
                        run, state, method_state, step, with_diagnostics=True
                    )
                log({"kind": "refresh", "step": step, **diagnostics})
            if step == config.steps or (step > 0 and step % config.eval_every == 0):
                with _stop_if_nonfinite(f"at the evaluation of step {step}", step, stopping):
                    metrics = evaluate(run, state.params, method_state)
                log({"kind": "eval", "step": step, **metrics})
                bar.set_postfix(
                    {k: f"{metrics[k]:.4f}" for k in ("knn_error", "knc_error") if k in metrics}
                )
            if step == config.steps:
                break
            target = _next_event(step, run)
            state, method_state, loss, step_metrics = run.steps.run_steps_with_metrics(
                state, method_state, run.data, jnp.asarray(target - step, jnp.int32)
            )
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss became {loss} between steps {step} and {target}; "
                    f"{stopping.kept()}"
                )
            # The loss is that of the parameters before each update: the last update can
            # still have left NaN or inf, which must not reach a checkpoint.
            with _stop_if_nonfinite(
                f"between steps {step} and {target}, while the loss stayed finite", None, stopping
            ):
                finite.check_state(state.params, state.opt_state)
            bar.update(target - step)
            step = target
            if step % config.log_every == 0 or step == config.steps:
                step_metrics = {name: float(value) for name, value in step_metrics.items()}
                log({"kind": "train", "step": step, "loss": loss, **step_metrics})
                bar.set_postfix_str(_train_postfix(loss, step_metrics), refresh=False)
            if step % config.checkpoint_every == 0 or step == config.steps:
                seconds = seconds_before + time.perf_counter() - started
                checkpointer.save(
                    step,
                    state,
                    method_state if methods.has_state(method_state) else None,
                    {"history_lines": history_lines, "seconds": seconds},
                )
            if stop.requested:  # Ctrl-C: stop at a checkpoint of the steps taken so far
                if checkpointer.latest_step() != step:
                    seconds = seconds_before + time.perf_counter() - started
                    meta = {"history_lines": history_lines, "seconds": seconds}
                    checkpointer.save(step, state, method_state, meta)
                raise TrainingInterrupted(
                    f"interrupted at step {step} of {config.steps}: checkpoint {step} is saved "
                    f"in {workdir.checkpoints}; run the same command to resume"
                )
    finally:
        stop.restore()
        bar.close()
        if history is not None:
            history.close()
        checkpointer.close()

    final = {**metrics, "steps": step, "seconds": seconds_before + time.perf_counter() - started}
    final["loss"] = config.loss
    final["dataset"] = config.dataset
    if main:
        workdir.write_json(workdir.metrics, final)
    return final


def _train_postfix(loss: float, step_metrics: dict[str, float]) -> str:
    """``loss=0.0000 active=37%``: a saturated hinge reads 0 while examples still count."""
    parts = [f"loss={loss:.4f}"]
    for name, value in step_metrics.items():
        parts.append(f"{name}={value:.0%}" if name == "active" else f"{name}={value:.4g}")
    return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class _Stopping:
    """What a run that stops on a non-finite value keeps, and what to do next."""

    workdir: Workdir
    checkpointer: Checkpointer

    def kept(self, produced_at: int | None = None) -> str:
        """The checkpoint kept and a hint; ``produced_at``: the step whose parameters gave
        the non-finite values, when they came from parameters rather than from a step."""
        kept, workdir = self.checkpointer.latest_step(), self.workdir
        if produced_at == 0 and kept is None:
            return (
                f"no training step had run, so the inputs (or the --init-from parameters) "
                f"give them: check their scale; {workdir.path} holds no run"
            )
        if kept is None:
            return (
                f"no checkpoint was written, so {workdir.path} holds no run: rerun the command "
                f"there with a lower --lr"
            )
        if kept == produced_at:
            return (
                f"the last checkpoint, step {kept}, holds the parameters that gave them and is "
                f"kept in {workdir.checkpoints} (resuming it stops here again); rerun with a "
                f"lower --lr in another --workdir"
            )
        return (
            f"the last checkpoint, step {kept}, is kept in {workdir.checkpoints}; rerun with a "
            f"lower --lr in another --workdir (--init-from {workdir.path} warm starts from it)"
        )


@contextlib.contextmanager
def _stop_if_nonfinite(where: str, produced_at: int | None, stopping: _Stopping):
    """Turns a :class:`~magnet_jax.finite.NonFiniteError` into the run's one-line stop."""
    try:
        yield
    except finite.NonFiniteError as error:
        raise FloatingPointError(f"{error} {where}; {stopping.kept(produced_at)}") from error


def method_state_template(run: Run):
    """The method state's structure with replicated shardings, for Orbax to restore into
    (from :meth:`~magnet_jax.methods.Method.abstract_state`, no refresh); None for a method
    whose state holds no arrays (its checkpoints have no method state)."""
    abstract = run.method.abstract_state(run.info)
    if not jax.tree.leaves(abstract):
        return None
    replicated = NamedSharding(run.mesh, P())
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), abstract
    )


def load_for_evaluation(workdir: str) -> tuple[Run, TrainState, Any]:
    """The run saved in ``workdir`` at its latest checkpoint: (run, state, method state)."""
    files = Workdir(workdir)
    saved = files.saved_config()
    if saved is None:
        raise FileNotFoundError(
            f"no run in {files.path}: {files.config} is missing (train one with `magnet-jax train --workdir {workdir}`)"
        )
    config = TrainConfig.from_dict(saved)
    run = prepare(config, warm_start=False)  # the checkpoint holds the parameters
    if not files.checkpoint_steps():
        raise FileNotFoundError(f"no complete checkpoint in {files.checkpoints}")
    checkpointer = Checkpointer(files.checkpoints)
    restored = checkpointer.restore_latest(run.initial_state, method_state_template(run))
    checkpointer.close()
    method_state = restored.index if restored.index is not None else run.method.init_state(run.info)
    return _with_current_prefix(run, restored.state.params), restored.state, method_state
