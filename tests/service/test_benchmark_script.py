"""The service-cycle benchmark still runs (tiny size): a real hub with shared fake servers whose
own tokens report to the service over HTTP, one sampler pass, one gpuhub cycle that decides on
those reports, one idle-culler pass."""

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
        [
            sys.executable,
            str(SCRIPT),
            "--sizes",
            "6",
            "--repeat",
            "1",
            "--warm-rounds",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [result] = json.loads(out.stdout)
    assert result["users"] == 6
    # every server's report was taken (the script fails on any refused one), cold and warm
    assert result["report_cold"]["reports"] == 6
    assert result["report_warm"]["reports"] == 6
    assert result["decisions"] >= 1  # the idle GPUs, as the trusted readings say
    for key in ("gpuhub_list_s", "gpuhub_cycle_s", "idle_culler_pass_s", "sampler_pass_s"):
        assert result[key] > 0
    assert result["cycle_ratio"] == pytest.approx(
        result["gpuhub_cycle_s"] / result["idle_culler_pass_s"]
    )
