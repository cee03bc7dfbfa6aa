"""GPU-hours against restarts: flat timeouts, the learned policy and perfect prediction.

Every flat GPU idle timeout is one point (restarts per GPU session, busy / reserved); together
they draw the frontier a site can reach by choosing a timeout. The learned release policy and the
perfect-prediction reference (which knows each pause's length) are compared against that
frontier at the same restart count: the flat frontier's busy / reserved there is interpolated
linearly between the two flat timeouts whose restart counts surround it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core.decide import Rules
from ..core.learned import LearnedSettings
from .engine import FLAT, GPUHUB, LEARNED, PERFECT, PolicySpec, SimConfig, simulate
from .workload import Workload

FLAT_TIMEOUTS = (300.0, 600.0, 900.0, 1800.0, 3600.0)
PERFECT_THRESHOLDS = (300.0, 600.0, 1200.0, 2400.0, 4800.0)


@dataclass(frozen=True)
class Point:
    """One run: its policy, setting, and where it lands."""

    policy: str  # flat, learned or perfect
    setting: str  # the timeout, threshold or "defaults"
    busy_fraction: float
    restarts: float
    wait_p95: float
    state_lost: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "setting": self.setting,
            "busy_fraction": round(self.busy_fraction, 4),
            "restarts_per_session": round(self.restarts, 3),
            "wait_p95_s": round(self.wait_p95, 1),
            "sessions_state_lost": self.state_lost,
        }


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min"


def point(workload: Workload, spec: PolicySpec, config: SimConfig, setting: str) -> Point:
    m = simulate(workload, spec, config).metrics()
    return Point(
        spec.release_policy,
        setting,
        m["busy_fraction"] or 0.0,
        m["restarts_per_session"],
        m["wait_s"]["p95"],
        m["sessions_state_lost"],
    )


def at_restarts(points: Sequence[Point], restarts: float) -> float | None:
    """The busy / reserved of the curve through `points` at `restarts` (None: outside it)."""
    ordered = sorted(points, key=lambda p: p.restarts)
    for lo, hi in itertools.pairwise(ordered):
        if lo.restarts <= restarts <= hi.restarts:
            if hi.restarts == lo.restarts:
                return max(lo.busy_fraction, hi.busy_fraction)
            share = (restarts - lo.restarts) / (hi.restarts - lo.restarts)
            return lo.busy_fraction + share * (hi.busy_fraction - lo.busy_fraction)
    return None


@dataclass
class Frontier:
    flat: list[Point]
    learned: list[Point]
    perfect: list[Point]

    def compare(self, p: Point) -> dict[str, Any]:
        """`p` against the flat and perfect curves at its restart count."""
        flat = at_restarts(self.flat, p.restarts)
        perfect = at_restarts(self.perfect, p.restarts)
        out: dict[str, Any] = {
            "flat_at_same_restarts": None if flat is None else round(flat, 4),
            "perfect_at_same_restarts": None if perfect is None else round(perfect, 4),
            "gain_over_flat": None if flat is None else round(p.busy_fraction - flat, 4),
            "share_of_possible_gain": None,
        }
        if flat is not None and perfect is not None and perfect > flat:
            out["share_of_possible_gain"] = round((p.busy_fraction - flat) / (perfect - flat), 3)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "flat": [p.as_dict() for p in self.flat],
            "learned": [{**p.as_dict(), **self.compare(p)} for p in self.learned],
            "perfect": [p.as_dict() for p in self.perfect],
        }


def frontier(
    workload: Workload,
    config: SimConfig,
    rules: Rules | None = None,
    learned: Iterable[tuple[str, LearnedSettings]] = (("defaults", LearnedSettings()),),
    flat_timeouts: Iterable[float] = FLAT_TIMEOUTS,
    perfect_thresholds: Iterable[float] = PERFECT_THRESHOLDS,
) -> Frontier:
    """Run the flat timeouts, the learned settings and perfect prediction on one workload."""
    rules = rules or Rules()
    flat = [
        point(
            workload,
            PolicySpec(GPUHUB, rules=replace(rules, gpu_idle_timeout=t), release_policy=FLAT),
            config,
            _minutes(t),
        )
        for t in flat_timeouts
    ]
    learned_points = [
        point(
            workload,
            PolicySpec(GPUHUB, rules=rules, release_policy=LEARNED, learned=settings),
            config,
            label,
        )
        for label, settings in learned
    ]
    perfect = [
        point(
            workload,
            PolicySpec(GPUHUB, rules=rules, release_policy=PERFECT, perfect_threshold=t),
            config,
            f"pauses > {_minutes(t)}",
        )
        for t in perfect_thresholds
    ]
    return Frontier(flat, learned_points, perfect)


def table(f: Frontier, markdown: bool = False) -> str:
    """One row per run: busy / reserved, restarts, and for learned runs the comparison."""
    header = [
        "release policy",
        "setting",
        "busy/reserved",
        "restarts/sess",
        "wait p95 s",
        "state lost",
        "flat at same restarts",
        "perfect at same restarts",
        "gain over flat",
    ]
    rows = []
    for kind, points in (("flat", f.flat), ("learned", f.learned), ("perfect", f.perfect)):
        for p in points:
            cells = [
                kind,
                p.setting,
                f"{p.busy_fraction:.3f}",
                f"{p.restarts:.2f}",
                f"{p.wait_p95:,.0f}",
                str(p.state_lost),
            ]
            if kind == "learned":
                c = f.compare(p)
                cells += [
                    "-"
                    if c["flat_at_same_restarts"] is None
                    else f"{c['flat_at_same_restarts']:.3f}",
                    "-"
                    if c["perfect_at_same_restarts"] is None
                    else f"{c['perfect_at_same_restarts']:.3f}",
                    "-" if c["gain_over_flat"] is None else f"{c['gain_over_flat']:+.3f}",
                ]
            else:
                cells += ["", "", ""]
            rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    out = []
    for i, row in enumerate([header, *rows]):
        out.append(
            "  ".join(
                c.ljust(w) if j < 2 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot(frontiers: Sequence[tuple[str, Frontier]], path: Path) -> Path:
    """Busy / reserved against restarts per GPU session, one panel per workload (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(frontiers)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, (title, f) in zip(axes.flat, frontiers, strict=False):
        for points, style, label, color in (
            (f.flat, "o-", "flat timeout", "#2a7ab9"),
            (f.perfect, "s--", "perfect prediction", "#3a9a4a"),
        ):
            ordered = sorted(points, key=lambda p: p.restarts)
            ax.plot(
                [p.restarts for p in ordered],
                [100 * p.busy_fraction for p in ordered],
                style,
                color=color,
                label=label,
            )
            for p in ordered:
                ax.annotate(
                    p.setting.replace("pauses > ", ">"),
                    (p.restarts, 100 * p.busy_fraction),
                    fontsize=7,
                    xytext=(4, -8),
                    textcoords="offset points",
                )
        ax.plot(
            [p.restarts for p in f.learned],
            [100 * p.busy_fraction for p in f.learned],
            "*",
            markersize=14,
            color="#d62728",
            label="learned",
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("restarts per GPU session")
        ax.set_ylabel("busy / reserved GPU-time (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
