"""Warm start (--init-from): grafting parameters from a previous run's checkpoint."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax import cli, training, warm_start
from magnet_jax.checkpoint import Checkpointer
from magnet_jax.config import TrainConfig
from magnet_jax.data import Dataset, load_dataset

# A constant learning rate: the resume test extends `steps`, which a cosine schedule forbids.
_SHORT = dict(
    lr_schedule="constant",
    eval_every=20,
    checkpoint_every=10,
    log_every=10,
    refresh_every=10,
    kmeans_iterations=10,
    num_devices=1,
)


def _subset(dataset: Dataset, classes) -> Dataset:
    """The examples of ``classes``, relabelled 0..len(classes)-1."""
    classes = np.asarray(classes)

    def pick(x, y):
        keep = np.isin(y, classes)
        return x[keep], np.searchsorted(classes, y[keep]).astype(np.int32)

    x_train, y_train = pick(dataset.x_train, dataset.y_train)
    x_test, y_test = pick(dataset.x_test, dataset.y_test)
    names = tuple(dataset.class_names[c] for c in classes)
    return Dataset(f"{dataset.name}{list(classes)}", x_train, y_train, x_test, y_test, names)


def _flat(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf) for path, leaf in flat
    }


def _history(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def source(tmp_path_factory, digits):
    """A softmax run on digits 0-4 (2 devices), and its final parameters."""
    workdir = tmp_path_factory.mktemp("init_from") / "source"
    config = TrainConfig(
        loss="softmax", steps=20, workdir=str(workdir), **{**_SHORT, "num_devices": 2}
    )
    dataset = _subset(digits, [0, 1, 2, 3, 4])
    training.train(config, progress=False, dataset=dataset)
    run = training.prepare(config, dataset)
    checkpointer = Checkpointer(workdir / "checkpoints")
    params = checkpointer.restore(checkpointer.latest_step(), run.initial_state, None).state.params
    checkpointer.close()
    return workdir, _flat(params)


def _finetune_config(source_dir: Path, workdir: Path, **changes) -> TrainConfig:
    """Magnet Loss on digits 5-9 with a smaller embedding: the trunk's head does not fit."""
    values = {**_SHORT, "loss": "magnet", "embedding_dim": 16, "steps": 20, **changes}
    return TrainConfig(workdir=str(workdir), init_from=str(source_dir), **values)


def test_graft_params_copies_matching_paths_and_shapes():
    target = {
        "trunk": {
            "layers": {0: {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}},
            "head": {"kernel": np.zeros((3, 4))},
        },
        "proxies": np.zeros((5, 4)),
    }
    source = {
        "trunk": {
            "layers": {"0": {"kernel": np.arange(6.0).reshape(2, 3), "bias": np.ones(4)}},
            "head": {"kernel": np.ones((3, 2))},
        },
        "classifier": {"kernel": np.ones((4, 5))},
    }
    params, copied, skipped = warm_start.graft_params(target, source)
    assert copied == ["trunk/layers/0/kernel"]
    assert skipped == ["trunk/layers/0/bias", "trunk/head/kernel", "proxies"]
    np.testing.assert_array_equal(
        params["trunk"]["layers"][0]["kernel"], source["trunk"]["layers"]["0"]["kernel"]
    )
    assert (
        params["trunk"]["layers"][0]["bias"] is target["trunk"]["layers"][0]["bias"]
    )  # shape differs
    assert params["trunk"]["head"]["kernel"] is target["trunk"]["head"]["kernel"]  # shape differs
    assert params["proxies"] is target["proxies"]  # absent from the source
    assert "classifier" not in params  # the target's structure, whatever the source has
    assert list(params["trunk"]["layers"]) == [0]  # the target's keys, not the source's
    np.testing.assert_array_equal(target["trunk"]["layers"][0]["kernel"], 0.0)  # inputs untouched
    # A subtree where the target has a leaf (and the reverse) is no match; dtypes follow the target.
    params, copied, skipped = warm_start.graft_params(
        {"a": np.zeros(2, np.float32), "b": {"c": np.zeros(2)}},
        {"a": {"x": np.ones(2)}, "b": np.ones(2), "extra": 1},
    )
    assert copied == [] and skipped == ["a", "b/c"]
    params, copied, _ = warm_start.graft_params(
        {"a": jnp.zeros(3, jnp.float32)}, {"a": np.arange(3, dtype=np.float64)}
    )
    assert copied == ["a"] and params["a"].dtype == np.float32
    np.testing.assert_array_equal(params["a"], [0.0, 1.0, 2.0])


