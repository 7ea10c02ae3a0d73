"""Streaming input (--input stream): the same pixels, batches and results as in memory."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip("grain")

from magnet_jax import input_choice, streaming, training  # noqa: E402
from magnet_jax.checkpoint import Checkpointer  # noqa: E402
from magnet_jax.config import TrainConfig  # noqa: E402
from magnet_jax.data import load_dataset  # noqa: E402
from magnet_jax.data.lazy import ImageFiles  # noqa: E402

SIZE = 8


def write_folder(root, classes=3, per_class=8, seed=0):
    """``classes`` subfolders of random RGB images of assorted sizes (PNG and JPEG)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            height, width = rng.integers(9, 20, size=2)
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            pixels[..., c] = 255  # a class colour, so that the classes can be learnt
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:02d}{suffix}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images") / "photos")


def _config(folder, tmp_path, **overrides):
    values = dict(
        dataset=f"folder:{folder}",
        image_size=SIZE,
        architecture="mlp",
        embedding_dim=8,
        steps=4,
        clusters_per_batch=3,
        examples_per_cluster=4,
        clusters_per_class=2,
        kmeans_iterations=5,
        refresh_every=2,
        eval_every=4,
        checkpoint_every=2,
        log_every=1,
        seed=1,
        num_devices=1,
        workdir=str(tmp_path / "run"),
    )
    values.update(overrides)
    return TrainConfig(**values)


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# -- the lazy files and the loader ------------------------------------------------------


def test_lazy_folder_has_the_in_memory_pixels_and_split(folder):
    memory = load_dataset(f"folder:{folder}", image_size=SIZE)
    lazy = load_dataset(f"folder:{folder}", image_size=SIZE, lazy=True)
    assert isinstance(lazy.x_train, ImageFiles) and isinstance(lazy.x_test, ImageFiles)
    assert lazy.x_train.shape == memory.x_train.shape
    np.testing.assert_array_equal(lazy.y_train, memory.y_train)
    np.testing.assert_array_equal(lazy.y_test, memory.y_test)
    # Row by row (what the loader reads) and as a whole (np.asarray decodes every file).
    for row in (0, 5, len(memory.x_train) - 1):
        np.testing.assert_array_equal(lazy.x_train[row], memory.x_train[row])
    np.testing.assert_array_equal(np.asarray(lazy.x_test), memory.x_test)


