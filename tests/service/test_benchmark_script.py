"""The service-cycle benchmark still runs (tiny size): a real hub with shared fake servers, one
gpuhub cycle that reads every server's status, one idle-culler pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "service_cycle.py"


def test_service_cycle_benchmark_runs():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "6", "--repeat", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [result] = json.loads(out.stdout)
    assert result["users"] == 6
    assert result["decisions"] >= 1  # the fake servers' idle GPUs
    for key in ("gpuhub_list_s", "gpuhub_cycle_s", "idle_culler_pass_s"):
        assert result[key] > 0
