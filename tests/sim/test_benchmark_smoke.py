"""A small run of benchmarks/simulate_policies.py: it prints its tables and draws its plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_simulate_policies_benchmark_smoke(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "simulate_policies.py"),
            "--quick",
            "--no-trace",
            "--loads",
            "1,4",
            "--out-dir",
            str(tmp_path / "img"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "## synthetic 1x" in proc.stdout and "## synthetic 4x" in proc.stdout
    assert "x none" in proc.stdout and "x oracle" in proc.stdout
    assert "learned release policy against the flat timeouts" in proc.stdout
    for name in ("sim-utilisation.png", "sim-wait.png", "sim-timeline.png", "sim-frontier.png"):
        png = tmp_path / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads(out.read_text())["runs"]
    assert [r["trace"] for r in runs] == ["synthetic 1x", "synthetic 4x"]
    for r in runs:
        p = r["policies"]
        assert p["oracle"]["reserved_gpu_hours"] <= p["gpuhub"]["reserved_gpu_hours"]
        assert p["gpuhub"]["reserved_gpu_hours"] <= p["none"]["reserved_gpu_hours"]
