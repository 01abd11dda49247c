"""The benchmark that needs a GPU runs here at tiny sizes on the CPU, so it works when a GPU is lent."""
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
