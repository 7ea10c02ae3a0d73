"""Records the final loss and test metrics of every ``--loss`` after a short run on digits.

Run from the repository root: ``python tests/record_equality.py tests/data/equality.json``.
The file it writes is what ``tests/test_methods.py`` compares against, so that a refactor
of the trainer that changes any method's results (same seeds) fails a test.
"""

from __future__ import annotations

import json
import sys
import tempfile

from magnet_jax import training
from magnet_jax.config import TrainConfig

LOSSES = (
    "magnet",
    "triplet",
    "contrastive",
    "multi_similarity",
    "proxy_nca",
    "normalized_softmax",
    "arcface",
    "softmax",
)
STEPS = 60


def equality_config(loss: str, workdir: str, *, steps: int = STEPS) -> TrainConfig:
    """The small digits run whose results are recorded for ``loss``."""
    return TrainConfig(
        dataset="digits",
        loss=loss,
        steps=steps,
        clusters_per_batch=4,
        examples_per_cluster=4,
        clusters_per_class=2,
        kmeans_iterations=10,
        refresh_every=20,
        eval_every=STEPS,
        checkpoint_every=30,
        log_every=10,
        seed=3,
        num_devices=1,
        workdir=workdir,
    )


def record(loss: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        final = training.train(equality_config(loss, workdir), progress=False)
        with open(f"{workdir}/history.jsonl") as f:
            losses = [json.loads(line)["loss"] for line in f if json.loads(line)["kind"] == "train"]
    metrics = {k: v for k, v in final.items() if isinstance(v, float) and k != "seconds"}
    return {"train_losses": losses, "metrics": metrics}


if __name__ == "__main__":
    results = {loss: record(loss) for loss in LOSSES}
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(results, indent=1))
