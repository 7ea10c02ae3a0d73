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

NOTEBOOKS = {
    "quickstart": QUICKSTART,
    "custom_training_loop": CUSTOM_LOOP,
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
