"""Every benchmark's --quick mode runs, so no benchmark rots between full runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode(tmp_path, script):
    env = {**os.environ, "OMP_NUM_THREADS": "1" if "PYTEST_XDIST_WORKER" in os.environ else "2"}  # a core per worker
    r = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    name = script.removesuffix(".py")
    results = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["benchmark"] == name and results["quick"] is True
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    if name == "growth_convergence":  # the stacking row: grown while training, within the one-shot rows' budget
        stacking = results["operators"]["progressive stacking"]
        assert [g["layers"] for g in stacking["growth"]] == [[1, 2]]
        budget = results["small_pretraining"]["flops"] + results["scratch"]["flops"]
        assert stacking["flops"] <= stacking["flops_budget"] == budget
