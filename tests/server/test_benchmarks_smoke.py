"""Small runs of the snapshot-throughput and sampling-overhead benchmarks, so the scripts keep
working against the real extension (no timing asserted: only that every row is there and every
figure was measured)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def run(name: str, *args: str) -> object:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def table_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line) == {"-"}) + 1
    return [line.split() for line in lines[start:] if line and not line.startswith("(")]


def test_snapshot_throughput_against_numpy_and_torch(tmp_path):
    out = run("snapshot_throughput", "--sizes", "2", "--repeat", "1", "--dir", str(tmp_path))
    results, fixed = out["rows"], out["fixed_cost_s"]
    kinds = ["numpy", "torch", "state_dict", "tensors", "pandas"]
    assert [(r["kind"], r["op"]) for r in results] == [(k, op) for k in kinds for op in bench_ops()]
    assert sorted(fixed) == sorted(kinds) and all(s > 0 for s in fixed.values())
    for r in results:
        assert 1_900_000 <= r["nbytes"] <= 2_000_000
        assert r["gpuhub_s"] > 0 and r["raw_s"] > 0 and r["ratio"] > 0
        assert r["file_bytes"] >= r["nbytes"] and r["raw_file_bytes"] >= r["nbytes"]
        assert r["kernel_peak_rss"] > r["nbytes"]
    assert all(r["gpuhub_kernel_s"] > 0 and r["resave_s"] > 0 for r in results if r["op"] == "save")
    assert list(tmp_path.iterdir()) == []  # snapshots and raw files removed

    bench = load("snapshot_throughput")
    fields = bench.Row.__dataclass_fields__
    rows = [bench.Row(**{k: v for k, v in r.items() if k in fields}) for r in results]
    text = bench.table(rows, repeat=1, fixed=fixed)
    assert [row[:4] for row in table_rows(text)][:4] == [
        ["numpy", "2", "MB", "snapshot"],
        ["numpy", "2", "MB", "restore"],
        ["torch", "2", "MB", "snapshot"],
        ["torch", "2", "MB", "restore"],
    ]
    assert "| torch | 2 MB | restore vs `torch.load` |" in bench.markdown(rows)
    assert "| pandas | 2 MB | snapshot vs `pandas.to_pickle` |" in bench.markdown(rows)
    drawn = bench.plot(rows, tmp_path / "ratios.png")
    assert drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bench_ops() -> tuple[str, str]:
    return ("save", "load")


def test_extension_overhead_with_simulated_gpus():
    results = run(
        "extension_overhead",
        *("--gpus", "2", "--intervals", "0.25", "--history", "empty", "full"),
        *("--seconds", "1.5", "--warmup", "1"),
    )
    assert "nvml_fake" in results["note"] and "libnvidia-ml" in results["note"]
    baseline, fresh, full = results["rows"]
    assert baseline["interval_s"] is None and baseline["ticks"] == 0
    assert [(r["gpus"], r["interval_s"], r["history"]) for r in (fresh, full)] == [
        (2, 0.25, "empty"),
        (2, 0.25, "full"),
    ]
    for r in (fresh, full):
        assert r["ticks"] >= 1
        assert r["cpu_s"] > 0 and r["tick_cpu_s"] > 0 and r["wall_s"] > 0
        assert r["processes_on_machine"] > 0
    for r in (baseline, fresh, full):  # the event loop's stalls, measured in every row
        assert 0 <= r["p99_loop_lag_ms"] <= r["max_loop_lag_ms"]
        assert r["max_callback_cpu_ms"] > 0 and r["max_callback_wall_ms"] > 0
        assert r["max_callback"]
        assert r["max_gc_pause_ms"] >= 0 and r["gc_collections"] >= 0
    assert baseline["max_step_cpu_ms"] == 0  # no sampling step ran
    assert all(r["max_step_cpu_ms"] > 0 and r["max_step_wall_ms"] > 0 for r in (fresh, full))

    bench = load("extension_overhead")
    rows = [
        bench.Row(
            bench.Measurement(**{k: r[k] for k in bench.Measurement.__dataclass_fields__}),
            r["baseline_pct"],
        )
        for r in results["rows"]
    ]
    text = bench.table(rows, seconds=1.5)
    assert "nvml_fake" in text
    assert [row[:3] for row in table_rows(text)] == [
        ["2", "off", "empty"],
        ["2", "0.25", "empty"],
        ["2", "0.25", "full"],
    ]
    assert "| 2 | 0.25 s | full |" in bench.markdown(rows)
