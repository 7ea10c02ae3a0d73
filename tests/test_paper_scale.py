"""Paper scale: the tfds options of TrainConfig (--image-size, --tfds-splits, --manual-dir)
and the fine-grained regimes of benchmarks/convergence.py (no data or TFDS needed)."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from magnet_jax import cli, methods, training
from magnet_jax.config import TrainConfig
from magnet_jax.data import Dataset

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _convergence():
    spec = importlib.util.spec_from_file_location(
        "convergence_under_test", BENCHMARKS / "convergence.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_images(name="tfds:fake", classes=10, per_class=12, size=16) -> Dataset:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes, dtype=np.int32), per_class)
    x = rng.random((len(y), size, size, 3), dtype=np.float32)
    return Dataset(name, x, y, x[::2].copy(), y[::2].copy(), tuple(f"c{i}" for i in range(classes)))


_SMALL = dict(
    steps=2,
    clusters_per_class=2,
    clusters_per_batch=4,
    examples_per_cluster=2,
    eval_every=1,
    checkpoint_every=1,
    log_every=1,
    kmeans_iterations=5,
    num_devices=1,
    embedding_dim=8,
)


# --------------------------------------------------------------------------------------
# TrainConfig
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(image_size=7), "image_size"),
        (dict(image_size=0), "image_size"),
        (dict(tfds_splits="train"), "tfds_splits"),
        (dict(tfds_splits="train,test,validation"), "tfds_splits"),
        (dict(tfds_splits="train,"), "tfds_splits"),
        (dict(tfds_splits=" ,test"), "tfds_splits"),
        (dict(manual_dir=""), "manual_dir"),
    ],
)
def test_config_rejects_bad_tfds_options(changes, field):
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        TrainConfig(dataset="tfds:stanford_dogs", **changes).validate()


def test_config_accepts_and_converts_tfds_options():
    config = TrainConfig(
        dataset="tfds:oxford_flowers102",
        image_size=128,
        tfds_splits="train+validation, test",
        manual_dir="/data/manual",
    )
    config.validate()
    assert config.tfds_split_pair == ("train+validation", "test")
    assert config.load_options() == {
        "image_size": (128, 128),
        "splits": ("train+validation", "test"),
        "manual_dir": "/data/manual",
    }
    assert TrainConfig().load_options() == {}
    assert TrainConfig.from_dict(config.to_dict()) == config  # round trip through config.json


@pytest.mark.parametrize(
    "field, value", [("image_size", 64), ("tfds_splits", "train,test"), ("manual_dir", "/x")]
)
def test_tfds_options_with_other_dataset_fail_in_prepare(field, value, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("load_dataset must not be reached")

    monkeypatch.setattr(training, "load_dataset", no_loading)
    config = TrainConfig(dataset="fashion_mnist", workdir="/nonexistent-unused", **{field: value})
    with pytest.raises(
        ValueError, match=rf"{field.replace('_', '-')}.*tfds:<name> datasets only.*fashion_mnist"
    ):
        training.prepare(config)


def test_cli_parses_tfds_flags():
    args = cli.build_parser().parse_args(
        [
            "train",
            "--dataset",
            "tfds:oxford_iiit_pet",
            "--image-size",
            "96",
            "--tfds-splits",
            "train,test",
            "--manual-dir",
            "/data/manual",
        ]
    )
    config = cli._config_from_args(args)
    assert (config.image_size, config.tfds_splits, config.manual_dir) == (
        96,
        "train,test",
        "/data/manual",
    )
    defaults = cli._config_from_args(cli.build_parser().parse_args(["train"]))
    assert (defaults.image_size, defaults.tfds_splits, defaults.manual_dir) == (None, None, None)


def test_cli_reports_bad_tfds_option(capsys):
    assert (
        cli.main(
            [
                "train",
                "--dataset",
                "digits",
                "--image-size",
                "32",
                "--workdir",
                "/nonexistent-unused",
            ]
        )
        == 2
    )
    assert "--image-size" in capsys.readouterr().err


def test_prepare_and_load_for_evaluation_pass_tfds_options(tmp_path, monkeypatch):
    calls = []

    def fake_load(name, data_dir=None, **kwargs):
        calls.append((name, data_dir, kwargs))
        return _fake_images(name)

    monkeypatch.setattr(training, "load_dataset", fake_load)
    config = TrainConfig(
        dataset="tfds:stanford_dogs",
        data_dir="/tfds",
        image_size=16,
        tfds_splits="train,test",
        manual_dir="/manual",
        workdir=str(tmp_path / "run"),
        **_SMALL,
    )
    run = training.prepare(config)
    expected = (
        "tfds:stanford_dogs",
        "/tfds",
        {"image_size": (16, 16), "splits": ("train", "test"), "manual_dir": "/manual"},
    )
    assert calls == [expected]
    assert run.dataset.x_train.shape[1:] == (16, 16, 3)

    training.train(config, progress=False)
    calls.clear()
    run, state, _ = training.load_for_evaluation(config.workdir)
    assert calls == [expected]  # evaluation reloads the data the run was trained on
    # The saved config is the one trained with: --input auto resolved to memory.
    assert run.config == dataclasses.replace(config, input="memory")
    assert int(state.step) == config.steps


# --------------------------------------------------------------------------------------
# benchmarks/convergence.py
# --------------------------------------------------------------------------------------


def test_convergence_paper_regimes():
    convergence = _convergence()
    expected = {
        "stanford_dogs": ("tfds:stanford_dogs", ("train", "test"), 12000),
        "oxford_flowers102": ("tfds:oxford_flowers102", ("train+validation", "test"), 2040),
        "oxford_iiit_pet": ("tfds:oxford_iiit_pet", ("train", "test"), 3680),
    }
    for name, (dataset, splits, num_train) in expected.items():
        regime = convergence.REGIMES[name]
        assert regime["dataset"] == dataset and regime["tfds_splits"] == splits
        assert regime["architecture"] == "resnet" and regime["image_size"] >= 64
        # 3 epochs of the training set at the script's batch of 48 (the paper's schedule).
        assert regime["steps"] == -(-3 * num_train // convergence.BATCH)
        m = regime["magnet"]
        assert m["clusters_per_batch"] * m["examples_per_cluster"] == convergence.BATCH
        assert (
            regime["classes_per_batch"] * (convergence.BATCH // regime["classes_per_batch"])
            == convergence.BATCH
        )
        # K clusters of at least D examples in the smallest class of the sweep's 90% split.
        per_class = {"stanford_dogs": 100, "oxford_flowers102": 20, "oxford_iiit_pet": 93}[name]
        assert m["clusters_per_class"] * m["examples_per_cluster"] <= 0.9 * per_class
    # The committed regimes are untouched.
    assert convergence.REGIMES["quick"]["dataset"] == "digits"
    assert "paper_scale" not in convergence.REGIMES["finetune_upper_body"]


def test_convergence_paper_configs_are_valid(monkeypatch):
    """The configs the script builds for a paper regime pass prepare's checks (on fake data)."""
    convergence = _convergence()
    regime = convergence.REGIMES["oxford_flowers102"]
    dataset = _fake_images("tfds:oxford_flowers102", classes=12, per_class=20, size=16)
    base = dict(
        dataset=dataset.name,
        embedding_dim=regime["embedding_dim"],
        architecture=regime["architecture"],
        num_devices=1,
    )
    from _common import make_config  # noqa: E402  (convergence put benchmarks/ on sys.path)

    for method in convergence.methods_for(regime, regime["lrs"]):
        config = make_config(base, method, {**method.grid[0], "steps": 1}, 0)
        config.validate()
        assert config.batch_size == convergence.BATCH
        info = training.data_info(config, dataset, methods.get_method_class(config.loss))
        method = methods.from_config(config, info)
        training._check_against_data(config, dataset, method, info, 1)


