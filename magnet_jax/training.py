"""The training program: mesh, input, sharded train step, and the host loop.

Data flow (DESIGN.md §2), one direction::

    dataset ──indices──▶ sampler(ClusterIndex) ──batch──▶ train_step ──▶ TrainState
                              ▲  loss stats ◀────────────────┘
    every refresh: embed all (sharded) ──▶ k-means per class ──▶ new ClusterIndex

Everything numeric is a jitted pure function of explicit pytrees (:class:`TrainState`,
:class:`~magnet_jax.index.ClusterIndex`, :class:`~magnet_jax.objectives.TrainingData`).
The host loop in :func:`train` only decides when to refresh, evaluate, log and
checkpoint. Steps between two such events are dispatched asynchronously, one jitted call
each; the host waits only when it logs.

Sharding: one ``data`` mesh axis over all devices (all hosts after
``jax.distributed.initialize()``). Parameters, optimizer state, the cluster index and the
training set are replicated; the sampled batch is constrained to be split along ``data``,
so the forward and backward passes are data-parallel and XLA inserts the collectives. The
loss is the loss of the global batch whatever the number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from magnet_jax import augment, evaluation, sampling
from magnet_jax import index as index_lib
from magnet_jax.backbones import finetune
from magnet_jax.backbones import trainer as backbone_trainer
from magnet_jax.checkpoint import Checkpointer, complete_steps
from magnet_jax.config import TrainConfig
from magnet_jax.data import Dataset, load_dataset
from magnet_jax.models import create_model, default_architecture
from magnet_jax.objectives import Objective, TrainingData, get_objective
from magnet_jax.warm_start import WarmStart, find_init_checkpoint, warm_start_params

_AUGMENT_STREAM = 0x617567  # folded into a step's key for its augmentations


@struct.dataclass
class TrainState:
    """Everything that changes from step to step, as one pytree.

    Attributes:
        step: [] int32, the number of steps taken.
        params: nested dict of parameter arrays (``nnx.to_pure_dict`` of the model).
        opt_state: the Optax optimizer state.
        rng: [2] uint32 base key; step ``t`` uses ``fold_in(rng, t)``, so the randomness of
            a step depends only on the seed and the step number (exact resume).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


class StepFunctions(NamedTuple):
    """The jitted functions of a run.

    run_steps: (state, index, data, num_steps) -> (state, index, mean loss []), the jitted
        step called ``num_steps`` times; state and index are donated.
    train_step: one step, (state, index, data) -> (state, index, loss []).
    embed: (params, x [N, ...]) -> embeddings [N, d], in jitted chunks sharded over ``data``.
    """

    run_steps: Any
    train_step: Any
    embed: Any


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


