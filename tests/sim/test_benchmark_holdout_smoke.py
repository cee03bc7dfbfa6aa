"""A small run of benchmarks/learned_holdout.py: the learned policy on held-out halves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_learned_holdout_benchmark_smoke():
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "learned_holdout.py"),
            "--synthetic",
            "--hours",
            "8",
            "--splits",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 0 |")]
    # each half evaluated twice: learning from nothing, and from the other half's site pauses
    assert len(rows) == 4
    assert sum("nothing (cold)" in r for r in rows) == 2
    assert sum("the other half's site pauses" in r for r in rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        busy, restarts, lost = float(cells[3]), float(cells[4]), int(cells[7])
        assert 0 < busy <= 1 and restarts >= 0 and lost == 0
