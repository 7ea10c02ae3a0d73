"""Pictures of embeddings and learning curves (matplotlib, PNG, no display needed).

- :func:`plot_embedding_maps`: 2-D maps of embeddings coloured by class, side by side
  (e.g. before and after training, like figure 3 of the paper); t-SNE when d > 2.
- :func:`plot_learning_curves`: test error against iterations for one or several runs,
  with mean ± std bands when a run has several seeds.
- :func:`plot_clustering_diagnostics`: what changes at every refresh, for one or several
  runs: the k-means inertia, cluster purity (against fine labels) and, when it varies
  (agglomerative clustering), the number of clusters per class.
- :func:`plot_retrievals`: a few test queries, each followed by its top-k retrieved
  images framed green (same class) or red (another class).
- :func:`plot_runs`: all of them, plus the training loss, for work directories written by
  ``magnet-jax train``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def project_2d(embeddings: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """[N, d] -> [N, 2]: the embeddings themselves when d <= 2, else t-SNE."""
    embeddings = np.asarray(embeddings, np.float64)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, d], got shape {embeddings.shape}")
    if embeddings.shape[1] == 2:
        return embeddings
    if embeddings.shape[1] == 1:
        return np.concatenate([embeddings, np.zeros_like(embeddings)], axis=1)
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(5, (len(embeddings) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        embeddings
    )


def plot_embedding_maps(
    panels: Mapping[str, np.ndarray],
    labels: np.ndarray,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    max_points: int = 1000,
    seed: int = 0,
    title: str | None = None,
) -> str:
    """One 2-D map per panel (title -> embeddings [N, d]), coloured by ``labels`` [N].

    The same random subset of at most ``max_points`` examples is drawn in every panel (t-SNE
    is quadratic in the points), and the figure says how many of how many it shows.
    Returns the PNG's path.
    """
    labels = np.asarray(labels)
    for name, embeddings in panels.items():
        if len(embeddings) != len(labels):
            raise ValueError(
                f"panel {name!r} has {len(embeddings)} embeddings but there are {len(labels)} labels"
            )
    rng = np.random.default_rng(seed)
    subset = rng.permutation(len(labels))[:max_points]
    num_classes = int(labels.max()) + 1
    colours = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    projected = False
    for axis, (name, embeddings) in zip(axes[0], panels.items()):
        embeddings = np.asarray(embeddings)
        projected = projected or embeddings.shape[1] > 2
        points = project_2d(embeddings[subset], seed=seed)
        for c in range(num_classes):
            mask = labels[subset] == c
            label = class_names[c] if class_names is not None else str(c)
            axis.scatter(
                points[mask, 0], points[mask, 1], s=4, color=colours(c % colours.N), label=label
            )
        axis.set_title(name)
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0][-1].legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    shown = f"{'t-SNE of ' if projected else ''}{len(subset):,} of {len(labels):,} examples" + (
        " (a random subset)" if len(subset) < len(labels) else ""
    )
    figure.suptitle(f"{title}: {shown}" if title else shown, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return os.fspath(path)


def plot_learning_curves(
    curves: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float]]]],
    path: str | os.PathLike,
    *,
    ylabel: str = "test error",
    title: str | None = None,
) -> str:
    """Error against iterations: ``curves`` maps a method to one (iterations, errors) pair
    per seed. Several seeds are drawn as their mean with a ± std band (the seeds must
    share their iterations). Returns the PNG's path."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        if not runs:
            continue
        iterations = np.asarray(runs[0][0], float)
        errors = [np.asarray(e, float) for _, e in runs]
        if len(errors) > 1 and all(len(e) == len(iterations) for e in errors):
            stacked = np.stack(errors)
            mean, std = stacked.mean(0), stacked.std(0)
            axis.plot(iterations, mean, label=f"{name} (n={len(errors)})")
            axis.fill_between(iterations, mean - std, mean + std, alpha=0.2)
        else:
            for i, (its, errs) in enumerate(runs):
                axis.plot(its, errs, label=name if i == 0 else None)
    axis.set_xlabel("iterations")
    axis.set_ylabel(ylabel)
    if title:
        axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return os.fspath(path)


_CLUSTERING_PANELS = {
    "inertia": "k-means inertia (within-cluster SS / N)",
    "purity": "cluster purity (fine labels)",
    "clusters_per_class_mean": "valid clusters per class",
}