def test_lazy_files_need_an_image_size(folder):
    with pytest.raises(ValueError, match="--image-size"):
        load_dataset(f"folder:{folder}", lazy=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batch_is_the_gathered_rows(folder, workers):
    memory = load_dataset(f"folder:{folder}", image_size=SIZE)
    loader = streaming.Loader(
        load_dataset(f"folder:{folder}", image_size=SIZE, lazy=True).x_train, workers=workers
    )
    indices = np.array([3, 0, 3, 7, 1, 1, 0, 5])  # repeats: a cluster smaller than D
    rows, positions, read = loader.batch(indices, step=0)
    np.testing.assert_array_equal(rows[positions], memory.x_train[indices])
    np.testing.assert_array_equal(read[:5], [0, 1, 3, 5, 7])  # distinct rows, read once
    assert (read[5:] == np.iinfo(np.int32).max).all() and not rows[5:].any()
    # The streamed pass of a refresh: the in-memory rows, chunk by chunk.
    chunks = list(loader.chunks([0, 4, len(loader) - 4], 4))
    np.testing.assert_array_equal(chunks[1], memory.x_train[4:8])
    np.testing.assert_array_equal(chunks[2], memory.x_train[-4:])


def test_a_bad_image_mid_stream_names_the_file(tmp_path):
    root = write_folder(tmp_path / "photos", classes=2, per_class=4)
    bad = root / "class1" / "02.jpg"
    bad.write_bytes(b"not a JPEG at all")  # exists, so loading the list succeeds
    dataset = load_dataset(f"folder:{root}", image_size=SIZE, lazy=True)
    files = next(x for x in (dataset.x_train, dataset.x_test) if str(bad) in x.paths)
    row = list(files.paths).index(str(bad))
    loader = streaming.Loader(files, workers=2)
    good = [r for r in range(len(files)) if r != row]
    loader.batch(np.array(good[:3]), step=0)  # the other rows read fine
    with pytest.raises(ValueError, match="cannot read image") as error:
        loader.batch(np.array([good[0], row, good[1]]), step=3)
    assert f"cannot read image {bad} (row {row};" in str(error.value)
    with pytest.raises(ValueError, match="cannot read image"):
        list(loader.chunks([0, len(files) - 2], 2))  # a refresh's pass over the set


def test_lazy_missing_file_is_an_error_or_skipped(tmp_path):
    root = write_folder(tmp_path / "photos", classes=2, per_class=4)
    rows = [f"class{c}/{i:02d}{'.png' if i % 2 else '.jpg'},{c}" for c in (0, 1) for i in range(4)]
    (root / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\nclass0/gone.png,0\n")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_dataset(f"csv:{root / 'list.csv'}", image_size=SIZE, lazy=True)
    with pytest.warns(UserWarning, match="skipped 1 of 9"):
        dataset = load_dataset(
            f"csv:{root / 'list.csv'}", image_size=SIZE, lazy=True, skip_bad_images=True
        )
    assert dataset.num_train + dataset.num_test == 8


def test_host_crop_boxes_follow_the_device_distribution():
    """Host boxes lie in the image and are distributed like the on-device boxes of
    magnet_jax.augment (two-sample Kolmogorov-Smirnov on every coordinate)."""
    from scipy import stats

    from magnet_jax import augment

    rng = np.random.default_rng(0)
    height, width, count = 60, 90, 3000
    host = np.array([streaming.crop_box(rng, height, width) for _ in range(count)])
    top, left, box_h, box_w = host.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + box_h <= height + 1e-9).all() and (left + box_w <= width + 1e-9).all()
    device = np.asarray(augment.random_crop_boxes(jax.random.key(0), count, height, width))
    for coordinate in range(4):
        assert stats.ks_2samp(host[:, coordinate], device[:, coordinate]).pvalue > 1e-3


def test_host_crops_are_deterministic_per_step_and_position(folder):
    from PIL import Image

    files = load_dataset(f"folder:{folder}", image_size=SIZE, lazy=True).x_train
    loader = streaming.Loader(files, workers=2, host_crop=True, seed=5)
    indices = np.array([2, 2, 4, 6])
    first, positions, _ = loader.batch(indices, step=7)
    again, _, _ = streaming.Loader(files, workers=0, host_crop=True, seed=5).batch(indices, step=7)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(positions, np.arange(4))  # one crop per position
    assert not np.array_equal(first[0], first[1])  # the same row, two crops
    later, _, _ = loader.batch(indices, step=8)
    assert not np.array_equal(first, later)
    # Evaluation: the centre 87.5% of the shorter side, resized (a Pillow reference).
    with Image.open(files.paths[0]) as image:
        image = image.convert("RGB")
        side = min(image.size) * 0.875
        left, top = (image.width - side) / 2, (image.height - side) / 2
        expected = np.asarray(
            image.resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, left + side, top + side))
        )
    np.testing.assert_allclose(loader.eval_example(0) * 255, expected, atol=1e-4)


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"input": "disk"}, "--input"),
        ({"input": "stream", "sample_ahead": 2}, "--sample-ahead"),
        ({"input": "stream", "loader_workers": -1}, "--loader-workers"),
        (
            {"input": "stream", "cache_prefix": True, "backbone": "resnet50", "freeze_stages": 1},
            "--cache-prefix",
        ),
    ],
)
def test_bad_stream_flags_are_named(overrides, message, folder, tmp_path):
    with pytest.raises(ValueError, match=message):
        _config(folder, tmp_path, **overrides).validate()


def test_stream_sets_the_lazy_load_option_for_image_files_only(folder, tmp_path):
    assert _config(folder, tmp_path, input="stream").load_options()["lazy"] is True
    assert "lazy" not in _config(folder, tmp_path).load_options()
    digits = TrainConfig(dataset="digits", input="stream", workdir=str(tmp_path))
    assert "lazy" not in digits.load_options()  # an array source: kept in host memory


