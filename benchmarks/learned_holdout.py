"""The learned release policy on sessions it has not seen: a hold-out check on the Adobe trace.

The trace's sessions are split at random into two halves (seeded). For each half, the learned
policy runs on it twice: learning from nothing (cold), and starting from the site's pauses
learned on the other half (warm: what a site that ran gpuhub before has in its store; only the
site's history is carried over, no server's or user's). Each run is compared with the flat
timeouts of 5-60 minutes on the same half at the same restart count. The learned policy's
parameters were not fitted to the trace (see docs/gpu-release.md), so a gain that holds on both
halves, cold and warm, is not an artefact of having seen the sessions it is measured on.

    .venv/bin/python benchmarks/learned_holdout.py            # splits 0 and 1, Markdown table
    .venv/bin/python benchmarks/learned_holdout.py --splits 3
    .venv/bin/python benchmarks/learned_holdout.py --synthetic --hours 6 --splits 1  # a smoke run
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace

from gpuhub.core.decide import Rules
from gpuhub.core.learned import SITE, GapModel, LearnedSettings
from gpuhub.sim.engine import GPUHUB, LEARNED, PolicySpec, SimConfig, simulate
from gpuhub.sim.frontier import FLAT_TIMEOUTS, Point, at_restarts, point
from gpuhub.sim.synthetic import SyntheticParams, generate
from gpuhub.sim.workload import Workload, default_trace_path, load_trace, workload_from_dict


def halves(trace: Workload, seed: int) -> tuple[Workload, Workload]:
    ids = sorted(s.id for s in trace.sessions)
    random.Random(seed).shuffle(ids)
    first = set(ids[: len(ids) // 2])
    a = tuple(s for s in trace.sessions if s.id in first)
    b = tuple(s for s in trace.sessions if s.id not in first)
    return Workload(f"{trace.name} half A", a), Workload(f"{trace.name} half B", b)


def site_model(workload: Workload, config: SimConfig, settings: LearnedSettings) -> GapModel:
    """A model holding only the site's pauses learned by running `workload`."""
    learned = GapModel(settings)
    simulate(workload, PolicySpec(GPUHUB, release_policy=LEARNED), config, learned)
    fresh = GapModel(settings)
    fresh.load(SITE, "", learned.to_json(SITE, ""))
    return fresh


def learned_point(w: Workload, config: SimConfig, model: GapModel | None, label: str) -> Point:
    m = simulate(w, PolicySpec(GPUHUB, release_policy=LEARNED), config, model).metrics()
    return Point(
        LEARNED,
        label,
        m["busy_fraction"] or 0.0,
        m["restarts_per_session"],
        m["wait_s"]["p95"],
        m["sessions_state_lost"],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", type=int, default=2, help="random splits, seeds 0.. (2)")
    p.add_argument("--gpus", type=int, default=64, help="GPUs in the pool (64)")
    p.add_argument(
        "--synthetic", action="store_true", help="split a synthetic workload (seed 0) instead"
    )
    p.add_argument("--hours", type=float, default=48.0, help="--synthetic: hours of arrivals (48)")
    args = p.parse_args()
    if args.synthetic:
        trace = workload_from_dict(generate(SyntheticParams(hours=args.hours), 0), "synthetic")
    else:
        path = default_trace_path()
        if path is None:
            raise SystemExit("the Adobe trace is not in ../shared/traces/; try --synthetic")
        trace = load_trace(path)
    config = SimConfig(gpus=args.gpus)
    settings = LearnedSettings()
    print(
        "| split | evaluated on | learned from | busy/reserved | restarts/sess | "
        "flat at same restarts | gain | state lost |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for seed in range(args.splits):
        a, b = halves(trace, seed)
        for name, evaluated, other in (("A", a, b), ("B", b, a)):
            flat = [
                point(
                    evaluated,
                    PolicySpec(GPUHUB, rules=replace(Rules(), gpu_idle_timeout=t)),
                    config,
                    f"{t / 60:g} min",
                )
                for t in FLAT_TIMEOUTS
            ]
            runs = (
                ("nothing (cold)", learned_point(evaluated, config, None, "cold")),
                (
                    "the other half's site pauses",
                    learned_point(evaluated, config, site_model(other, config, settings), "warm"),
                ),
            )
            for source, pt in runs:
                f = at_restarts(flat, pt.restarts)
                flat_s = "outside" if f is None else f"{f:.3f}"
                gain = "" if f is None else f"{pt.busy_fraction - f:+.3f}"
                print(
                    f"| {seed} | half {name} ({len(evaluated.sessions)} sessions) | {source} | "
                    f"{pt.busy_fraction:.3f} | {pt.restarts:.2f} | {flat_s} | {gain} | "
                    f"{pt.state_lost} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