def clustering_panels(refreshes: Sequence[dict]) -> list[str]:
    """The diagnostics of ``refreshes`` (records of all runs) worth a panel: those logged,
    except the clusters per class when they never change (k-means keeps K per class)."""
    counts = ("clusters_per_class_mean", "clusters_per_class_min", "clusters_per_class_max")
    count_values = {h[key] for h in refreshes for key in counts if key in h}
    panels = [
        panel
        for panel in _CLUSTERING_PANELS
        if any(panel in h for h in refreshes)
        and (panel != "clusters_per_class_mean" or len(count_values) > 1)
    ]
    return panels or ["clusters_per_class_mean"]


def plot_clustering_diagnostics(
    histories: Mapping[str, Sequence[dict]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> str:
    """What changes from refresh to refresh, against iterations, from the ``"refresh"``
    records of each run's history (name -> records): the inertia, the cluster purity (when
    some run logged it: datasets with fine labels) and the clusters per class (mean, with
    the min–max range shaded) when they vary, as with agglomerative clustering; k-means
    always keeps K per class, a flat line not worth a panel. Returns the PNG's path."""
    refreshes = {
        name: [h for h in records if h.get("kind") == "refresh"]
        for name, records in histories.items()
    }
    panels = clustering_panels([h for runs in refreshes.values() for h in runs])
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for name, run_records in refreshes.items():
            run_records = [h for h in run_records if panel in h]
            if not run_records:
                continue
            steps = [h["step"] for h in run_records]
            (line,) = axis.plot(steps, [h[panel] for h in run_records], marker=".", label=name)
            if panel == "clusters_per_class_mean" and "clusters_per_class_min" in run_records[0]:
                axis.fill_between(
                    steps,
                    [h["clusters_per_class_min"] for h in run_records],
                    [h["clusters_per_class_max"] for h in run_records],
                    color=line.get_color(),
                    alpha=0.15,
                )
        axis.set_xlabel("iterations")
        axis.set_ylabel(_CLUSTERING_PANELS[panel])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return os.fspath(path)


CORRECT_COLOUR = (0.0, 0.6, 0.0)
WRONG_COLOUR = (0.85, 0.0, 0.0)
QUERY_COLOUR = (0.2, 0.2, 0.8)


def top_k_retrievals(embeddings: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """``[Q, k]`` gallery indices nearest (squared Euclidean) to each query, itself excluded.

    The gallery is every row of ``embeddings [N, d]``; ties go to the lower index.
    """
    embeddings = np.asarray(embeddings, np.float64)
    distances = ((embeddings[queries][:, None, :] - embeddings[None]) ** 2).sum(-1)
    distances[np.arange(len(queries)), queries] = np.inf
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def framed(image: np.ndarray, colour: Sequence[float], width: int) -> np.ndarray:
    """``[H, W, C]`` image in [0, 1] -> ``[H + 2w, W + 2w, 3]`` RGB inside a coloured frame."""
    image = np.asarray(image, np.float64)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    out = np.empty((image.shape[0] + 2 * width, image.shape[1] + 2 * width, 3))
    out[:] = np.asarray(colour, np.float64)
    out[width : width + image.shape[0], width : width + image.shape[1]] = np.clip(image, 0, 1)
    return out


def plot_retrievals(
    images: np.ndarray,
    labels: np.ndarray,
    embeddings: np.ndarray,
    path: str | os.PathLike,
    *,
    num_queries: int = 6,
    k: int = 5,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> str:
    """For a few random queries, the query and its ``k`` nearest other images.

    Each row starts with the query (blue frame) followed by its top-``k`` retrievals from
    the same set, nearest first, framed green when of the query's class and red when not.
    Queries are drawn among the examples whose class has another example.

    Args:
      images: ``[N, H, W, C]`` in [0, 1] (C = 1 or 3).
      labels: ``[N]`` class ids.
      embeddings: ``[N, d]``.
      path: the PNG to write.
      num_queries: rows (fewer when fewer examples qualify).
      k: retrievals per row.
      class_names: names of the class ids, for the titles.
      seed: which queries.

    Returns:
      The PNG's path.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or len(images) != len(labels) or len(embeddings) != len(labels):
        raise ValueError(
            f"plot_retrievals needs images [N, H, W, C], labels [N], embeddings [N, d]; got "
            f"{images.shape}, {labels.shape}, {np.shape(embeddings)}"
        )
    _, class_of, class_sizes = np.unique(labels, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(class_sizes[class_of] > 1)
    if not len(eligible):
        raise ValueError("plot_retrievals needs a class with at least two examples")
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(eligible, min(num_queries, len(eligible)), replace=False))
    k = min(k, len(labels) - 1)
    neighbours = top_k_retrievals(embeddings, queries, k)
    width = max(1, images.shape[1] // 12)

    def name(label):
        return class_names[label] if class_names is not None else str(label)

    figure, axes = plt.subplots(
        len(queries), k + 1, figsize=(1.4 * (k + 1), 1.5 * len(queries)), squeeze=False
    )
    for row, (query, found) in enumerate(zip(queries, neighbours)):
        axes[row, 0].imshow(framed(images[query], QUERY_COLOUR, width))
        axes[row, 0].set_title(f"query: {name(labels[query])}"[:24], fontsize=6)
        for column, item in enumerate(found, start=1):
            correct = labels[item] == labels[query]
            colour = CORRECT_COLOUR if correct else WRONG_COLOUR
            axes[row, column].imshow(framed(images[item], colour, width))
            axes[row, column].set_title(name(labels[item])[:20], fontsize=6, color=colour)
    for axis in axes.ravel():
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return os.fspath(path)


def read_history(workdir: str | os.PathLike) -> list[dict]:
    path = os.path.join(workdir, "history.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no history in {os.path.abspath(workdir)}: {path} is missing")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _run_name(workdir: str) -> str:
    return os.path.basename(os.path.normpath(workdir))


def plot_runs(
    workdirs: Sequence[str], *, output_dir: str | None = None, max_points: int = 1000
) -> list[str]:
    """For the runs in ``workdirs``: a learning curve of every metric their evaluators logged
    (``curves_<metric>.png``), the training loss, the clustering diagnostics, and for each
    run a map of its test-set embeddings before and after training (``embeddings.png`` for
    one run, ``embeddings_<run>.png`` for several; t-SNE of at most ``max_points`` examples)
    and, for images, the top retrievals of a few test queries (``retrievals.png``, or
    ``retrievals_<run>.png``). Returns the PNG paths written."""
    from magnet_jax import training  # heavy import, only when plotting runs

    output_dir = output_dir or workdirs[0]
    os.makedirs(output_dir, exist_ok=True)
    written = []
    # One figure per metric that the runs' evaluators yielded, in the order first seen.
    histories = {_run_name(w): read_history(w) for w in workdirs}
    evals = {
        name: [h for h in history if h.get("kind") == "eval"] for name, history in histories.items()
    }
    metrics = dict.fromkeys(
        k
        for records in evals.values()
        for h in records
        for k, v in h.items()
        if k not in ("kind", "step") and isinstance(v, int | float)
    )
    for metric in metrics:
        curves = {
            name: [([h["step"] for h in points], [h[metric] for h in points])]
            for name, records in evals.items()
            if (points := [h for h in records if metric in h])
        }
        written.append(
            plot_learning_curves(
                curves,
                os.path.join(output_dir, f"curves_{metric}.png"),
                ylabel=metric.replace("_", " "),
            )
        )
    losses = {
        name: [([h["step"] for h in records], [h["loss"] for h in records])]
        for name, history in histories.items()
        if (records := [h for h in history if h.get("kind") == "train" and "loss" in h])
    }
    if losses:
        written.append(
            plot_learning_curves(
                losses,
                os.path.join(output_dir, "training_loss.png"),
                ylabel="training loss (mean over the steps since the previous point)",
            )
        )
    if any("clusters_per_class_mean" in h for records in histories.values() for h in records):
        written.append(
            plot_clustering_diagnostics(histories, os.path.join(output_dir, "clustering.png"))
        )
    for workdir in workdirs:
        run, state, _ = training.load_for_evaluation(workdir)
        before = np.asarray(run.steps.embed(run.initial_state.params, run.x_test))
        after = np.asarray(run.steps.embed(state.params, run.x_test))
        filename = (
            "embeddings.png" if len(workdirs) == 1 else f"embeddings_{_run_name(workdir)}.png"
        )
        written.append(
            plot_embedding_maps(
                {"before training": before, f"after {int(state.step)} steps": after},
                np.asarray(run.dataset.y_test),
                os.path.join(output_dir, filename),
                class_names=run.dataset.class_names,
                max_points=max_points,
                title=f"{_run_name(workdir)}, test set",
            )
        )
        if run.dataset.x_test.ndim == 4:
            filename = (
                "retrievals.png" if len(workdirs) == 1 else f"retrievals_{_run_name(workdir)}.png"
            )
            written.append(
                plot_retrievals(
                    run.dataset.x_test,
                    run.dataset.y_test,
                    after,
                    os.path.join(output_dir, filename),
                    class_names=run.dataset.class_names,
                )
            )
    return written
