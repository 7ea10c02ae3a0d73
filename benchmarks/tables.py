"""The README tables of the paper's regime (the emoji set, a pretrained backbone), generated
from the results JSON files, never copied by hand.

Reads results/convergence_emoji_subcategory.json, hierarchy_emoji_subcategory.json,
hierarchy_emoji_category.json and convergence_emoji_zero_shot.json (the ones that exist)
and prints markdown; every number is recomputed from the stored per-seed curves (mean ±
std over seeds at the final iteration, and the pretrained features' own at iteration 0).
``--write`` replaces the block between ``<!-- paper-regime-table -->`` and
``<!-- /paper-regime-table -->`` in README.md and benchmarks/README.md.

  python benchmarks/tables.py            # print
  python benchmarks/tables.py --write    # update both READMEs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

BEGIN, END = "<!-- paper-regime-table -->", "<!-- /paper-regime-table -->"
ROOT = Path(__file__).resolve().parents[1]
READMES = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")


def _stat(seeds: list[dict], metric: str, index: int = -1) -> tuple[float, float] | None:
    """Mean and std over seeds of ``metric`` at evaluation ``index`` (``test_error`` or a
    name of ``all_metrics``); None when a seed lacks it."""
    values = []
    for s in seeds:
        curve = s.get(metric) if metric in s else s.get("all_metrics", {}).get(metric)
        if curve is None or curve[index] is None:
            return None
        values.append(curve[index])
    return float(np.mean(values)), float(np.std(values))


def _pct(stat, digits: int = 1) -> str:
    if stat is None:
        return "–"
    mean, std = stat
    return f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}"


def _speedup(s: dict) -> str:
    if s["speedup"] is None:
        return f"not reached ({100 * s['target_error']:.1f}%)"
    return f"{s['speedup']:.2f}x ({100 * s['target_error']:.1f}% at {s['candidate_iterations']:.0f} vs {s['reference_iterations']:.0f} it.)"


def _chosen(chosen: dict) -> str:
    short = {
        "clusters_per_class": "K",
        "clusters_per_batch": "M",
        "examples_per_cluster": "D",
        "alpha": "α",
        "mining": "",
    }
    return ", ".join(
        f"{short.get(k, k)}={v}" if short.get(k, k) else str(v) for k, v in chosen.items()
    )


def _methods(results: dict) -> dict:
    """The real methods (not the pseudo-entries that re-score another method's runs)."""
    return {n: m for n, m in results["methods"].items() if "note" not in m}


def fine_grained(results: dict) -> list[str]:
    methods = _methods(results)
    seeds0 = next(iter(methods.values()))["seeds"]
    lines = [
        f"**Fine-grained, multimodal classes** ({results['emoji']['num_classes']} emoji "
        f"subcategories, {results['num_train']} train / {results['num_test']} test images, "
        f"{results['steps']} iterations, {len(seeds0)} seeds; test error %, mean ± std):",
        "",
        "| method | chosen on validation | own evaluator | at it. 0 | final | final kNN@1 | final kNN@5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        lines.append(
            f"| {name} | {_chosen(m['chosen'])} | {m['evaluator']} | {_pct(_stat(m['seeds'], 'test_error', 0))} "
            f"| {_pct(_stat(m['seeds'], 'test_error'))} | {_pct(_stat(m['seeds'], 'knn1_error'))} "
            f"| {_pct(_stat(m['seeds'], 'knn5_error'))} |"
        )
    lines.append("")
    for reference in ("triplet", "softmax"):
        key = f"speedup_vs_{reference}"
        if key not in results:
            continue
        s = results[key]
        per_seed = "; ".join(f"seed {p['seed']}: {_speedup(p)}" for p in s["per_seed"])
        reduction = results[f"relative_error_reduction_vs_{reference}"]
        lines.append(
            f"- magnet (kNC) vs {reference} ({results['methods'][reference]['evaluator']}): "
            f"iterations to {reference}'s best, mean curves: {_speedup(s['mean'])}; per seed: "
            f"{per_seed}. Relative error reduction at the end: {100 * reduction:.1f}%."
        )
    purity = results.get("cluster_fine_purity", {}).get("magnet")
    if purity:
        values = ", ".join(f"{it}: {p:.3f}" for it, p in zip(purity["iterations"], purity["mean"]))
        lines.append(
            f"- magnet's index, fine-label (emoji) purity of its clusters at each refresh "
            f"(iteration: mean over seeds): {values}."
        )
    return lines


def hierarchy(results_list: list[dict]) -> list[str]:
    lines = [
        "**Hierarchy recovery** (trained on coarse labels; fine = the emoji; kNN Error@k "
        "against the emoji labels of the training images, %, mean ± std):",
        "",
        "| trained on | method | fine Error@1 at it. 0 | fine Error@1 | fine Error@5 | coarse error (evaluator) |",
        "|---|---|---|---|---|---|",
    ]
    for results in results_list:
        level = results["emoji"]["label_level"]
        for name, m in results["methods"].items():
            lines.append(
                f"| {level} ({results['num_coarse']}) | {name} | {_pct(_stat(m['seeds'], 'fine_error_at_1', 0))} "
                f"| {_pct(_stat(m['seeds'], 'fine_error_at_1'))} | {_pct(_stat(m['seeds'], 'fine_error_at_5'))} "
                f"| {_pct(_stat(m['seeds'], 'coarse_error'))} ({m['evaluator']}) |"
            )
    return lines


def zero_shot(results: dict) -> list[str]:
    methods = _methods(results)
    seeds0 = next(iter(methods.values()))["seeds"]
    lines = [
        f"**Zero-shot retrieval** (the class-disjoint split: {results['emoji']['num_train_classes']} "
        f"emoji to train, {results['emoji']['num_test_classes']} unseen emoji to test; "
        f"{results['steps']} iterations, {len(seeds0)} seeds; %, mean ± std):",
        "",
        "| method | Recall@1 at it. 0 | Recall@1 | Recall@2 | Recall@4 | Recall@8 | MAP@R |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        cells = [
            _pct(_stat(m["seeds"], k))
            for k in ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8")
        ]
        lines.append(
            f"| {name} | {_pct(_stat(m['seeds'], 'recall_at_1', 0))} | {' | '.join(cells)} "
            f"| {_pct(_stat(m['seeds'], 'mean_average_precision_at_r'))} |"
        )
    return lines


def setup_line(results: dict) -> str:
    b = results.get("backbone") or {}
    env = results["environment"]
    where = (
        f"{b.get('image_size')} px, the first {b.get('freeze_stages')} of the 9 stages frozen"
        + (" and cached once per image" if b.get("cache_prefix") else "")
    )
    return (
        f"Setup: {b.get('backbone')} ({'ImageNet weights' if b.get('pretrained') else 'random init'}), "
        f"{where}; embedding {results.get('embedding_dim')}-d, Adam, constant lr, batch "
        f"{results['batch_size']}; evaluated and magnet's index refreshed every "
        f"{results['eval_every']} iterations; device {env['device_kind']} ({env['cpu_count']} "
        f"cores, load average {env['load_average'][0]:.1f} at the start)."
    )


def table(results_dir: Path) -> str:
    def read(name):
        path = results_dir / name
        return json.loads(path.read_text()) if path.is_file() else None

    sub = read("convergence_emoji_subcategory.json")
    zero = read("convergence_emoji_zero_shot.json")
    hier = [
        r
        for r in (read("hierarchy_emoji_subcategory.json"), read("hierarchy_emoji_category.json"))
        if r
    ]
    parts = []
    if sub:
        parts += [setup_line(sub), "", *fine_grained(sub), ""]
    if hier:
        parts += [*hierarchy(hier), ""]
    if zero:
        parts += [*zero_shot(zero), ""]
    missing = [
        n
        for n, r in (
            ("convergence_emoji_subcategory.json", sub),
            (
                "hierarchy_emoji_subcategory.json",
                hier and any(h["emoji"]["label_level"] == "subcategory" for h in hier),
            ),
            (
                "hierarchy_emoji_category.json",
                hier and any(h["emoji"]["label_level"] == "category" for h in hier),
            ),
            ("convergence_emoji_zero_shot.json", zero),
        )
        if not r
    ]
    if missing:
        parts.append(f"Not measured yet (no results file): {', '.join(missing)}.")
    parts.append("Generated by `python benchmarks/tables.py --write` from benchmarks/results/.")
    return "\n".join(parts).rstrip() + "\n"


def replace_block(text: str, block: str, path: Path) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path}: no {BEGIN} ... {END} block to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=_common.RESULTS)
    parser.add_argument(
        "--write", action="store_true", help="replace the marked block in both READMEs"
    )
    args = parser.parse_args(argv)
    block = table(args.results)
    if not args.write:
        print(block, end="")
        return 0
    for path in READMES:
        path.write_text(replace_block(path.read_text(), block, path))
        print(f"wrote the table into {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
