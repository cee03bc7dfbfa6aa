"""A small run of the spawn-path benchmark, so the script keeps working (no timing asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from unittest import mock

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "spawn_path.py"


async def test_spawn_path_benchmark_runs_both_spawners():
    spec = importlib.util.spec_from_file_location("spawn_path", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with mock.patch("kubespawner.spawner.load_config"):
        rows = await bench.measure(rounds=2)
    stages = [r[0] for r in rows]
    assert stages == [
        "form render",
        "options: parse + validate",
        "admission: quota + lease (store)",
        "pod manifest",
        "whole spawn path",
    ]
    assert all(r[1] > 0 for r in rows)
    assert "ratio" in bench.table(rows)