def build_step_functions(
    objective: Objective,
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    config: TrainConfig,
    mesh: Mesh,
    setup: backbone_trainer.FinetuneSetup | None = None,
) -> StepFunctions:
    """Builds the jitted train step, its multi-step loop and the chunked embedding.

    ``setup`` (``--backbone`` runs): frozen leaves are kept out of the backward pass, the
    step runs ``setup.train_graphdef`` and, with ``train_bn``, keeps the batch statistics
    that its forward pass computed."""
    num_devices = mesh.devices.size
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def train_step(state: TrainState, index, data: TrainingData):
        key = jax.random.fold_in(state.rng, state.step)
        batch = objective.sample(key, index, data, config)
        inputs = data.x[batch.indices]
        if config.augment_shift:
            inputs = augment.random_shift(
                jax.random.fold_in(key, _AUGMENT_STREAM), inputs, config.augment_shift
            )
        inputs = jax.lax.with_sharding_constraint(inputs, batch_sharding)

        def loss_of(params):
            if setup is None:
                model = nnx.merge(graphdef, nnx.State(params))
            else:
                params = finetune.stop_frozen_gradients(params, setup.labels)
                model = nnx.merge(setup.train_graphdef, nnx.State(params))
            output = objective.loss(model, model(inputs), batch, config)
            stats = finetune.updated_batch_stats(model) if config.train_bn else None
            return output.loss, (output, stats)

        (loss, (output, stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if stats is not None:
            params = finetune.with_batch_stats(params, stats)
        if objective.uses_index:
            index = index_lib.record_batch(
                index, batch.cluster_ids, output.example_losses, output.variance
            )
        return TrainState(state.step + 1, params, opt_state, state.rng), index, loss

    jitted_step = jax.jit(train_step, donate_argnums=(0, 1))
    # XLA:CPU runs the per-device parts of all dispatched programs, and the intra-op work
    # of their convolutions, on one shared thread pool. With several CPU devices, a program
    # whose device-0 part waits in a collective can hold the thread that device 1's part of
    # the previous program needs: a deadlock (seen with 2 CPU devices on 2 cores, on
    # consecutive train steps and on independent embedding chunks). So on a multi-device
    # CPU every program is finished before the next is dispatched; GPUs and TPUs queue
    # programs per device and keep asynchronous dispatch.
    serialize = num_devices > 1 and mesh.devices.flat[0].platform == "cpu"

    def run_steps(state: TrainState, index, data: TrainingData, num_steps):
        # A host loop over the jitted step rather than one jitted fori_loop: XLA on CPU runs
        # convolutions inside a while-loop body ~10x slower (measured: the Fashion-MNIST
        # convnet at batch 48, 208 ms vs 17-21 ms per step), and asynchronous dispatch keeps
        # the host off the critical path (the MLP on digits: 0.6 vs 0.7 ms per step).
        num_steps = int(num_steps)
        loss_sum = jnp.zeros(())
        for _ in range(num_steps):
            state, index, loss = jitted_step(state, index, data)
            if serialize:
                loss.block_until_ready()
            loss_sum = loss_sum + loss
        return state, index, loss_sum / max(num_steps, 1)

    # The embedding output stays sharded like the input rows: a per-row model needs no
    # collective inside a chunk.
    @functools.partial(jax.jit, static_argnames="chunk")
    def embed_chunk(params, x: jax.Array, start: jax.Array, chunk: int) -> jax.Array:
        rows = jax.lax.dynamic_slice_in_dim(x, start, chunk)
        sharding = batch_sharding if chunk % num_devices == 0 else replicated
        rows = jax.lax.with_sharding_constraint(rows, sharding)
        embeddings = nnx.merge(graphdef, nnx.State(params))(rows)
        return jax.lax.with_sharding_constraint(embeddings, sharding)

    def embed_one(params, x, start, chunk):
        out = embed_chunk(params, x, start, chunk)
        return out.block_until_ready() if serialize else out

    def embed(params, x: jax.Array) -> jax.Array:
        """Embeds ``x [N, ...]`` → ``[N, E]`` (replicated on the mesh) in fixed-size chunks."""
        # One compilation for all chunks, dispatched from the host: on CPU a lax.map over
        # the chunks ran 1.5x slower (the while-loop penalty of run_steps). The last chunk
        # is shifted back to end at N and overlaps the one before it.
        num_examples = x.shape[0]
        chunk = min(config.eval_chunk_size, num_examples)
        starts = list(range(0, num_examples - chunk + 1, chunk))
        parts = [embed_one(params, x, start, chunk) for start in starts]
        covered = starts[-1] + chunk
        if covered < num_examples:
            last = embed_one(params, x, num_examples - chunk, chunk)
            parts.append(last[chunk - (num_examples - covered) :])
        return jax.device_put(jnp.concatenate(parts, axis=0), replicated)

    return StepFunctions(
        run_steps=run_steps,
        train_step=jitted_step,
        embed=embed,
    )


# --------------------------------------------------------------------------------------
# Setting up a run: every check happens here, before the work directory is touched.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A prepared run: data on device, the model's structure, the jitted functions."""

    config: TrainConfig
    dataset: Dataset
    objective: Objective
    mesh: Mesh
    graphdef: Any
    optimizer: optax.GradientTransformation
    steps: StepFunctions
    data: TrainingData
    x_test: jax.Array
    initial_state: TrainState
    warm_start: WarmStart | None = None  # what --init-from copied into initial_state
    finetune: backbone_trainer.FinetuneSetup | None = None  # --backbone runs

    @property
    def refresh_every(self) -> int:
        if self.config.refresh_every is not None:
            return self.config.refresh_every
        return max(1, math.ceil(len(self.dataset.y_train) / self.config.batch_size))


def _check_against_data(
    config: TrainConfig, dataset: Dataset, objective: Objective, num_devices: int
) -> None:
    labels = np.asarray(dataset.y_train)
    class_sizes = np.bincount(labels, minlength=dataset.num_classes)
    num_classes = int(np.count_nonzero(class_sizes))
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
    if objective.uses_index:
        smallest = int(np.argmin(np.where(class_sizes > 0, class_sizes, np.iinfo(np.int64).max)))
        if config.clusters_per_class > class_sizes[smallest]:
            raise ValueError(
                f"--clusters-per-class K={config.clusters_per_class} is larger than class "
                f"{smallest} ({dataset.class_names[smallest]!r}) allows: it has only "
                f"{class_sizes[smallest]} training examples; choose K <= {class_sizes[smallest]}"
            )
        other_clusters = (num_classes - 1) * config.clusters_per_class
        if config.clusters_per_batch - 1 > other_clusters:
            raise ValueError(
                f"--clusters-per-batch M={config.clusters_per_batch} needs M-1 = "
                f"{config.clusters_per_batch - 1} impostor clusters of other classes, but with "
                f"{num_classes} classes and K={config.clusters_per_class} there are only "
                f"{other_clusters}; lower M or raise K"
            )
    elif objective.batch == "classes" and config.clusters_per_batch > num_classes:
        raise ValueError(
            f"--clusters-per-batch M={config.clusters_per_batch} classes per batch but the "
            f"dataset has only {num_classes} classes"
        )


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
    objective = get_objective(config.loss)
    if dataset is None:
        # image_size / tfds_splits / manual_dir (tfds only; validate() refused them otherwise).
        dataset = load_dataset(config.dataset, config.data_dir, **config.load_options())
    mesh = make_mesh(config.num_devices)
    _check_against_data(config, dataset, objective, mesh.devices.size)

    input_shape = dataset.x_train.shape[1:]
    setup = None
    if config.backbone is not None:
        model = backbone_trainer.create_model(
            config,
            input_shape,
            num_classes=dataset.num_classes,
            classifier=objective.classifier,
            proxies=objective.proxies,
        )
        setup = backbone_trainer.setup(config, model)
    else:
        model = create_model(
            config.architecture or default_architecture(input_shape),
            input_shape,
            embedding_dim=config.embedding_dim,
            seed=config.seed,
            normalize=config.normalize,
            num_classes=dataset.num_classes,
            classifier=objective.classifier,
            proxies=objective.proxies,
        )
    graphdef, params_state = nnx.split(model)
    params = nnx.to_pure_dict(params_state)
    warm = None
    if source is not None:
        params, warm = warm_start_params(config.init_from, *source, params)
    optimizer = make_optimizer(config, None if setup is None else setup.labels)

    x_train, x_test = dataset.x_train, dataset.x_test
    if config.cache_prefix:  # the frozen stages' output, once per dataset
        x_train, x_test = backbone_trainer.cache_prefix(
            config, setup, graphdef, params, x_train, x_test
        )
    replicated = NamedSharding(mesh, P())
    labels = jnp.asarray(dataset.y_train, jnp.int32)
    data = TrainingData(
        x=jnp.asarray(x_train),
        labels=labels,
        class_table=sampling.group_table(labels, num_groups=dataset.num_classes),
    )
    data = jax.device_put(data, replicated)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(config.seed),
    )
    state = jax.device_put(state, replicated)
    steps = build_step_functions(objective, graphdef, optimizer, config, mesh, setup)
    x_test = jax.device_put(jnp.asarray(x_test), replicated)
    return Run(
        config,
        dataset,
        objective,
        mesh,
        graphdef,
        optimizer,
        steps,
        data,
        x_test,
        state,
        warm,
        setup,
    )


def _with_current_prefix(run: Run, params) -> Run:
    """A resumed ``--cache-prefix`` run whose checkpoint holds other frozen values than the
    cache was computed from (e.g. warm-started by --init-from): the cache recomputed."""
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


def _clustering_options(config: TrainConfig) -> dict[str, Any]:
    return {
        "max_iterations": config.kmeans_iterations,
        "num_restarts": config.kmeans_restarts,
        "clustering": config.clustering,
        "linkage": config.linkage,
        "distance_threshold": config.distance_threshold,
        "max_points_per_class": config.cluster_subsample,
    }


def refresh(run: Run, state: TrainState, index, step: int, *, with_diagnostics: bool = False):
    """Embeds the training set with the current parameters and re-clusters every class.

    Returns the new index; with ``with_diagnostics=True``, ``(index, diagnostics)`` where
    diagnostics are :func:`magnet_jax.clustering.clustering_diagnostics` of the new
    clustering (purity against the dataset's fine labels when it has them) plus
    ``refresh_seconds``, the wall time of the embedding and the clustering.
    """
    started = time.perf_counter()
    embeddings = run.steps.embed(state.params, run.data.x)
    key = _refresh_key(run.config, step)
    if index is None:
        new_index = index_lib.build_index(
            embeddings,
            run.data.labels,
            clusters_per_class=run.config.clusters_per_class,
            num_impostors=run.config.clusters_per_batch - 1,
            key=key,
            num_classes=run.dataset.num_classes,
            **_clustering_options(run.config),
        )
    else:
        new_index = index_lib.refresh_index(
            index, embeddings, key=key, **_clustering_options(run.config)
        )
    new_index = jax.device_put(new_index, NamedSharding(run.mesh, P()))
    if not with_diagnostics:
        return new_index
    from magnet_jax.clustering import clustering_diagnostics

    jax.block_until_ready(new_index)
    seconds = time.perf_counter() - started
    diagnostics = clustering_diagnostics(
        embeddings,
        run.data.labels,
        new_index.assignments,
        num_classes=new_index.num_classes,
        clusters_per_class=new_index.clusters_per_class,
        fine_labels=run.dataset.fine_train,
    )
    return new_index, {**diagnostics, "refresh_seconds": seconds}


def evaluate(run: Run, params, index) -> dict[str, float]:
    """Test-set metrics of the current embedding.

    kNN: test queries against the training set. kNC (Magnet Loss only): against centroids
    recomputed from the current embeddings with the index's stored assignments (stale
    centroids err more, DESIGN.md §1). Retrieval metrics: the test set as its own gallery.
    """
    config = run.config
    train_embeddings = run.steps.embed(params, run.data.x)
    test_embeddings = run.steps.embed(params, run.x_test)
    y_test = np.asarray(run.dataset.y_test)
    metrics: dict[str, float] = {}
    predicted = evaluation.knn_predict(
        test_embeddings,
        train_embeddings,
        run.data.labels,
        k=config.knn_k,
        num_classes=run.dataset.num_classes,
    )
    metrics["knn_error"] = float(np.mean(np.asarray(predicted) != y_test))
    if index is not None:
        fresh = index_lib.recompute_centroids(index, train_embeddings)
        predicted = evaluation.knc_predict(
            test_embeddings, fresh, num_nearest_clusters=config.num_nearest_clusters
        )
        metrics["knc_error"] = float(np.mean(np.asarray(predicted) != y_test))
    if run.objective.classifier:
        model = nnx.merge(run.graphdef, nnx.State(params))
        logits = jax.jit(model.logits)(test_embeddings)
        metrics["classifier_error"] = float(np.mean(np.asarray(jnp.argmax(logits, -1)) != y_test))
    retrieval = evaluation.retrieval_metrics(
        test_embeddings, jnp.asarray(y_test), num_classes=run.dataset.num_classes
    )
    metrics.update({name: float(value) for name, value in retrieval.items()})
    if run.dataset.fine_test is not None:
        metrics.update(
            fine_label_errors(
                train_embeddings, run.dataset.fine_train, test_embeddings, run.dataset.fine_test
            )
        )
    return metrics


def fine_label_errors(
    train_embeddings, fine_train, test_embeddings, fine_test, *, ks=(1, 5)
) -> dict[str, float]:
    """Hierarchy recovery: how well an embedding trained on coarse labels separates the
    fine ones. ``fine_error_at_k`` is the share of test queries with no training example of
    their fine class among their k nearest training examples (Error@1 is the 1-NN error)."""
    _, neighbours = evaluation.nearest_neighbours(test_embeddings, train_embeddings, k=max(ks))
    neighbour_labels = np.asarray(fine_train)[np.asarray(neighbours)]
    hits = neighbour_labels == np.asarray(fine_test)[:, None]
    return {f"fine_error_at_{k}": float(1.0 - np.mean(np.any(hits[:, :k], axis=1))) for k in ks}


# --------------------------------------------------------------------------------------
# The host loop.
# --------------------------------------------------------------------------------------


def _next_event(step: int, run: Run) -> int:
    config = run.config
    periods = (config.log_every, run.refresh_every, config.eval_every, config.checkpoint_every)
    candidates = [((step // period) + 1) * period for period in periods]
    return min(min(candidates), config.steps)


class _Workdir:
    """The run's files: config.json, history.jsonl, metrics.json, checkpoints/."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.config = os.path.join(self.path, "config.json")
        self.history = os.path.join(self.path, "history.jsonl")
        self.metrics = os.path.join(self.path, "metrics.json")
        self.checkpoints = os.path.join(self.path, "checkpoints")

    def saved_config(self) -> dict | None:
        if not os.path.exists(self.config):
            return None
        with open(self.config) as f:
            return json.load(f)

    def write_json(self, path: str, value: Any) -> None:
        """Atomic: a crash leaves the old file or the new one, never half of one."""
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    def truncate_history(self, num_lines: int) -> None:
        """Drops lines written after the checkpoint we resume from (they will be rewritten)."""
        if not os.path.exists(self.history):
            return
        with open(self.history) as f:
            lines = f.readlines()[:num_lines]
        tmp = self.history + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.history)


# Fields that may differ between a run and its resumption. Not init_from: it is ignored on
# resume (the checkpoint holds the warm-started parameters) but names what the run is.
_RESUMABLE_CHANGES = {
    "steps",
    "eval_every",
    "checkpoint_every",
    "log_every",
    "max_checkpoints",
    "workdir",
}


def _check_same_run(saved: dict, config: TrainConfig, workdir: str) -> None:
    current = config.to_dict()
    # A field missing from an older run's config.json had its default value then.
    defaults = TrainConfig().to_dict()
    # `steps` may change only with a constant learning rate: a schedule's shape depends on it.
    resumable = _RESUMABLE_CHANGES - ({"steps"} if config.lr_schedule != "constant" else set())
    differing = sorted(
        k for k in current if k not in resumable and saved.get(k, defaults[k]) != current[k]
    )
    if differing:
        details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {current[k]!r}" for k in differing)
        raise ValueError(
            f"the work directory {workdir} holds a run with a different configuration ({details}); "
            f"resume it with the same settings or choose another --workdir"
        )


def train(
    config: TrainConfig, *, progress: bool = True, dataset: Dataset | None = None
) -> dict[str, float]:
    """Trains (or resumes) the run described by ``config``; returns the final metrics.

    Writes ``config.json``, ``history.jsonl`` (one JSON line per logged step, refresh and
    evaluation, and first an ``"init"`` line when ``config.init_from`` warm-starts a fresh
    run, see :meth:`WarmStart.record`), ``metrics.json`` (final metrics) and ``checkpoints/`` under
    ``config.workdir``. Running it again with the same work directory resumes from the
    latest checkpoint and ends with the same parameters and metrics as an uninterrupted run.
    """
    from tqdm.auto import tqdm

    workdir = _Workdir(config.workdir)
    # A run that resumes its own checkpoint ignores --init-from: the checkpoint already
    # holds the warm-started parameters, and the source need not exist any more.
    resuming = bool(complete_steps(workdir.checkpoints))
    run = prepare(config, dataset, warm_start=not resuming)  # raises before anything is written
    saved = workdir.saved_config()
    if saved is not None:
        _check_same_run(saved, config, workdir.path)
    os.makedirs(workdir.path, exist_ok=True)
    workdir.write_json(workdir.config, config.to_dict())
    checkpointer = Checkpointer(workdir.checkpoints, max_to_keep=config.max_checkpoints)

    state, index = run.initial_state, None
    history_lines, seconds_before = 0, 0.0
    latest = checkpointer.latest_step()
    if latest is not None:
        index_template = _index_template(run) if run.objective.uses_index else None
        restored = checkpointer.restore(latest, state, index_template)
        state, index = restored.state, restored.index
        run = _with_current_prefix(run, state.params)
        history_lines = restored.meta["history_lines"]
        seconds_before = restored.meta["seconds"]
    workdir.truncate_history(history_lines)
    step = int(state.step)

    started = time.perf_counter()
    history = open(workdir.history, "a")
    metrics: dict[str, float] = {}

    def log(record: dict) -> None:
        nonlocal history_lines
        history.write(json.dumps(record, sort_keys=True) + "\n")
        history.flush()
        history_lines += 1

    if latest is None and run.warm_start is not None:
        log(run.warm_start.record())
        print(run.warm_start.summary(), flush=True)

    bar = tqdm(
        total=config.steps,
        initial=step,
        disable=not progress,
        desc=f"{config.loss} on {config.dataset}",
        unit="step",
    )
    try:
        while True:
            if run.objective.uses_index and step < config.steps and step % run.refresh_every == 0:
                index, diagnostics = refresh(run, state, index, step, with_diagnostics=True)
                log(
                    {
                        "kind": "refresh",
                        "step": step,
                        **diagnostics,
                        "valid_clusters": int(jnp.sum(index.valid)),
                    }
                )
            if step == config.steps or (step > 0 and step % config.eval_every == 0):
                metrics = evaluate(run, state.params, index)
                log({"kind": "eval", "step": step, **metrics})
                bar.set_postfix(
                    {k: f"{metrics[k]:.4f}" for k in ("knn_error", "knc_error") if k in metrics}
                )
            if step == config.steps:
                break
            target = _next_event(step, run)
            state, index, loss = run.steps.run_steps(
                state, index, run.data, jnp.asarray(target - step, jnp.int32)
            )
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss became {loss} between steps {step} and {target}; "
                    f"the last finite checkpoint is kept in {workdir.checkpoints}. Try a lower --lr."
                )
            bar.update(target - step)
            step = target
            if step % config.log_every == 0 or step == config.steps:
                log({"kind": "train", "step": step, "loss": loss})
                bar.set_postfix_str(f"loss={loss:.4f}", refresh=False)
            if step % config.checkpoint_every == 0 or step == config.steps:
                seconds = seconds_before + time.perf_counter() - started
                checkpointer.save(
                    step, state, index, {"history_lines": history_lines, "seconds": seconds}
                )
    finally:
        bar.close()
        history.close()
        checkpointer.close()

    final = {**metrics, "steps": step, "seconds": seconds_before + time.perf_counter() - started}
    final["loss"] = config.loss
    final["dataset"] = config.dataset
    workdir.write_json(workdir.metrics, final)
    return final


def _index_template(run: Run):
    """An index of the right shapes and shardings for Orbax to restore into: the one the
    initial parameters give (cheap, and concrete, so no check inside the index is skipped)."""
    return refresh(run, run.initial_state, None, 0)


def load_for_evaluation(workdir: str) -> tuple[Run, TrainState, Any]:
    """The run saved in ``workdir`` at its latest checkpoint: (run, state, index)."""
    files = _Workdir(workdir)
    saved = files.saved_config()
    if saved is None:
        raise FileNotFoundError(
            f"no run in {files.path}: {files.config} is missing (train one with `magnet-jax train --workdir {workdir}`)"
        )
    config = TrainConfig.from_dict(saved)
    run = prepare(config, warm_start=False)  # the checkpoint holds the parameters
    checkpointer = Checkpointer(files.checkpoints)
    latest = checkpointer.latest_step()
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint in {files.checkpoints}")
    index_template = _index_template(run) if run.objective.uses_index else None
    restored = checkpointer.restore(latest, run.initial_state, index_template)
    checkpointer.close()
    return _with_current_prefix(run, restored.state.params), restored.state, restored.index
