"""benchmarks/plm.py's equal-size purity, by hand (no data, no training)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _plm_benchmark():
    spec = importlib.util.spec_from_file_location("plm_benchmark_under_test", BENCHMARKS / "plm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equal_size_purity_by_hand():
    labels = np.array([0, 0, 1, 1])
    neighbours = np.array([[1, 2], [0, 3], [3, 0], [2, 1]])
    # Every piece is the point and its nearest neighbour (n_i = 1), so the permutation of
    # the sizes changes nothing; point 3 is alone in its cluster, so it is left out.
    out = _plm_benchmark().equal_size_purity(
        neighbours, np.full(4, 2), labels, {"clusters": np.array([0, 0, 0, 1])}, seed=0
    )
    assert out["points"] == pytest.approx(0.75)
    assert out["mean_size"] == pytest.approx(1.0)
    assert out["plm"] == out["knn_table"] == out["knn_table_permuted_sizes"] == pytest.approx(1.0)
    # Points 0, 1: one of the two others of their cluster shares the class; point 2: none.
    assert out["clusters"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_equal_size_purity_uses_each_point_size():
    labels = np.array([0, 0, 1, 1, 0])
    neighbours = np.array([[1, 2], [0, 4], [3, 0], [2, 4], [0, 1]])
    sizes = np.array([3, 3, 2, 2, 3])  # n = 2, 2, 1, 1, 2; one cluster holds everyone
    out = _plm_benchmark().equal_size_purity(
        neighbours, sizes, labels, {"one": np.zeros(5, np.int32)}, seed=0
    )
    assert out["points"] == 1.0
    assert out["plm"] == pytest.approx((0.5 + 1.0 + 1.0 + 1.0 + 1.0) / 5)
    # The rest of the one cluster: 2 of 4 share the class for 0, 1, 4; 1 of 4 for 2, 3.
    assert out["one"] == pytest.approx((0.5 * 3 + 0.25 * 2) / 5)