# -- training --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss, ahead, devices, remembered",
    [("magnet", 0, 1, 0), ("triplet", 1, 1, 0), ("magnet", 0, 4, 0), ("magnet", 0, 1, 2)],
)
def test_streamed_training_equals_in_memory(folder, tmp_path, loss, ahead, devices, remembered):
    """--sample-ahead 0 draws the in-memory batches: the same losses, parameters, index
    and test embeddings bit for bit (on one device and sharded over four); a loss whose
    sampler reads no state (triplet) draws them with --sample-ahead 1 too. With
    --embedding-memory the second refresh reads only the rows the steps did not embed."""
    results = {}
    for source in ("memory", "stream"):
        config = _config(
            folder,
            tmp_path,
            loss=loss,
            input=source,
            sample_ahead=ahead,
            num_devices=devices,
            embedding_memory=remembered,
        )
        run = training.prepare(dataclasses.replace(config, loader_workers=2))
        state, method_state, losses = run.initial_state, run.method.init_state(run.info), []
        for step in (0, 2):  # a refresh (a streamed pass for stream), then two steps
            if run.method.has_refresh:
                method_state = training.refresh(run, state, method_state, step)
            state, method_state, mean_loss = run.steps.run_steps(state, method_state, run.data, 2)
            losses.append(float(mean_loss))
        test = np.asarray(run.steps.embed(state.params, run.x_test))
        results[source] = (losses, state.params, method_state, test)
    memory, stream = results["memory"], results["stream"]
    assert memory[0] == stream[0] and all(math.isfinite(x) for x in memory[0])
    assert _leaves_equal(memory[1:], stream[1:])


def _final(workdir):
    checkpointer = Checkpointer(workdir / "checkpoints")
    run = training.prepare(TrainConfig.from_dict(json.loads((workdir / "config.json").read_text())))
    restored = checkpointer.restore(
        checkpointer.latest_step(), run.initial_state, training.method_state_template(run)
    )
    checkpointer.close()
    return restored.state.params, restored.index


