"""What the trainer (:mod:`magnet_jax.training`) needs for a ``--backbone`` run, kept here so
that the trainer only dispatches: building the model, the optimizer's labels, the graph
that trains batch norm, and the cached prefix.

A backbone run's model is the usual :class:`~magnet_jax.models.EmbeddingModel` whose trunk
is a :class:`~magnet_jax.backbones.finetune.BackboneEmbedding` (the backbone, then the
linear embedding head). Parameters are float32; ``dtype='bfloat16'`` runs the backbone's
convolutions in bfloat16.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magnet_jax import backbones
from magnet_jax.backbones import finetune
from magnet_jax.models import EmbeddingModel

# Datasets hold images in [0, 1]; the backbones take 0-255.
INPUT_SCALE = 255.0
DEFAULT_IMAGE_SIZE = 224


@dataclasses.dataclass
class FinetuneSetup:
    """A backbone run's extras.

    labels: ``head``/``backbone``/``frozen`` per state leaf (:func:`finetune.param_labels`).
    train_graphdef: the model's graph with batch norm as the train step runs it (batch
        statistics in the trainable stages with ``train_bn``; the same as the evaluation
        graph otherwise).
    prefix_stages: N when the inputs are the cached output of the first N stages, else 0.
    prefix_params: the values of the prefix's state that computed the cache (host copies).
    """

    labels: Any
    train_graphdef: Any
    prefix_stages: int = 0
    prefix_params: Any = None


def _dtype(config) -> Any:
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def create_model(
    config, input_shape, *, num_classes: int, classifier: bool, proxies: bool
) -> EmbeddingModel:
    """The embedding model of a ``--backbone`` run (weights from ``--pretrained`` or
    ``--weights``; otherwise seeded random)."""
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or input_shape[-1] not in (1, 3):
        raise ValueError(
            f"--backbone {config.backbone} needs images [H, W, 1 or 3]; the dataset "
            f"{config.dataset!r} has examples of shape {input_shape}"
        )
    rngs = nnx.Rngs(config.seed)
    backbone = backbones.create(
        config.backbone,
        pretrained=config.pretrained,
        weights=config.weights,
        rngs=rngs,
        image_size=config.image_size or DEFAULT_IMAGE_SIZE,
        dtype=_dtype(config),
    )
    if config.freeze_stages > backbone.num_stages:
        raise ValueError(
            f"--freeze-stages {config.freeze_stages}: {config.backbone} has {backbone.num_stages} "
            f"stages ({', '.join(backbone.stage_names)})"
        )
    trunk = finetune.BackboneEmbedding(
        backbone,
        config.embedding_dim,
        normalize=False,  # EmbeddingModel normalises
        use_bias=config.normalize,  # as models.create_model: a bias only before normalising
        input_scale=INPUT_SCALE,
        input_stage=config.freeze_stages if config.cache_prefix else 0,
        rngs=rngs,
    )
    return EmbeddingModel(
        trunk,
        embedding_dim=config.embedding_dim,
        normalize=config.normalize,
        num_classes=num_classes,
        classifier=classifier,
        proxies=proxies,
        rngs=rngs,
    )


def setup(config, model: EmbeddingModel) -> FinetuneSetup:
    """Labels and the training graph; leaves ``model`` in inference mode."""
    labels = finetune.param_labels(model, freeze_stages=config.freeze_stages)
    finetune.set_batch_norm_training(model, config.train_bn, freeze_stages=config.freeze_stages)
    train_graphdef = nnx.graphdef(model)
    finetune.set_batch_norm_training(model, False)
    return FinetuneSetup(labels=labels, train_graphdef=train_graphdef)


def _prefix_params(setup_: FinetuneSetup, graphdef, params) -> dict:
    """Host copies of the state leaves that the cached prefix depends on."""
    model = nnx.merge(graphdef, nnx.State(params))
    ((_, backbone),) = finetune.find_backbones(model)
    result = {}
    for path, variable in nnx.to_flat_state(nnx.state(backbone)):
        stage = backbone.stage_of_path(tuple(path))
        if stage is not None and stage < setup_.prefix_stages:
            result[tuple(path)] = np.asarray(variable.get_value())
    return result


def cache_prefix(config, setup_: FinetuneSetup, graphdef, params, x_train, x_test):
    """``(x_train, x_test)`` replaced by the output of the backbone's frozen first
    ``freeze_stages`` stages (host arrays); records what they were computed from."""
    model = nnx.merge(graphdef, nnx.State(params))
    ((_, backbone),) = finetune.find_backbones(model)
    setup_.prefix_stages = config.freeze_stages
    setup_.prefix_params = _prefix_params(setup_, graphdef, params)
    options = {"input_scale": INPUT_SCALE, "chunk_size": config.eval_chunk_size}
    return (
        finetune.compute_prefix(backbone, x_train, config.freeze_stages, **options),
        finetune.compute_prefix(backbone, x_test, config.freeze_stages, **options),
    )


def prefix_is_current(setup_: FinetuneSetup | None, graphdef, params) -> bool:
    """Whether a run's cached prefix was computed from these parameters (a resumed run
    whose checkpoint holds other frozen values, e.g. warm-started by --init-from, must
    recompute it)."""
    if setup_ is None or not setup_.prefix_stages:
        return True
    current = _prefix_params(setup_, graphdef, params)
    return current.keys() == setup_.prefix_params.keys() and all(
        np.array_equal(current[k], setup_.prefix_params[k]) for k in current
    )


def pooled_features(graphdef, params, x, chunk_size: int) -> np.ndarray:
    """The backbone's pooled features (before the embedding head) of every row of ``x``
    (an array, or a :class:`~magnet_jax.streaming.Loader` read on the host)."""
    model = nnx.merge(graphdef, nnx.State(params))
    if not finetune.find_backbones(model):
        raise ValueError("features are a backbone's: this run has no --backbone")

    @jax.jit
    def run(params, rows):
        return nnx.merge(graphdef, nnx.State(params)).trunk.features(rows)

    from magnet_jax import streaming

    count = len(x) if isinstance(x, streaming.Loader) else x.shape[0]
    chunk = max(1, min(chunk_size, count))
    spans = [(start, min(start + chunk, count)) for start in range(0, count, chunk)]
    if isinstance(x, streaming.Loader):  # --input stream: read on the host, chunk by chunk
        chunks = x.chunks([stop - chunk for _, stop in spans], chunk)
    else:  # the last chunk overlaps
        chunks = (jax.lax.dynamic_slice_in_dim(x, stop - chunk, chunk) for _, stop in spans)
    parts = [
        np.asarray(run(params, rows))[chunk - (stop - start) :]
        for (start, stop), rows in zip(spans, chunks)
    ]
    return np.concatenate(parts, axis=0)
