"""The notebooks: committed without outputs, as ``notebooks/build_notebooks.py`` writes them,
and executed top to bottom (``pytest -m notebooks``; needs ``pip install ".[notebooks]"``).

The kernel is the interpreter running the tests (a kernel spec written for
``sys.executable``), so the notebooks run in the same environment as the suite whatever
kernels Jupyter has installed; it inherits the environment (``PYTHONPATH``,
``JAX_PLATFORMS``).
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPOSITORY / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Seconds one notebook may take on a loaded 2-core CI machine (each takes a few minutes
# at most; see notebooks/README.md for measured times).
NOTEBOOK_TIMEOUT = 900
CELL_TIMEOUT = 600


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {
        "quickstart",
        "custom_training_loop",
        "pretrained_retrieval",
        "reproduce_paper",
    }


def _expected_lines(stem: str) -> list[str]:
    """Lines an executed notebook must print: what shows it did its job, beyond not failing."""
    if stem == "reproduce_paper":
        results = REPOSITORY / "benchmarks" / "results"
        summarised = sorted(results.glob("convergence_*.json")) + sorted(
            results.glob("hierarchy_*.json")
        )
        return [f"{p.stem}: stored summary equals the recomputed one" for p in summarised]
    if stem == "pretrained_retrieval":
        return ["pretrained features: Recall@1 ", "| Recall@8 | "]
    return []


def _printed(notebook) -> str:
    """Everything the executed notebook printed or displayed as text or Markdown."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            data = output.get("data", {})
            parts.append(data.get("text/markdown", "") + data.get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{path.name} holds outputs: rebuild it with python notebooks/build_notebooks.py"
            )


def _load_builder():
    spec = importlib.util.spec_from_file_location(
        "build_notebooks", NOTEBOOK_DIR / "build_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_are_what_the_build_script_writes(tmp_path):
    pytest.importorskip("nbformat")
    written = _load_builder().build(tmp_path)
    assert sorted(p.name for p in written) == [p.name for p in NOTEBOOKS]
    for path in written:
        assert path.read_text() == (NOTEBOOK_DIR / path.name).read_text(), (
            f"notebooks/{path.name} is stale: run python notebooks/build_notebooks.py"
        )


def _kernel_manager(kernel_dir: Path):
    """A kernel manager that starts ipykernel on this very interpreter."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    write_kernel_spec(kernel_dir / "this-python", overrides={"display_name": sys.executable})
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name="this-python", kernel_spec_manager=specs)


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    # scikit-learn's t-SNE (the quickstart's last picture) runs OpenMP threads that spin
    # against each other when the cores are busy with other work: 10x slower on a loaded
    # 2-core machine. One thread costs nothing on an idle one. JAX does not use OpenMP.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # reproduce_paper reads this checkout's benchmark results (the kernel runs in tmp_path).
    monkeypatch.setenv("MAGNET_JAX_RESULTS", str(REPOSITORY / "benchmarks" / "results"))
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        km=_kernel_manager(tmp_path / "kernels"),
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    started = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - started
    print(f"{path.name}: executed in {seconds:.0f} s")
    assert seconds < NOTEBOOK_TIMEOUT
    printed = _printed(notebook)
    for line in _expected_lines(path.stem):
        assert line in printed, f"{path.name} did not print {line!r}"
