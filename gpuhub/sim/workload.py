"""Workloads for the simulator: notebook sessions with GPU bursts.

The format is the one of the Adobe Sensei notebook trace (NotebookOS workload templates): a JSON
object with `sessions`, each with `id`, `start_tick`, `stop_tick`, `max_resource_request.gpus` and
`trainings` (bursts: `start_tick`, `duration_in_ticks`, `gpus`, `gpu_utilizations`). One tick is
60 s of the original trace. Other fields are ignored.

Loaded workloads are in seconds. A session is kept as a sequence: a first gap, then bursts and the
gaps between them, then a tail until the session ends. The simulator replays that sequence, so a
burst that waits for GPUs delays the rest of its session (the user waits, then goes on).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TICK_S = 60.0


class WorkloadError(ValueError):
    """A workload that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Burst:
    """A stretch of work in a session: `gap_before` seconds after the previous one ended."""

    gap_before: float
    duration: float
    gpus: int  # 0: a CPU-only cell
    utilization: tuple[float, ...]  # percent, one per GPU used


@dataclass(frozen=True)
class SessionSpec:
    id: str
    start: float  # seconds since the start of the trace
    gpus: int  # GPUs the session's server reserves
    bursts: tuple[Burst, ...]
    tail: float  # seconds the session stays open after its last burst

    @property
    def length(self) -> float:
        """Length of the session when nothing waits."""
        return sum(b.gap_before + b.duration for b in self.bursts) + self.tail


@dataclass(frozen=True)
class Workload:
    name: str
    sessions: tuple[SessionSpec, ...]

    def stats(self) -> dict[str, Any]:
        """What the workload asks for: sessions, bursts, and the GPU-hours of `none`/`oracle`."""
        gpu_sessions = [s for s in self.sessions if s.gpus > 0]
        reserved = sum(s.gpus * s.length for s in self.sessions) / 3600
        busy = sum(b.gpus * b.duration for s in self.sessions for b in s.bursts) / 3600
        return {
            "sessions": len(self.sessions),
            "gpu_sessions": len(gpu_sessions),
            "bursts": sum(len(s.bursts) for s in self.sessions),
            "gpu_bursts": sum(1 for s in self.sessions for b in s.bursts if b.gpus > 0),
            "span_hours": round(self.span() / 3600, 3),
            "session_gpu_hours": round(reserved, 3),
            "burst_gpu_hours": round(busy, 3),
            "max_gpus_per_session": max((s.gpus for s in self.sessions), default=0),
        }

    def span(self) -> float:
        if not self.sessions:
            return 0.0
        start = min(s.start for s in self.sessions)
        return max(s.start + s.length for s in self.sessions) - start


def _number(value: Any, path: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise WorkloadError(f"{path}: must be a number, not {value!r}")
    if value < minimum:
        raise WorkloadError(f"{path}: must be >= {minimum:g}, not {value!r}")
    return float(value)


def _count(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WorkloadError(f"{path}: must be an integer >= 0, not {value!r}")
    return value


def workload_from_dict(data: Any, name: str = "workload", time_scale: float = 1.0) -> Workload:
    """Parse the trace format; `time_scale` multiplies every time (0.5: twice as fast)."""
    if not isinstance(time_scale, (int, float)) or not time_scale > 0:
        raise WorkloadError(f"time_scale: must be a number > 0, not {time_scale!r}")
    if not isinstance(data, Mapping):
        raise WorkloadError("trace: must be a JSON object with a 'sessions' list")
    raw_sessions = data.get("sessions")
    if not isinstance(raw_sessions, list):
        raise WorkloadError("sessions: must be a list")
    scale = TICK_S * time_scale
    sessions = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_sessions):
        path = f"sessions[{i}]"
        if not isinstance(raw, Mapping):
            raise WorkloadError(f"{path}: must be an object")
        sid = str(raw.get("id", i))
        if sid in seen:
            raise WorkloadError(f"{path}.id: {sid!r} appears twice")
        seen.add(sid)
        start = _number(raw.get("start_tick"), f"{path}.start_tick")
        stop = _number(raw.get("stop_tick"), f"{path}.stop_tick")
        if stop < start:
            raise WorkloadError(f"{path}.stop_tick: {stop:g} is before start_tick {start:g}")
        request = raw.get("max_resource_request") or {}
        if not isinstance(request, Mapping):
            raise WorkloadError(f"{path}.max_resource_request: must be an object")
        gpus = _count(request.get("gpus", 0), f"{path}.max_resource_request.gpus")
        trainings = raw.get("trainings") or []
        if not isinstance(trainings, list):
            raise WorkloadError(f"{path}.trainings: must be a list")
        parsed = []
        for j, t in enumerate(trainings):
            tpath = f"{path}.trainings[{j}]"
            if not isinstance(t, Mapping):
                raise WorkloadError(f"{tpath}: must be an object")
            t_start = _number(t.get("start_tick"), f"{tpath}.start_tick")
            duration = _number(t.get("duration_in_ticks"), f"{tpath}.duration_in_ticks")
            t_gpus = _count(t.get("gpus", 0), f"{tpath}.gpus")
            if t_gpus > gpus:
                raise WorkloadError(
                    f"{tpath}.gpus: {t_gpus} is more than the session reserves ({gpus})"
                )
            utils = t.get("gpu_utilizations") or []
            if not isinstance(utils, list):
                raise WorkloadError(f"{tpath}.gpu_utilizations: must be a list")
            values = []
            for k, u in enumerate(utils):
                upath = f"{tpath}.gpu_utilizations[{k}].utilization"
                raw_u = u.get("utilization") if isinstance(u, Mapping) else None
                values.append(min(100.0, _number(raw_u, upath)))
            if t_gpus and len(values) < t_gpus:
                # Missing readings: the burst is busy, at the mean of what is given (or 100 %).
                fill = sum(values) / len(values) if values else 100.0
                values += [fill] * (t_gpus - len(values))
            parsed.append((t_start, duration, t_gpus, tuple(values[:t_gpus])))
        parsed.sort(key=lambda p: p[0])
        bursts = []
        cursor = start
        for t_start, duration, t_gpus, values in parsed:
            # Overlapping bursts are replayed one after the other.
            gap = max(0.0, t_start - cursor)
            bursts.append(Burst(gap * scale, duration * scale, t_gpus, values))
            cursor = max(cursor, t_start) + duration
        tail = max(0.0, stop - cursor) * scale
        sessions.append(SessionSpec(sid, start * scale, gpus, tuple(bursts), tail))
    sessions.sort(key=lambda s: (s.start, s.id))
    return Workload(name, tuple(sessions))


def load_trace(path: str | Path, time_scale: float = 1.0) -> Workload:
    """Load a trace file; errors name the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise WorkloadError(f"trace: cannot read {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise WorkloadError(f"trace: {path} is not JSON: {e}") from e
    try:
        return workload_from_dict(data, path.name, time_scale)
    except WorkloadError as e:
        raise WorkloadError(f"{path.name}: {e}") from e


def default_trace_path() -> Path | None:
    """The Adobe Sensei trace next to the source checkout (`../shared/traces/...`), if present."""
    checkout = Path(__file__).resolve().parents[2]
    for base in (checkout, Path.cwd()):
        candidate = base.parent / "shared" / "traces" / "adobe-sensei-2021-06-01-02.json"
        if candidate.is_file():
            return candidate
    return None
