"""Every benchmark script runs in its --quick mode, so the scripts never rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# tables.py trains nothing (it renders the READMEs' tables; tests/test_paper_regime.py).
SCRIPTS = sorted(
    p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_") and p.name != "tables.py"
)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_runs_and_writes_json(script, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MAGNET_JAX_RESULTS": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = list(tmp_path.glob("*.json"))
    assert written, f"{script} --quick wrote no JSON into MAGNET_JAX_RESULTS"
    for path in written:
        json.loads(path.read_text())


@pytest.mark.slow
def test_device_script_rehearses_every_part_on_cpu(tmp_path):
    """benchmarks/device.sh --quick: the one-call GPU run, every part at tiny sizes."""
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "device.sh"), "--quick", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = {p.name for p in out.glob("*.json")}
    parts = {"info": "device", "train_step": "train_step", "kmeans": "kmeans"}
    parts.update(backbone="backbone", top_k="top_k", retrieval="retrieval")
    assert names == {f"{json_name}_quick.json" for json_name in parts.values()}
    log = (out / "log.txt").read_text()
    assert all(f"device.sh: {part}: " in log for part in parts), log[-2000:]
    assert "device.sh: done, 0 part(s) failed" in log
