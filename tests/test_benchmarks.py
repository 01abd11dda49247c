"""Benchmark scripts that `make test` keeps working: the GPU check at tiny sizes on the CPU (so it
works when a GPU is lent), and the fused engine's random identity sweep."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_prints_every_table():
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-3000:]
    for heading in ("## Machine", "## TV-L1 on the GPU (torch port)", "## Training at the model's pace"):
        assert heading in r.stdout, r.stdout
    assert "| fast | fixed batches of 2 (2 pairs) |" in r.stdout and "| resnet18 | temporal | 20 |" in r.stdout


def _engine_sweep():
    import importlib.util
    spec = importlib.util.spec_from_file_location("engine_sweep", ROOT / "benchmarks" / "engine_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_sweep_finds_identity_and_reports_a_difference():
    """benchmarks/engine_sweep.py: random cases against OpenCV; it must say when the engine differs."""
    import numpy as np
    from flowprep.tvl1_fused import FusedTVL1

    sweep = _engine_sweep().sweep
    counts = sweep(cases=4, seed=1, max_side=40)
    assert counts["different"] == 0 and counts["identical"] >= 2, counts

    class OneUlpOff(FusedTVL1):   # the engine with one float of its flow moved by one ulp
        def calc(self, prev, nxt):
            flow = super().calc(prev, nxt)
            flow[0, 0, 0] = np.nextafter(flow[0, 0, 0], np.float32(np.inf))
            return flow

    reports = []
    broken = sweep(cases=4, seed=1, max_side=40, engine=OneUlpOff, report=reports.append)
    assert broken["different"] == counts["identical"] and len(reports) == broken["different"], (broken, reports)
    assert "of seed 1" in reports[0]
