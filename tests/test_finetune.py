"""Fine-tuning pieces: frozen stages and batch statistics get exactly zero updates, the
backbone's learning rate multiplier, batch-norm training, cached prefix == uncached."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from magnet_jax import backbones
from magnet_jax.backbones import finetune

SIZE = 32
FREEZE = 3


def _model(input_stage: int = 0, seed: int = 0):
    backbone = backbones.create("efficientnet_lite0", rngs=nnx.Rngs(seed), image_size=SIZE)
    return finetune.BackboneEmbedding(
        backbone, 8, normalize=True, input_stage=input_stage, input_scale=255.0, rngs=nnx.Rngs(1)
    )


def _data(count: int = 24):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (count, SIZE, SIZE, 3)).astype(np.float32)
    targets = rng.normal(size=(count, 8)).astype(np.float32)
    return images, targets


def _loss(model, batch):
    x, targets = batch
    return jnp.mean(jnp.sum(jnp.square(model(x) - targets), axis=-1))


def _flat(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _train(model, batches, *, make=optax.adam, multiplier=0.1, train_bn=False, freeze=FREEZE):
    finetune.set_batch_norm_training(model, train_bn, freeze_stages=freeze)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    labels = finetune.param_labels(model, freeze_stages=freeze)
    optimizer = finetune.finetune_optimizer(make, 1e-2, labels, backbone_lr_multiplier=multiplier)
    step = finetune.finetune_step(graphdef, optimizer, labels, _loss, train_batch_norm=train_bn)
    opt_state = optimizer.init(params)
    losses = []
    for batch in batches:
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    return params, labels, losses


def _batches(images, targets, steps=3, size=8):
    return [
        (images[i * size : (i + 1) * size], targets[i * size : (i + 1) * size])
        for i in range(steps)
    ]


def test_labels_sort_every_leaf():
    model = _model()
    labels = _flat(finetune.param_labels(model, freeze_stages=FREEZE))
    assert labels["['backbone']['conv_stem']['kernel']"] == "frozen"  # stage 0
    assert labels["['backbone']['blocks'][1]['depthwise_conv']['kernel']"] == "frozen"  # stage 2
    assert labels["['backbone']['blocks'][3]['depthwise_conv']['kernel']"] == "backbone"  # 3
    assert labels["['backbone']['blocks'][3]['bn1']['mean']"] == "frozen"  # batch statistics
    assert labels["['backbone']['blocks'][3]['bn1']['scale']"] == "backbone"
    assert labels["['backbone']['fc']['kernel']"] == "frozen"  # the unused ImageNet classifier
    assert labels["['head']['kernel']"] == "head"
    with pytest.raises(ValueError, match=r"freeze_stages must be in \[0, 9\]"):
        finetune.param_labels(model, freeze_stages=10)


def test_backbone_learning_rate_multiplier_and_frozen_updates():
    """The optimizer alone: head steps at lr, backbone at lr x multiplier (schedules too),
    frozen leaves exactly zero (and no weight decay)."""
    model = _model()
    labels = finetune.param_labels(model, freeze_stages=FREEZE)
    params = nnx.to_pure_dict(nnx.state(model))
    grads = jax.tree.map(jnp.ones_like, params)
    schedule = optax.linear_schedule(1e-2, 0.0, 10)
    for lr, expected_lr in ((1e-2, 1e-2), (schedule, 1e-2)):
        optimizer = finetune.finetune_optimizer(
            lambda lr: optax.chain(optax.add_decayed_weights(0.5), optax.sgd(lr)),
            lr,
            labels,
            backbone_lr_multiplier=0.1,
        )
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        for (path, update), (_, label), (_, param) in zip(
            jax.tree_util.tree_leaves_with_path(updates),
            jax.tree_util.tree_leaves_with_path(labels),
            jax.tree_util.tree_leaves_with_path(params),
        ):
            scale = {"head": 1.0, "backbone": 0.1, "frozen": 0.0}[label]
            expected = -expected_lr * scale * (1.0 + 0.5 * np.asarray(param))
            np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-12, err_msg=str(path))


@pytest.fixture(scope="module")
def runs():
    """The same fine-tuning run (AdamW with weight decay, first 3 stages frozen, batch norm
    trained in the rest, backbone lr x0.1) without and with the cached prefix."""
    images, targets = _data()
    uncached, cached = _model(), _model(input_stage=FREEZE)
    before = _flat(nnx.to_pure_dict(nnx.state(uncached)))
    make = lambda lr: optax.adamw(lr, weight_decay=0.1)  # noqa: E731
    params_u, labels, losses_u = _train(
        uncached, _batches(images, targets), make=make, train_bn=True
    )
    prefix = finetune.compute_prefix(
        cached.backbone, images, FREEZE, input_scale=255.0, chunk_size=10
    )
    direct = nnx.jit(lambda m, x: m(x))(_model(), images[:8])
    via_cache = nnx.jit(lambda m, x: m(x))(_model(input_stage=FREEZE), prefix[:8])
    params_c, _, losses_c = _train(cached, _batches(prefix, targets), make=make, train_bn=True)
    return {
        "before": before,
        "labels": _flat(labels),
        "uncached": (_flat(params_u), losses_u),
        "cached": (_flat(params_c), losses_c),
        "prefix": prefix,
        "direct": np.asarray(direct),
        "via_cache": np.asarray(via_cache),
        "stage_of": uncached.backbone.stage_of_path,
    }


def _stage(runs, name):
    keys = [k.strip("'") for k in name.strip("[]").split("][")]
    path = tuple(int(k) if k.isdigit() else k for k in keys)
    return runs["stage_of"](path[1:])


@pytest.mark.slow
def test_frozen_stages_and_batch_statistics_get_exactly_zero_updates(runs):
    before, labels = runs["before"], runs["labels"]
    after, losses = runs["uncached"]
    assert np.all(np.isfinite(losses))
    for name, label in labels.items():
        unchanged = np.array_equal(after[name], before[name])
        is_stat = name.endswith("['mean']") or name.endswith("['var']")
        if is_stat:  # statistics: moved by the forward pass in the trained stages only
            assert unchanged == (_stage(runs, name) < FREEZE), name
        elif label == "frozen":
            assert unchanged, name  # bit for bit, despite weight decay
        else:
            assert not unchanged, name
    assert sum(label == "frozen" for label in labels.values()) > 50


@pytest.mark.slow
def test_cached_prefix_equals_uncached_path(runs):
    assert runs["prefix"].shape == (24, 8, 8, 24)  # the input of group3 at 32x32
    np.testing.assert_allclose(runs["via_cache"], runs["direct"], rtol=1e-5, atol=1e-6)
    (flat_u, losses_u), (flat_c, losses_c) = runs["uncached"], runs["cached"]
    np.testing.assert_allclose(losses_c, losses_u, rtol=1e-5)
    assert flat_u.keys() == flat_c.keys()
    for name in flat_u:
        np.testing.assert_allclose(flat_c[name], flat_u[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_cached_prefix_refuses_trained_batch_norm_in_the_prefix():
    model = _model()
    model.backbone.set_batch_norm_training(True, 0)
    with pytest.raises(ValueError, match="running batch-norm statistics"):
        finetune.compute_prefix(model.backbone, np.zeros((2, SIZE, SIZE, 3)), FREEZE)