def test_load_init_trunk_reads_a_run(tmp_path):
    convergence = _convergence()
    config = TrainConfig(
        loss="softmax",
        dataset="digits",
        workdir=str(tmp_path / "source"),
        **{**_SMALL, "clusters_per_batch": 4},
    )
    training.train(config, progress=False)
    trunk, info = convergence.load_init_trunk(config.workdir)
    assert info["step"] == config.steps
    run = training.prepare(config)
    fresh = run.initial_state.params["trunk"]
    assert jax.tree.structure(trunk) == jax.tree.structure(jax.tree.map(np.asarray, fresh))
    with pytest.raises(ValueError, match="no such directory"):
        convergence.load_init_trunk(str(tmp_path / "missing"))


def test_convergence_without_tfds_fails_clearly(tmp_path):
    if importlib.util.find_spec("tensorflow_datasets") is not None:
        pytest.skip(
            "tensorflow-datasets is installed: the missing-package message cannot be tested"
        )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MAGNET_JAX_RESULTS": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "convergence.py"), "--regime", "stanford_dogs"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "tensorflow-datasets" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize(
    "flags",
    [
        ["--regime", "quick", "--manual-dir", "/x"],
        ["--regime", "mnist", "--image-size", "64"],
        ["--regime", "oxford_iiit_pet", "--image-size", "4"],
    ],
)
def test_convergence_tfds_flags_refused_where_they_do_not_apply(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _convergence().main(flags)
    assert exit_info.value.code == 2
    assert flags[2] in capsys.readouterr().err


def test_convergence_load_passes_tfds_options(monkeypatch):
    convergence = _convergence()
    calls = []

    def fake_load(name, data_dir=None, **kwargs):
        calls.append((name, data_dir, kwargs))
        return _fake_images(name)

    import magnet_jax.data

    monkeypatch.setattr(magnet_jax.data, "load_dataset", fake_load)
    regime = {**convergence.REGIMES["oxford_flowers102"], "image_size": 64}
    dataset, source = convergence.load("oxford_flowers102", "/tfds", "/manual", regime)
    assert source is None and dataset.name == "tfds:oxford_flowers102"
    assert calls == [
        (
            "tfds:oxford_flowers102",
            "/tfds",
            {
                "manual_dir": "/manual",
                "splits": ("train+validation", "test"),
                "image_size": (64, 64),
            },
        )
    ]
