"""Fine-tuning a pretrained backbone the way deep-metric-learning papers do.

- :class:`BackboneEmbedding`: a linear embedding head on the backbone's pooled features
  (optionally L2-normalised), the "embedding layer" of every DML paper.
- Batch norm keeps its frozen ImageNet statistics by default (the backbone is built in
  inference mode); :func:`set_batch_norm_training` switches the trainable stages to batch
  statistics, with running averages updated by the forward pass
  (:func:`updated_batch_stats`, :func:`with_batch_stats`).
- :func:`param_labels` sorts every state leaf into ``head``, ``backbone`` or ``frozen``
  (the first ``freeze_stages`` stages, all batch statistics, the unused ImageNet
  classifier); :func:`finetune_optimizer` gives the backbone a lower learning rate than
  the head with ``optax.multi_transform`` and exactly zero updates to ``frozen``;
  :func:`stop_frozen_gradients` keeps the backward pass out of the frozen leaves.
- :func:`compute_prefix`: when the first N stages are frozen their output is a fixed
  function of the image, so it can be computed once per dataset and training runs only
  the rest (``BackboneEmbedding(input_stage=N)``); the losses and updates are those of the
  uncached path.

All functions work on ``nnx.to_pure_dict`` trees of the *whole* model state (parameters
and batch statistics), the trees :mod:`magnet_jax.training` keeps in its ``TrainState``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from magnet_jax.backbones.common import Backbone

__all__ = [
    "BackboneEmbedding",
    "LABELS",
    "compute_prefix",
    "find_backbones",
    "finetune_optimizer",
    "finetune_step",
    "param_labels",
    "set_batch_norm_training",
    "stop_frozen_gradients",
    "updated_batch_stats",
    "with_batch_stats",
]

LABELS = ("head", "backbone", "frozen")


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


class BackboneEmbedding(nnx.Module):
    """``backbone`` -> pooled features -> linear embedding head (-> L2 normalisation).

    Args:
        backbone: a :class:`~magnet_jax.backbones.Backbone`.
        embedding_dim: the embedding size.
        normalize: L2-normalise the embeddings.
        use_bias: a bias on the head.
        input_scale: multiplies the inputs before the backbone's preprocessing, which
            expects 0-255 (255 for images in [0, 1], as :mod:`magnet_jax.data` holds them).
        input_stage: 0: the inputs are images; N > 0: they are the output of the backbone's
            first N stages (:func:`compute_prefix`), and only stages N onwards run.
        rngs: initialises the head.
    """

    def __init__(
        self,
        backbone: Backbone,
        embedding_dim: int,
        *,
        normalize: bool = False,
        use_bias: bool = True,
        input_scale: float = 1.0,
        input_stage: int = 0,
        rngs: nnx.Rngs,
    ):
        if not 0 <= input_stage <= backbone.num_stages:
            raise ValueError(
                f"input_stage must be in [0, {backbone.num_stages}] for {backbone.name}, "
                f"got {input_stage}"
            )
        self.backbone = backbone
        self.head = nnx.Linear(backbone.num_features, embedding_dim, use_bias=use_bias, rngs=rngs)
        self.normalize = normalize
        self.input_scale = float(input_scale)
        self.input_stage = int(input_stage)

    def features(self, x: jax.Array) -> jax.Array:
        """The backbone's pooled features ``[B, F]`` (float32)."""
        if self.input_stage == 0:
            return self.backbone(x * self.input_scale if self.input_scale != 1.0 else x)
        return self.backbone.features_from(x, self.input_stage)

    def __call__(self, x: jax.Array) -> jax.Array:
        embeddings = self.head(self.features(x))
        return _l2_normalize(embeddings) if self.normalize else embeddings


