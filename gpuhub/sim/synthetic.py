"""A seeded generator of notebook workloads in the trace format.

Every distribution is a log-normal given by its median and its mean (the mean is what decides the
GPU-hours), and the defaults are those measured on the Adobe Sensei trace (59 sessions over two
days): sessions arrive as a Poisson process, each reserves 0, 1, 4 or 8 GPUs in the trace's
proportions, waits a first gap, then alternates bursts and gaps, then stays open for a tail; a
session is cut at `max_session_hours` (the trace covers two days). A share of the bursts are
CPU-only cells. `load` multiplies the arrival rate and nothing else, so 2x is twice as many
sessions of the same shape.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .workload import TICK_S


@dataclass(frozen=True)
class SyntheticParams:
    """Parameters of a synthetic workload (times in minutes, one tick = 1 minute)."""

    hours: float = 48.0  # sessions arrive during this many hours
    sessions_per_hour: float = 1.25  # arrival rate at load 1 (59 sessions in 48 h in the trace)
    load: float = 1.0  # multiplies the arrival rate
    gpus_per_session: Mapping[int, float] = field(
        default_factory=lambda: {0: 8, 1: 28, 4: 11, 8: 12}
    )  # GPUs a session reserves -> relative weight
    bursts_median: float = 6.0  # bursts per session
    bursts_mean: float = 13.4
    burst_median_min: float = 6.0  # burst length
    burst_mean_min: float = 26.7
    gap_median_min: float = 3.0  # time between bursts
    gap_mean_min: float = 28.9
    head_median_min: float = 49.0  # from session start to its first burst
    head_mean_min: float = 226.0
    tail_median_min: float = 73.0  # from the last burst to the session's end
    tail_mean_min: float = 239.0
    max_session_hours: float = 48.0  # sessions are cut here
    cpu_burst_fraction: float = 0.31  # bursts that use no GPU (CPU-only cells)
    util_median: float = 11.4  # GPU utilisation percent during a burst
    util_mean: float = 24.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "gpus_per_session":
                if not isinstance(value, Mapping) or not value:
                    raise ValueError("gpus_per_session: must be a non-empty mapping")
                for k, w in value.items():
                    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                        raise ValueError(f"gpus_per_session: {k!r} is not a GPU count")
                    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                        raise ValueError(f"gpus_per_session.{k}: weight must be >= 0")
                if sum(value.values()) <= 0:
                    raise ValueError("gpus_per_session: weights must not all be 0")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{f.name}: must be a number >= 0, not {value!r}")
        for name in ("hours", "sessions_per_hour", "load", "max_session_hours"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")
        if self.cpu_burst_fraction > 1:
            raise ValueError("cpu_burst_fraction: must be between 0 and 1")
        for base in ("bursts", "burst", "gap", "head", "tail", "util"):
            suffix = "" if base in ("bursts", "util") else "_min"
            median = getattr(self, f"{base}_median{suffix}")
            mean = getattr(self, f"{base}_mean{suffix}")
            if median <= 0 or mean < median:
                raise ValueError(f"{base}_mean{suffix}: must be >= {base}_median{suffix} > 0")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gpus_per_session"] = {str(k): v for k, v in self.gpus_per_session.items()}
        return out


def _lognormal(rng: random.Random, median: float, mean: float) -> float:
    """A log-normal draw with this median and mean (mean >= median)."""
    sigma = math.sqrt(2 * math.log(mean / median)) if mean > median else 0.0
    return median * math.exp(sigma * rng.gauss(0.0, 1.0))


def generate(params: SyntheticParams | None = None, seed: int = 0) -> dict[str, Any]:
    """A workload in the trace format; the same `params` and `seed` give the same workload."""
    p = params or SyntheticParams()
    rng = random.Random(seed)
    rate_per_min = p.sessions_per_hour * p.load / 60.0
    horizon = p.hours * 60.0
    counts = sorted(p.gpus_per_session)
    weights = [p.gpus_per_session[c] for c in counts]
    sessions = []
    t = rng.expovariate(rate_per_min)
    while t < horizon:
        start = int(t)
        gpus = rng.choices(counts, weights)[0]
        end = start + max(2, round(p.max_session_hours * 60))
        n_bursts = max(1, round(_lognormal(rng, p.bursts_median, p.bursts_mean)))
        cursor = start + max(1, round(_lognormal(rng, p.head_median_min, p.head_mean_min)))
        cursor = min(cursor, end - 2)
        trainings = []
        for i in range(n_bursts):
            if i:
                cursor += max(0, round(_lognormal(rng, p.gap_median_min, p.gap_mean_min)))
            duration = max(1, round(_lognormal(rng, p.burst_median_min, p.burst_mean_min)))
            if i and cursor + duration >= end:
                break
            duration = min(duration, end - 1 - cursor)
            cpu_only = gpus == 0 or rng.random() < p.cpu_burst_fraction
            used = 0 if cpu_only else gpus
            util = round(min(100.0, max(0.1, _lognormal(rng, p.util_median, p.util_mean))), 3)
            trainings.append(
                {
                    "start_tick": cursor,
                    "duration_in_ticks": duration,
                    "end_tick": cursor + duration,
                    "gpus": used,
                    "gpu_utilizations": [{"utilization": util} for _ in range(used)],
                }
            )
            cursor += duration
        stop = min(end, cursor + max(1, round(_lognormal(rng, p.tail_median_min, p.tail_mean_min))))
        sessions.append(
            {
                "id": f"synthetic-{len(sessions):05d}",
                "start_tick": start,
                "stop_tick": stop,
                "num_training_events": len(trainings),
                "max_resource_request": {"gpus": gpus, "gpu_type": "ANY_GPU"},
                "trainings": trainings,
            }
        )
        t += rng.expovariate(rate_per_min)
    return {
        "workload_title": f"synthetic (seed {seed}, load {p.load:g}x)",
        "tick_seconds": TICK_S,
        "synthetic_parameters": p.as_dict(),
        "seed": seed,
        "sessions": sessions,
    }
