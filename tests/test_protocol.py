"""The class-disjoint protocol through the trainer, its flags, and its metrics against NumPy."""

import numpy as np
import pytest

from magnet_jax import cli, training
from magnet_jax.config import TrainConfig

_SMALL = dict(
    steps=3,
    clusters_per_class=2,
    clusters_per_batch=4,
    examples_per_cluster=4,
    eval_every=3,
    checkpoint_every=3,
    log_every=1,
    kmeans_iterations=5,
    num_devices=1,
    embedding_dim=8,
)


def brute_force_retrieval(embeddings, labels, ks):
    """Recall@k, R-precision, MAP@R in float64 NumPy, the test set as its own gallery."""
    embeddings = np.asarray(embeddings, np.float64)
    distances = ((embeddings[:, None] - embeddings[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    recall = {k: [] for k in ks}
    r_precision, map_at_r = [], []
    for i in range(len(labels)):
        order = np.argsort(distances[i], kind="stable")[: len(labels) - 1]
        relevant = labels[order] == labels[i]
        r = int(np.sum(labels == labels[i])) - 1
        if r == 0:
            continue
        for k in ks:
            recall[k].append(relevant[:k].any())
        r_precision.append(relevant[:r].mean())
        precision_at = np.cumsum(relevant[:r]) / np.arange(1, r + 1)
        map_at_r.append(np.sum(precision_at * relevant[:r]) / r)
    result = {f"recall_at_{k}": np.mean(v) for k, v in recall.items()}
    result["r_precision"] = np.mean(r_precision)
    result["mean_average_precision_at_r"] = np.mean(map_at_r)
    return result


def test_split_classes_evaluation_equals_numpy_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 9)
    features = rng.normal(size=(len(labels), 5)) + labels[:, None]
    np.savez(tmp_path / "f.npz", x=features, y=labels * 10)
    config = TrainConfig(dataset=f"npz:{tmp_path / 'f.npz'}", split="classes",
                         workdir=str(tmp_path / "run"), **_SMALL)  # fmt: skip
    run = training.prepare(config)
    train_classes = set(np.unique(np.asarray(run.data.labels)).tolist())
    assert train_classes == {0, 1, 2}  # no test class in what the sampler draws from
    assert set(np.unique(run.dataset.y_test).tolist()) == {3, 4, 5}
    assert run.dataset.num_test == 27
    metrics = training.evaluate(run, run.initial_state.params, None)
    assert "knn_error" not in metrics and "classifier_error" not in metrics
    embeddings = np.asarray(run.steps.embed(run.initial_state.params, run.x_test))
    expected = brute_force_retrieval(embeddings, run.dataset.y_test, (1, 2, 4, 8))
    assert set(expected) < set(metrics) and 0.0 <= metrics["nmi"] <= 1.0
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["magnet", "normalized_softmax"])
def test_split_classes_trains_on_half_and_reports_retrieval(tmp_path, loss):
    config = TrainConfig(dataset="digits", split="classes", loss=loss,
                         workdir=str(tmp_path / "run"), **_SMALL)  # fmt: skip
    run = training.prepare(config)
    train_classes = set(np.unique(np.asarray(run.data.labels)).tolist())
    test_classes = set(np.unique(run.dataset.y_test).tolist())
    assert train_classes == {0, 1, 2, 3, 4} and test_classes == {5, 6, 7, 8, 9}
    assert not run.dataset.test_classes_seen
    metrics = training.train(config, progress=False)
    for absent in ("knn_error", "knc_error", "classifier_error", "fine_error_at_1"):
        assert absent not in metrics
    for present in ("recall_at_1", "recall_at_8", "mean_average_precision_at_r", "nmi"):
        assert 0.0 <= metrics[present] <= 1.0

    run, state, _ = training.load_for_evaluation(config.workdir)
    embeddings = np.asarray(run.steps.embed(state.params, run.x_test))
    expected = brute_force_retrieval(embeddings, run.dataset.y_test, (1, 2, 4, 8))
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_default_split_still_reports_knn_and_knc(tmp_path):
    metrics = training.train(
        TrainConfig(dataset="digits", workdir=str(tmp_path / "run"), **_SMALL), progress=False
    )
    assert {"knn_error", "knc_error", "recall_at_1", "recall_at_8"} <= set(metrics)


def test_protocol_flags_reach_the_loader(monkeypatch):
    args = cli.build_parser().parse_args(
        [
            "train",
            "--dataset",
            "emoji",
            "--split",
            "classes",
            "--label-level",
            "subcategory",
            "--drop-duplicates",
            "--image-size",
            "32",
        ]  # fmt: skip
    )
    config = cli._config_from_args(args)
    config.validate()
    assert config.load_options() == {
        "image_size": (32, 32),
        "split": "classes",
        "label_level": "subcategory",
        "drop_duplicates": True,
    }
    assert TrainConfig().load_options() == {}


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(split="halves"), "unknown --split 'halves'"),
        (dict(dataset="emoji", label_level="genus"), "unknown --label-level 'genus'"),
        (
            dict(label_level="category"),
            "--label-level applies to emoji only, not to --dataset 'digits'",
        ),
        (dict(drop_duplicates=True), "--drop-duplicates applies to emoji only"),
        (
            dict(skip_bad_images=True),
            r"--skip-bad-images applies to folder:<dir>, csv:<file>, cub200",
        ),
        (dict(image_size=32), r"--image-size applies to tfds:<name> datasets only .*folder:<dir>"),
    ],
)
def test_config_refuses_misplaced_data_options(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes).validate()
    TrainConfig(dataset="folder:x", image_size=32, skip_bad_images=True).validate()
