"""benchmarks/refresh.py's summaries: pooling the seeds of several result files (no
data, no training)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _refresh_benchmark(results: Path):
    spec = importlib.util.spec_from_file_location(
        "refresh_benchmark_under_test", BENCHMARKS / "refresh.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._common.RESULTS = results
    return module


def _run(seed, knc, knn1):
    refreshes = [
        {"step": 0, "embed_seconds": 1.0, "cluster_seconds": 0.5},
        {"step": 10, "embed_seconds": 0.8 + seed / 10, "cluster_seconds": 0.2},
    ]
    return {
        "seed": seed,
        "refreshes": refreshes,
        "train_seconds": 30.0,
        "refresh_seconds": 2.5 + seed / 10,
        "refresh_fraction": (2.5 + seed / 10) / 30.0,
        "knc_error": knc,
        "knn1_error": knn1,
        "knn5_error": knc,
    }


def _result(seeds, full, memory, steps=20):
    return {
        "dataset": "fashion_mnist",
        "num_train_examples": 100,
        "steps": steps,
        "seeds": seeds,
        "arms": {"full": {}, "memory": {"embedding_memory": 10}},
        "config": {"lr": 0.001},
        "runs": {
            "full": [_run(s, *v) for s, v in zip(seeds, full)],
            "memory": [_run(s, *v) for s, v in zip(seeds, memory)],
        },
        "seconds": 60.0,
        "command": "python benchmarks/refresh.py",
        "environment": {"load_average": [0.1, 0.1, 0.1]},
        "load_average_after": [0.2, 0.2, 0.2],
    }


def test_summarise_pools_the_seeds_of_several_files(tmp_path):
    refresh = _refresh_benchmark(tmp_path)
    first = _result([0, 1], full=[(0.10, 0.12), (0.20, 0.21)], memory=[(0.11, 0.12), (0.18, 0.25)])
    second = _result([2], full=[(0.30, 0.30)], memory=[(0.33, 0.29)])
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))

    merged = refresh.main(["--summarise", "a", "b", "--output", "ab"])

    assert json.loads((tmp_path / "ab.json").read_text())["summary"] == merged["summary"]
    assert merged["seeds"] == [0, 1, 2]
    assert [m["name"] for m in merged["merged_from"]] == ["a", "b"]
    memory = merged["summary"]["memory"]
    paired = np.array([0.11 - 0.10, 0.18 - 0.20, 0.33 - 0.30])
    assert memory["knc_error_minus_full"]["values"] == pytest.approx(paired.tolist())
    assert memory["knc_error_minus_full"]["mean"] == pytest.approx(paired.mean())
    assert memory["knc_error_minus_full"]["std"] == pytest.approx(paired.std(ddof=1))
    assert memory["knn1_error_minus_full"]["values"] == pytest.approx([0.0, 0.04, -0.01])
    assert merged["summary"]["full"]["knc_error"]["mean"] == pytest.approx(0.2)
    # The inputs are left as they were.
    assert json.loads((tmp_path / "a.json").read_text()) == first


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(steps=30), "'steps'"),
        (lambda r: r.update(config={"lr": 0.01}), "'config'"),
        (lambda r: r.update(seeds=[1]), "repeat seeds"),
    ],
)
def test_summarise_refuses_files_of_different_settings(tmp_path, change, message):
    refresh = _refresh_benchmark(tmp_path)
    (tmp_path / "a.json").write_text(
        json.dumps(_result([0, 1], [(0.1, 0.1)] * 2, [(0.1, 0.1)] * 2))
    )
    other = _result([2], [(0.1, 0.1)], [(0.1, 0.1)])
    change(other)
    (tmp_path / "b.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=message):
        refresh.main(["--summarise", "a", "b", "--output", "ab"])
    with pytest.raises(SystemExit, match="--output"):
        refresh.main(["--summarise", "a", "b"])
