"""``magnet-jax embed``: a trained run's embeddings (or its backbone's pooled features) of
its dataset, as an ``.npz`` that ``--dataset npz:FILE`` reads back (``x``, ``y``,
``x_test``, ``y_test``), for users who bring their own pipeline."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["export_embeddings"]


def export_embeddings(workdir: str, output: str, *, features: bool = False) -> dict[str, tuple]:
    """Writes the embeddings of the training and test sets at the run's latest checkpoint.

    Args:
        workdir: a run's work directory.
        output: the ``.npz`` file to write (atomically; its folder is created).
        features: the backbone's pooled features instead of the embeddings (``--backbone``
            runs only).

    Returns:
        ``{name: shape}`` of the arrays written.
    """
    from magnet_jax.backbones import trainer as backbone_trainer
    from magnet_jax.training import load_for_evaluation

    if not str(output).endswith(".npz"):
        raise ValueError(f"--output must be an .npz file, got {output!r}")
    run, state, _ = load_for_evaluation(workdir)
    if features:
        chunk = run.config.eval_chunk_size
        x = backbone_trainer.pooled_features(run.graphdef, state.params, run.data.x, chunk)
        x_test = backbone_trainer.pooled_features(run.graphdef, state.params, run.x_test, chunk)
    else:
        x = np.asarray(run.steps.embed(state.params, run.data.x))
        x_test = np.asarray(run.steps.embed(state.params, run.x_test))
    arrays = {
        "x": np.asarray(x, np.float32),
        "y": np.asarray(run.dataset.y_train),
        "x_test": np.asarray(x_test, np.float32),
        "y_test": np.asarray(run.dataset.y_test),
    }
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(output)}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, output)
    return {name: array.shape for name, array in arrays.items()}
