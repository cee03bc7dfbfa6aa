"""Run several policies on one workload and present the results side by side."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .engine import POLICIES, PolicyResult, PolicySpec, SimConfig, simulate
from .workload import Workload


def compare(
    workload: Workload,
    config: SimConfig,
    specs: Iterable[PolicySpec] | None = None,
) -> dict[str, PolicyResult]:
    """Each policy on the same workload and pool, in the order given."""
    specs = list(specs) if specs is not None else [PolicySpec(name) for name in POLICIES]
    return {spec.label or spec.name: simulate(workload, spec, config) for spec in specs}


def as_json(
    trace: str,
    workload: Workload,
    config: SimConfig,
    results: Mapping[str, PolicyResult],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The object `gpuhub simulate --json` prints."""
    out: dict[str, Any] = {
        "trace": trace,
        "gpus": config.gpus,
        "restart_delay_s": config.restart_delay,
        "workload": workload.stats(),
    }
    out.update(extra or {})
    out["policies"] = {name: r.metrics() for name, r in results.items()}
    return out


_ROWS: Sequence[tuple[str, str]] = (
    ("reserved GPU-hours", "reserved_gpu_hours"),
    ("busy GPU-hours", "busy_gpu_hours"),
    ("idle reserved GPU-hours", "idle_reserved_gpu_hours"),
    ("busy / reserved", "busy_fraction"),
    ("utilisation-weighted busy / reserved", "utilization_weighted_busy_fraction"),
    ("pool utilisation", "pool_utilization"),
    ("burst wait mean (s)", "wait_s.mean"),
    ("burst wait p50 (s)", "wait_s.p50"),
    ("burst wait p95 (s)", "wait_s.p95"),
    ("burst wait max (s)", "wait_s.max"),
    ("bursts that waited", "bursts_waited_fraction"),
    ("releases per GPU session", "releases_per_session"),
    ("restarts per GPU session", "restarts_per_session"),
    ("stops per GPU session", "stops_per_session"),
    ("sessions that lost state", "sessions_state_lost"),
    ("session delay (hours, total)", "session_delay_hours"),
    ("peak reserved GPUs", "peak_reserved_gpus"),
)


def _get(metrics: Mapping[str, Any], dotted: str) -> Any:
    value: Any = metrics
    for part in dotted.split("."):
        value = value[part]
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3f}" if abs(value) < 1 else f"{value:,.1f}"
    return f"{value:,}"


def table(report: Mapping[str, Any]) -> str:
    """A plain-text table: one row per metric, one column per policy."""
    policies = report["policies"]
    names = list(policies)
    header = ["", *names]
    rows = [header]
    for label, key in _ROWS:
        rows.append([label, *(_fmt(_get(policies[n], key)) for n in names)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    w = report["workload"]
    lines.append(
        f"{report['trace']}: {w['sessions']} sessions ({w['gpu_sessions']} with GPUs), "
        f"{w['gpu_bursts']} GPU bursts over {w['span_hours']:.1f} h; "
        f"{report['gpus']} GPUs, restart {report['restart_delay_s']:g} s"
    )
    lines.append("")
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(widths[j]) for j, c in enumerate(row) if j]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    return "\n".join(lines)