def find_backbones(model: nnx.Module) -> list[tuple[tuple, Backbone]]:
    """Every backbone inside ``model`` with its path."""
    return [
        (tuple(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, Backbone)
    ]


def param_labels(model: nnx.Module, *, freeze_stages: int = 0) -> dict:
    """A label per state leaf of ``model`` (a tree like ``nnx.to_pure_dict(nnx.state(model))``):

    - ``frozen``: batch statistics (moved only by the forward pass, never by the optimizer),
      leaves of a backbone's first ``freeze_stages`` stages, a backbone's ImageNet
      classifier (not used by the embedding);
    - ``backbone``: the other leaves of a backbone;
    - ``head``: everything else (embedding head, classifier, proxies).
    """
    found = find_backbones(model)
    for _, backbone in found:
        if not 0 <= freeze_stages <= backbone.num_stages:
            raise ValueError(
                f"freeze_stages must be in [0, {backbone.num_stages}] for {backbone.name} "
                f"(stages {', '.join(backbone.stage_names)}), got {freeze_stages}"
            )
    labels: dict = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        label = "head"
        for prefix, backbone in found:
            if tuple(path[: len(prefix)]) != prefix:
                continue
            stage = backbone.stage_of_path(tuple(path[len(prefix) :]))
            if isinstance(variable, nnx.BatchStat) or stage is None or stage < freeze_stages:
                label = "frozen"
            else:
                label = "backbone"
        if isinstance(variable, nnx.BatchStat):
            label = "frozen"
        node = labels
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = label
    return labels


def stop_frozen_gradients(params: Any, labels: Any) -> Any:
    """``params`` with ``stop_gradient`` on every ``frozen`` leaf: the backward pass skips
    them (a frozen prefix costs only its forward pass) and their gradient is exactly 0."""
    return jax.tree.map(
        lambda label, p: jax.lax.stop_gradient(p) if label == "frozen" else p, labels, params
    )


def finetune_optimizer(
    make: Callable[[Any], optax.GradientTransformation],
    lr: float | optax.Schedule,
    labels: Any,
    *,
    backbone_lr_multiplier: float = 1.0,
) -> optax.GradientTransformation:
    """``make(lr)`` for the head, ``make(lr * backbone_lr_multiplier)`` for the backbone,
    and ``optax.set_to_zero()`` (no state, exactly zero updates, no weight decay) for the
    frozen leaves, by ``optax.multi_transform`` over :func:`param_labels`' tree.

    ``lr`` may be a schedule; the backbone's is then the same schedule scaled.
    """
    if not backbone_lr_multiplier >= 0:
        raise ValueError(f"backbone_lr_multiplier must be >= 0, got {backbone_lr_multiplier}")
    if callable(lr):
        backbone_lr = lambda step: backbone_lr_multiplier * lr(step)  # noqa: E731
    else:
        backbone_lr = lr * backbone_lr_multiplier
    transforms = {
        "head": make(lr),
        "backbone": make(backbone_lr) if backbone_lr_multiplier > 0 else optax.set_to_zero(),
        "frozen": optax.set_to_zero(),
    }
    return optax.multi_transform(transforms, labels)


def set_batch_norm_training(model: nnx.Module, train: bool, *, freeze_stages: int = 0) -> None:
    """Batch norm of every backbone in ``model``: batch statistics in the stages from
    ``freeze_stages`` on when ``train``; frozen running statistics everywhere else."""
    for _, backbone in find_backbones(model):
        backbone.set_batch_norm_training(train, freeze_stages)


def updated_batch_stats(model: nnx.Module) -> dict:
    """The batch statistics of ``model`` after a forward pass (a pure dict)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def with_batch_stats(params: dict, stats: dict) -> dict:
    """``params`` (a pure dict of the whole state) with the leaves of ``stats`` replaced."""
    if not isinstance(stats, dict):
        return stats
    merged = dict(params)
    for key, value in stats.items():
        merged[key] = with_batch_stats(params[key], value)
    return merged


def finetune_step(
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    labels: Any,
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    *,
    train_batch_norm: bool = False,
):
    """A jitted ``(params, opt_state, batch) -> (params, opt_state, loss)`` for
    ``loss_fn(model, batch)``, with frozen leaves kept out of the backward pass and, with
    ``train_batch_norm``, the running statistics updated by the forward pass (build
    ``graphdef`` after :func:`set_batch_norm_training`). The trainer's step does the same."""

    def step(params, opt_state, batch):
        def loss_of(p):
            model = nnx.merge(graphdef, nnx.State(stop_frozen_gradients(p, labels)))
            loss = loss_fn(model, batch)
            stats = updated_batch_stats(model) if train_batch_norm else None
            return loss, stats

        (loss, stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if stats is not None:
            params = with_batch_stats(params, stats)
        return params, opt_state, loss

    return jax.jit(step)


def compute_prefix(
    backbone: Backbone,
    x: np.ndarray | jax.Array,
    num_stages: int,
    *,
    input_scale: float = 1.0,
    chunk_size: int = 256,
) -> np.ndarray:
    """The output of ``backbone``'s first ``num_stages`` stages (after its preprocessing)
    for every row of ``x``, in fixed-size jitted chunks; returned on the host.

    Batch norm in those stages must use running statistics (it does unless
    :func:`set_batch_norm_training` was told to train them): the prefix is then a fixed
    function of each image and ``features_from(compute_prefix(x, N), N)`` is the model's
    output on ``x``.
    """
    if not all(bn.use_running_average for bn in _prefix_batch_norms(backbone, num_stages)):
        raise ValueError(
            "the cached prefix must use running batch-norm statistics: its stages are "
            "frozen, so train batch norm only from stage freeze_stages on"
        )
    graphdef, state = nnx.split(backbone)

    @jax.jit
    def run(state, rows):
        module = nnx.merge(graphdef, state)
        return module.prefix(rows * input_scale if input_scale != 1.0 else rows, num_stages)

    x = np.asarray(x)
    count = x.shape[0]
    chunk = max(1, min(chunk_size, count))
    parts = []
    for start in range(0, count, chunk):
        rows = x[start : start + chunk]
        if rows.shape[0] < chunk:  # pad the last chunk: one compilation for all
            pad = np.zeros((chunk - rows.shape[0], *rows.shape[1:]), rows.dtype)
            out = run(state, np.concatenate([rows, pad]))[: rows.shape[0]]
        else:
            out = run(state, rows)
        parts.append(np.asarray(out))
    return np.concatenate(parts, axis=0)


def _prefix_batch_norms(backbone: Backbone, num_stages: int):
    for index in range(num_stages):
        for module in backbone.stage_modules(index):
            for _, sub in nnx.iter_graph(module):
                if isinstance(sub, nnx.BatchNorm):
                    yield sub