def test_warm_start_copies_trunk_then_trains(tmp_path, source, digits):
    source_dir, source_params = source
    dataset = _subset(digits, [5, 6, 7, 8, 9])
    config = _finetune_config(source_dir, tmp_path / "finetune")
    # The checkpoints folder itself names the same checkpoint as its run's folder.
    assert warm_start.find_init_checkpoint(
        str(source_dir / "checkpoints")
    ) == warm_start.find_init_checkpoint(str(source_dir))

    run = training.prepare(config, dataset)
    fresh = training.prepare(dataclasses.replace(config, init_from=None), dataset)
    params = _flat(run.initial_state.params)
    trunk = sorted(name for name in params if name != "trunk/head/kernel")
    assert len(trunk) >= 4 and all(name.startswith("trunk/") for name in trunk)
    for name in trunk:  # exactly the source's values
        np.testing.assert_array_equal(params[name], source_params[name], err_msg=name)
    # The 32-d head of the source does not fit the 16-d embedding: freshly initialised.
    assert source_params["trunk/head/kernel"].shape == (256, 32)
    np.testing.assert_array_equal(
        params["trunk/head/kernel"], _flat(fresh.initial_state.params)["trunk/head/kernel"]
    )
    assert not any(name.startswith("classifier") for name in params)  # magnet has none
    # Optimizer state: fresh, as for the new parameters.
    for leaf in jax.tree.leaves(run.initial_state.opt_state):
        if leaf.ndim:
            np.testing.assert_array_equal(leaf, 0.0)
    assert int(run.initial_state.step) == 0
    warm = run.warm_start
    assert warm.source == str(source_dir / "checkpoints") and warm.source_step == 20
    assert sorted(warm.copied) == trunk and warm.skipped == ("trunk/head/kernel",)

    metrics = training.train(config, progress=False, dataset=dataset)
    assert metrics["steps"] == 20 and np.isfinite(metrics["knc_error"])
    history = _history(tmp_path / "finetune")
    assert history[0] == {
        "kind": "init",
        "step": 0,
        "source": str(source_dir / "checkpoints"),
        "source_step": 20,
        "copied": len(trunk),
        "total": len(trunk) + 1,
        "skipped": ["trunk/head/kernel"],
    }
    assert [h["kind"] for h in history].count("init") == 1
    assert {h["kind"] for h in history[1:]} == {"start", "refresh", "train", "eval"}


def test_resume_does_not_graft_again(tmp_path, source, digits):
    source_dir, _ = source
    dataset = _subset(digits, [5, 6, 7, 8, 9])
    own_source = tmp_path / "source"  # a copy this test may delete
    shutil.copytree(source_dir, own_source)
    straight = _finetune_config(own_source, tmp_path / "straight", steps=40)
    training.train(straight, progress=False, dataset=dataset)

    interrupted = _finetune_config(own_source, tmp_path / "interrupted", steps=20)
    training.train(interrupted, progress=False, dataset=dataset)
    # Resuming needs the run's own checkpoint only: the source may be gone.
    shutil.rmtree(own_source)
    resumed = dataclasses.replace(interrupted, steps=40)
    training.train(resumed, progress=False, dataset=dataset)

    def final(config):
        run = training.prepare(config, dataset, warm_start=False)
        checkpointer = Checkpointer(Path(config.workdir) / "checkpoints")
        step = checkpointer.latest_step()
        restored = checkpointer.restore(
            step, run.initial_state, training.method_state_template(run)
        )
        checkpointer.close()
        return step, restored.state.params

    step_a, params_a = final(straight)
    step_b, params_b = final(resumed)
    assert step_a == step_b == 40
    for (name, a), b in zip(_flat(params_a).items(), _flat(params_b).values(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=name)
    history_a, history_b = _history(tmp_path / "straight"), _history(tmp_path / "interrupted")
    # Every (re)start logs a "start" line: the resumed run has one more.
    assert [(h["kind"], h["step"]) for h in history_a if h["kind"] != "start"] == [
        (h["kind"], h["step"]) for h in history_b if h["kind"] != "start"
    ]
    assert [h["kind"] for h in history_b].count("init") == 1
    # init_from is part of the run: resuming with another (or none) is refused.
    with pytest.raises(ValueError, match="--init-from"):
        training.train(
            dataclasses.replace(resumed, init_from=None), progress=False, dataset=dataset
        )


def test_init_from_flag():
    args = cli.build_parser().parse_args(["train", "--init-from", "runs/pretrained"])
    assert cli._config_from_args(args).init_from == "runs/pretrained"
    assert TrainConfig().init_from is None


def _no_match_source(path: Path) -> Path:
    """A checkpoint whose parameters share no path with the digits model's."""
    state = training.TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"other": {"w": jnp.ones((3, 3))}},
        opt_state=(),
        rng=jax.random.PRNGKey(0),
    )
    checkpointer = Checkpointer(path / "checkpoints")
    checkpointer.save(5, state, None, {"history_lines": 0, "seconds": 0.0})
    checkpointer.close()
    return path


@pytest.mark.parametrize("case", ["missing", "no_checkpoints", "partial_checkpoint", "no_match"])
def test_bad_init_from_clear_error_nothing_written(tmp_path, capsys, case):
    if case == "missing":
        init_from, messages = tmp_path / "does-not-exist", ["no such directory", "does-not-exist"]
    elif case == "no_checkpoints":  # a run killed before its first checkpoint
        init_from, messages = tmp_path / "empty", ["no complete checkpoint", "checkpoints/<step>"]
        init_from.mkdir()
        (init_from / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    elif case == "partial_checkpoint":  # only a save that never finished
        init_from, messages = tmp_path / "partial", ["no complete checkpoint", "partial"]
        (init_from / "checkpoints" / "10.orbax-checkpoint-tmp-1").mkdir(parents=True)
    else:
        init_from, messages = (
            _no_match_source(tmp_path / "other"),
            ["nothing would be copied", "other"],
        )
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    workdir = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--steps",
            "2",
            "--workdir",
            str(workdir),
            "--init-from",
            str(init_from),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    for message in messages:
        assert message in err
    assert "Traceback" not in err
    assert not workdir.exists()
    assert (
        sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    )  # the source untouched too