@pytest.mark.slow
def test_streamed_run_resumes_exactly(folder, tmp_path):
    """Host crops, two reading threads, batches drawn a step ahead: what kill -9 after the
    checkpoint at step 4 leaves, resumed, ends like the uninterrupted run."""
    config = _config(
        folder,
        tmp_path,
        input="stream",
        augment_crop=True,
        loader_workers=2,
        steps=8,
        checkpoint_every=4,
        eval_every=8,
        log_every=2,
        refresh_every=3,
    )
    workdir = tmp_path / "run"
    straight = training.train(config, progress=False)
    params, index = _final(workdir)
    history = (workdir / "history.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in history if '"train"' in line]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)

    shutil.rmtree(workdir / "checkpoints" / "8")
    (workdir / "metrics.json").unlink()
    resumed = training.train(config, progress=False)
    history = (workdir / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in history if '"train"' in line] == losses
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {
        k: v for k, v in straight.items() if k != "seconds"
    }
    params_resumed, index_resumed = _final(workdir)
    assert _leaves_equal(params, params_resumed)
    assert _leaves_equal(index, index_resumed)


# -- --input auto ----------------------------------------------------------------------


def _budget(monkeypatch, size):
    """Every device holds ``size`` bytes (what resolve_input compares the data with)."""
    monkeypatch.setattr(
        input_choice, "device_budget", lambda devices: input_choice.Budget(size, "patched")
    )


def test_memory_mode_bytes_of_digits_is_the_hand_count():
    digits = load_dataset("digits")
    # 1,797 images of 8 x 8 x 1 float32 pixels, training and test sets together.
    assert input_choice.memory_mode_bytes(digits.x_train, digits.x_test) == 1797 * 8 * 8 * 1 * 4


def test_memory_mode_bytes_of_image_files_is_their_decoded_size(folder):
    lazy = load_dataset(f"folder:{folder}", image_size=SIZE, lazy=True)
    # 3 classes of 8 images, decoded to SIZE x SIZE x 3 float32, without reading a file.
    assert input_choice.memory_mode_bytes(lazy.x_train, lazy.x_test) == 24 * SIZE * SIZE * 3 * 4


def test_budget_is_the_device_limit_or_a_share_of_the_host(monkeypatch):
    class Device:
        def __init__(self, stats, platform="gpu"):
            self.stats, self.platform, self.process_index = stats, platform, 0

        def memory_stats(self):
            return self.stats

    gpu = input_choice.device_budget([Device({"bytes_limit": 80_000, "bytes_in_use": 5})] * 2)
    assert gpu.bytes == 80_000
    monkeypatch.setattr(input_choice, "host_available_bytes", lambda: 12_000)
    assert input_choice.device_budget([Device(None, "cpu")] * 4).bytes == 3_000


def test_auto_keeps_digits_in_memory(tmp_path):
    config, dataset, line = training.resolve_input(TrainConfig(workdir=str(tmp_path)))
    assert config.input == "memory" and dataset.name == "digits"
    assert line.startswith("--input auto: memory (the training and test sets take 460.0 kB")


def test_auto_streams_image_files_that_would_not_fit(folder, tmp_path, monkeypatch):
    _budget(monkeypatch, 4 * 24 * SIZE * SIZE * 3 * 4 - 1)  # a byte short of 4x the data
    config, dataset, line = training.resolve_input(_config(folder, tmp_path, input="auto"))
    assert config.input == "stream" and isinstance(dataset.x_train, ImageFiles)
    assert "more than 25% of" in line
    _budget(monkeypatch, 4 * 24 * SIZE * SIZE * 3 * 4)  # fits: decoded by prepare
    config, dataset, line = training.resolve_input(_config(folder, tmp_path, input="auto"))
    assert config.input == "memory" and dataset is None and "within 25% of" in line


def test_auto_keeps_data_in_memory_when_it_cannot_stream(folder, tmp_path, monkeypatch):
    _budget(monkeypatch, 1)
    backbone = dict(backbone="resnet50", freeze_stages=1)
    cached = TrainConfig(dataset="digits", cache_prefix=True, workdir=str(tmp_path), **backbone)
    config, _, line = training.resolve_input(cached)
    assert config.input == "memory" and "but --cache-prefix keeps" in line
    unsized = _config(folder, tmp_path, input="auto", image_size=None)
    assert "--image-size" in input_choice.stream_blocker(unsized)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "grain" else real(name, *a)
    )
    assert "Grain" in input_choice.stream_blocker(TrainConfig(workdir=str(tmp_path)))


def test_help_of_input_lists_auto(capsys):
    from magnet_jax import cli

    assert cli.main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--input {auto,memory,stream}" in text
    assert "auto: stream when the training and test sets would take more than 25%" in text


def test_resumed_run_keeps_the_mode_it_started_in(folder, tmp_path, monkeypatch, capsys):
    """The estimate said stream when the run started; resumed where it says memory, the
    run still streams (config.json holds the resolved mode, never auto)."""
    config = _config(folder, tmp_path, input="auto", steps=4, eval_every=4)
    workdir = tmp_path / "run"
    _budget(monkeypatch, 1)
    training.train(config, progress=False)
    assert json.loads((workdir / "config.json").read_text())["input"] == "stream"
    assert "--input auto: stream (the training and test sets take" in capsys.readouterr().out

    shutil.rmtree(workdir / "checkpoints" / "4")
    _budget(monkeypatch, 1 << 50)  # now everything would fit
    prepared = []
    real_prepare = training.prepare
    monkeypatch.setattr(
        training, "prepare", lambda *a, **k: prepared.append(real_prepare(*a, **k)) or prepared[-1]
    )
    training.train(config, progress=False)
    assert isinstance(prepared[0].data.x, streaming.Loader)
    assert json.loads((workdir / "config.json").read_text())["input"] == "stream"
    assert "--input auto: stream (the mode this run started in)" in capsys.readouterr().out


def test_a_run_saved_before_auto_resumes_in_memory():
    from magnet_jax.workdir import check_same_run, keep_input

    saved = TrainConfig().to_dict()
    del saved["input"]  # a config.json from before --input existed: that run was in memory
    config = keep_input(saved, TrainConfig())
    assert config.input == "memory"
    check_same_run(saved, config, "W", 0)
    assert keep_input({**saved, "input": "stream"}, TrainConfig(input="memory")).input == "memory"
