"""The paper's regime in the benchmarks (emoji set, pretrained backbone): the code path on
a tiny synthetic emoji64.npz with a random-weights backbone, the cached-prefix memo, the
hierarchy view, the README tables and ``--check`` of the stored results."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402
import convergence  # noqa: E402
import hierarchy  # noqa: E402
import tables  # noqa: E402


def write_emoji(path: Path, *, subcategories=12, emoji_per_sub=2, images_per_emoji=6, size=32):
    """A synthetic emoji64.npz: every emoji a random picture plus noise; two categories."""
    rng = np.random.default_rng(0)
    classes = subcategories * emoji_per_sub
    y = np.repeat(np.arange(classes), images_per_emoji).astype(np.int32)
    subcategory = (y // emoji_per_sub).astype(np.int32)
    pictures = rng.integers(0, 256, (classes, size, size, 3))
    noise = rng.normal(0, 20, (len(y), size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        x=np.clip(pictures[y] + noise, 0, 255).astype(np.uint8),
        y=y,
        style=np.zeros(len(y), np.int8),
        tone=np.zeros(len(y), np.int8),
        subcategory=subcategory,
        category=(subcategory % 2).astype(np.int32),
        split=(y >= classes // 2).astype(np.int8),
        duplicate=np.zeros(len(y), np.int8),
        class_names=np.array([f"emoji{i}" for i in range(classes)]),
        class_unified=np.array([f"{0x1F600 + i:X}" for i in range(classes)]),
        subcategory_names=np.array([f"sub{i}" for i in range(subcategories)]),
        category_names=np.array(["even", "odd"]),
        style_names=np.array(["google", "twitter", "openmoji-color", "openmoji-black"]),
    )


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory):
    """One tiny emoji_subcategory run of magnet and triplet (2 steps, 1 seed)."""
    root = tmp_path_factory.mktemp("paper")
    write_emoji(root / "emoji" / "emoji64.npz")
    output = root / "convergence_emoji_subcategory.json"
    code = convergence.main(
        [
            "--regime",
            "emoji_subcategory",
            "--data-dir",
            str(root),
            "--random-init",
            "--image-size",
            "32",
            "--min-images",
            "0",
            "--smoke",
            "--methods",
            "magnet",
            "triplet",
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--sweep-steps",
            "1",
            "--seeds",
            "1",
            "--output",
            str(output),
        ]  # fmt: skip
    )
    assert code == 0
    return root, output


@pytest.mark.slow
def test_emoji_regime_runs_and_check_agrees(smoke_result):
    _, output = smoke_result
    results = json.loads(output.read_text())
    assert results["backbone"]["pretrained"] is False and results["backbone"]["cache_prefix"]
    assert results["emoji"]["label_level"] == "subcategory" and results["refresh_every"] == 1
    magnet = results["methods"]["magnet"]["seeds"][0]
    assert magnet["iterations"] == [0, 1, 2]
    for metric in ("knc_error", "knn1_error", "fine_error_at_1", "cluster_fine_purity"):
        assert all(0.0 <= v <= 1.0 for v in magnet["all_metrics"][metric]), metric
    # The purity summary is the mean over seeds of the stored curve.
    np.testing.assert_allclose(
        results["cluster_fine_purity"]["magnet"]["mean"],
        magnet["all_metrics"]["cluster_fine_purity"],
    )
    assert convergence.check(output) == 0
    output.with_name("tampered.json").write_text(
        json.dumps({**results, "relative_error_reduction_vs_triplet": 0.123})
    )
    assert convergence.check(output.with_name("tampered.json")) == 1


@pytest.mark.slow
def test_hierarchy_view_and_tables_from_the_smoke_run(smoke_result, tmp_path):
    _, output = smoke_result
    view = tmp_path / "hierarchy_emoji_subcategory.json"
    assert hierarchy.main(["--from-convergence", str(output), "--output", str(view)]) == 0
    source = json.loads(output.read_text())
    results = json.loads(view.read_text())
    assert set(results["methods"]) == {"magnet", "triplet"}  # no pseudo-methods
    finals = [s["fine_error_at_1"][-1] for s in results["methods"]["magnet"]["seeds"]]
    assert results["final"]["magnet"]["fine_error_at_1"]["mean"] == pytest.approx(np.mean(finals))
    stored = source["methods"]["magnet"]["seeds"][0]["all_metrics"]["fine_error_at_1"]
    assert results["methods"]["magnet"]["seeds"][0]["fine_error_at_1"] == stored
    assert hierarchy.check(view) == 0

    (tmp_path / output.name).write_text(output.read_text())
    block = tables.table(tmp_path)
    knc = source["methods"]["magnet"]["seeds"][0]["test_error"][-1]
    assert "| magnet | " in block and f"{100 * knc:.1f} ± 0.0" in block
    assert "Not measured yet" in block and "convergence_emoji_zero_shot.json" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{tables.BEGIN}\nold\n{tables.END}\nafter\n")
    text = tables.replace_block(readme.read_text(), block, readme)
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    with pytest.raises(ValueError, match="no <!-- paper-regime-table -->"):
        tables.replace_block("no block", block, readme)


@pytest.mark.slow  # 4.5 min at load 20 (three EfficientNet compiles); unmeasured idle
def test_prefix_memo_equals_the_uncached_prefix():
    """The memo returns exactly what the library's cache_prefix computes, also for a
    dataset whose rows repeat and come from an earlier one (then nothing is recomputed)."""
    from magnet_jax import training
    from magnet_jax.backbones import trainer
    from magnet_jax.config import TrainConfig
    from magnet_jax.data import Dataset

    rng = np.random.default_rng(0)
    x = rng.random((10, 32, 32, 3), dtype=np.float32)
    y = np.repeat(np.arange(2), 5).astype(np.int32)
    names = ("a", "b")
    dataset = Dataset(
        name="tiny", x_train=x[:6], y_train=y[:6], x_test=x[6:], y_test=y[6:], class_names=names
    )
    again = Dataset(name="tiny", x_train=x[[6, 0, 9]], y_train=y[[6, 0, 9]], x_test=x[[1, 1]],
                    y_test=y[[1, 1]], class_names=names)  # fmt: skip
    config = TrainConfig(
        dataset="tiny", backbone="efficientnet_lite0", image_size=32, freeze_stages=3,
        cache_prefix=True, loss="softmax", clusters_per_batch=2, examples_per_cluster=2,
        embedding_dim=8, steps=1, workdir="/nonexistent-unused",
    )  # fmt: skip
    original = trainer.cache_prefix
    uncached = training.prepare(config, dataset)
    every = np.concatenate([np.asarray(uncached.data.x), np.asarray(uncached.x_test)])
    memo = _common.PrefixMemo().install()
    try:
        first = training.prepare(config, dataset)
        computed = []
        memo.original = lambda *a: computed.append(len(a[4])) or original(*a)
        second = training.prepare(config, again)
    finally:
        trainer.cache_prefix = original
    np.testing.assert_allclose(np.asarray(first.data.x), every[:6], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(first.x_test), every[6:], rtol=1e-6, atol=1e-6)
    assert computed == []  # every image of `again` was computed for `dataset`
    memoized = np.concatenate([np.asarray(first.data.x), np.asarray(first.x_test)])
    np.testing.assert_array_equal(np.asarray(second.data.x), memoized[[6, 0, 9]])
    np.testing.assert_array_equal(np.asarray(second.x_test), memoized[[1, 1]])
    assert second.finetune.prefix_stages == 3


@pytest.mark.parametrize(
    "name", ["convergence_emoji_subcategory.json", "convergence_emoji_zero_shot.json"]
)
def test_stored_convergence_results_agree_with_check(name):
    path = RESULTS / name
    if not path.is_file():
        pytest.skip(f"{name} not measured")
    assert convergence.check(path) == 0


@pytest.mark.parametrize(
    "name", ["hierarchy_emoji_subcategory.json", "hierarchy_emoji_category.json"]
)
def test_stored_hierarchy_results_agree_with_check(name):
    path = RESULTS / name
    if not path.is_file():
        pytest.skip(f"{name} not measured")
    assert hierarchy.check(path) == 0


@pytest.mark.parametrize(
    "script, name",
    [
        (convergence, "convergence_emoji_subcategory"),
        (convergence, "convergence_emoji_zero_shot"),
        (hierarchy, "hierarchy_emoji_category"),
    ],
)
def test_merge_of_the_stored_parts_gives_the_stored_results(script, name, tmp_path):
    """``--merge``: the per-method files under results/parts merge into the stored file."""
    stored = json.loads((RESULTS / f"{name}.json").read_text())
    parts = [str(RESULTS / "parts" / part["file"]) for part in stored["parts"]]
    output = tmp_path / f"{name}.json"
    assert script.main(["--merge", *parts, "--output", str(output)]) == 0
    assert json.loads(output.read_text()) == stored
    assert output.with_suffix(".png").is_file()


@pytest.mark.parametrize("script", [convergence, hierarchy])
def test_merge_errors_name_the_problem(script, tmp_path, capsys):
    part = RESULTS / "parts" / "hierarchy_emoji_category.magnet.json"
    assert script.main(["--merge", str(part)]) == 2
    assert "--merge needs --output" in capsys.readouterr().err
    missing = tmp_path / "missing.json"
    assert script.main(["--merge", str(missing), "--output", str(tmp_path / "o.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
