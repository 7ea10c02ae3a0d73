"""Plots: files are written, are PNGs, and bad input is refused clearly."""

import numpy as np
import pytest

from magnet_jax import plotting


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_embedding_maps_side_by_side(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    before = rng.normal(size=(60, 8))
    after = before + 5 * labels[:, None]
    path = plotting.plot_embedding_maps(
        {"before": before, "after": after}, labels, tmp_path / "map.png"
    )
    assert _is_png(path)


def test_project_2d_keeps_2d_and_runs_tsne():
    points = np.random.default_rng(0).normal(size=(40, 2))
    np.testing.assert_array_equal(plotting.project_2d(points), points)
    assert plotting.project_2d(np.random.default_rng(0).normal(size=(40, 5))).shape == (40, 2)
    with pytest.raises(ValueError, match="shape"):
        plotting.project_2d(np.zeros(3))


def test_learning_curves_with_seed_bands(tmp_path):
    curves = {
        "magnet": [([0, 10, 20], [0.5, 0.2, 0.1]), ([0, 10, 20], [0.6, 0.3, 0.1])],
        "triplet": [([0, 10, 20], [0.5, 0.4, 0.3])],
    }
    assert _is_png(plotting.plot_learning_curves(curves, tmp_path / "curves.png"))


def test_mismatched_panel_is_refused(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        plotting.plot_embedding_maps({"x": np.zeros((5, 2))}, np.zeros(4, int), tmp_path / "x.png")


def test_missing_history_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="history.jsonl"):
        plotting.read_history(tmp_path)


def _refresh(step, mean, low, high, **extra):
    return {
        "kind": "refresh",
        "step": step,
        "clusters_per_class_mean": mean,
        "clusters_per_class_min": low,
        "clusters_per_class_max": high,
        "inertia": 1.0 / (step + 1),
        **extra,
    }


def test_clustering_panels_show_what_changes(tmp_path):
    kmeans = [_refresh(0, 4.0, 4.0, 4.0), _refresh(10, 4.0, 4.0, 4.0)]
    assert plotting.clustering_panels(kmeans) == ["inertia"]  # K per class never changes
    with_fine = [_refresh(0, 4.0, 4.0, 4.0, purity=0.5), _refresh(10, 4.0, 4.0, 4.0, purity=0.7)]
    assert plotting.clustering_panels(with_fine) == ["inertia", "purity"]
    agglomerative = [_refresh(0, 3.5, 2.0, 4.0), _refresh(10, 2.5, 1.0, 4.0)]
    assert plotting.clustering_panels(agglomerative) == ["inertia", "clusters_per_class_mean"]
    path = plotting.plot_clustering_diagnostics(
        {"a": kmeans, "b": agglomerative}, tmp_path / "c.png"
    )
    assert _is_png(path)


def test_embedding_maps_say_they_are_a_subset(tmp_path, monkeypatch):
    captions = []
    savefig = plotting.plt.Figure.savefig

    def capture(figure, *args, **kwargs):
        captions.append(figure._suptitle.get_text())
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(plotting.plt.Figure, "savefig", capture)
    labels = np.repeat(np.arange(3), 20)
    points = np.random.default_rng(0).normal(size=(60, 5))
    plotting.plot_embedding_maps({"x": points}, labels, tmp_path / "a.png", max_points=30)
    plotting.plot_embedding_maps({"x": points[:, :2]}, labels, tmp_path / "b.png")
    assert captions == ["t-SNE of 30 of 60 examples (a random subset)", "60 of 60 examples"]


@pytest.mark.slow
def test_plot_command_on_trained_runs(tmp_path):
    from magnet_jax import cli

    workdirs = [str(tmp_path / "run"), str(tmp_path / "other")]
    for workdir in workdirs:
        flags = ["train", "--steps", "40", "--eval-every", "20", "--log-every", "10"]
        assert cli.main([*flags, "--workdir", workdir, "--no-progress"]) == 0
    assert cli.main(["plot", "--workdir", workdirs[0]]) == 0
    for name in (
        "curves_knc_error.png",
        "curves_knn_error.png",
        "curves_recall_at_1.png",
        "curves_mean_average_precision_at_r.png",
        "training_loss.png",
        "clustering.png",
        "embeddings.png",
        "retrievals.png",
    ):
        assert _is_png(tmp_path / "run" / name)
    # Several runs: one embedding map each.
    assert cli.main(["plot", "--workdir", *workdirs, "--output", str(tmp_path / "both")]) == 0
    for name in ("embeddings_run.png", "embeddings_other.png", "training_loss.png"):
        assert _is_png(tmp_path / "both" / name)
    workdir = workdirs[0]
    assert cli.main(["evaluate", "--workdir", workdir]) == 0
    assert (tmp_path / "run" / "evaluation.json").exists()


def test_top_k_retrievals_excludes_the_query_and_sorts_by_distance():
    embeddings = np.array([[0.0], [0.1], [5.0], [0.3], [4.0]])
    neighbours = plotting.top_k_retrievals(embeddings, np.array([0, 2]), 3)
    np.testing.assert_array_equal(neighbours, [[1, 3, 4], [4, 3, 1]])


def test_retrieval_pictures_frame_correct_green_and_wrong_red(tmp_path):
    tile = plotting.framed(np.full((4, 4, 1), 0.5), plotting.WRONG_COLOUR, 2)
    assert tile.shape == (8, 8, 3)
    np.testing.assert_allclose(tile[0, 0], plotting.WRONG_COLOUR)
    np.testing.assert_allclose(tile[4, 4], [0.5, 0.5, 0.5])
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 3)
    images = rng.random((12, 8, 8, 3))
    path = plotting.plot_retrievals(
        images, labels, rng.normal(size=(12, 2)), tmp_path / "r.png", num_queries=3, k=4
    )
    assert _is_png(path)
    with pytest.raises(ValueError, match="needs images"):
        plotting.plot_retrievals(images[:, 0], labels, images[:, 0, 0], tmp_path / "x.png")
