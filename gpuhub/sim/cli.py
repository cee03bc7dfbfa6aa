"""`gpuhub simulate`: compare GPU policies on a notebook workload."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from ..core.decide import Rules
from ..core.learned import LearnedSettings
from .engine import POLICIES, RELEASE_POLICIES, PolicySpec, SimConfig, SimulationError
from .frontier import frontier as run_frontier
from .frontier import plot as plot_frontier
from .frontier import table as frontier_table
from .report import as_json, compare, table
from .synthetic import SyntheticParams, generate
from .workload import WorkloadError, default_trace_path, load_trace, workload_from_dict

DESCRIPTION = """\
Simulate a pool of GPUs shared by notebook sessions and compare policies side by side:
  none              sessions hold their GPUs until they end (no culling)
  activity-timeout  servers without activity for --activity-timeout are stopped (kernel state lost)
  gpuhub            gpuhub's policy with its defaults (GPU release on NVML idleness,
                    demand-aware reclaim, snapshots), run by gpuhub's own policy code
  oracle            GPUs held exactly while bursts run (the physical limit)

The workload is a trace in the format of the Adobe Sensei notebook trace (default: that trace, if
found next to the checkout), or a seeded synthetic workload of the same shape (--synthetic).

--json prints one object: {"trace", "gpus", "restart_delay_s", "workload", "policies": {name: M}},
where each M has reserved_gpu_hours, busy_gpu_hours, idle_reserved_gpu_hours, busy_fraction
(busy / reserved), wait_s {mean, p50, p95, max} (seconds a GPU burst waited for its GPUs,
restarts included), releases_per_session, restarts_per_session (per session that reserves GPUs),
sessions_state_lost (sessions whose kernel state was lost at least once), and more.

--release-policy chooses when gpuhub gives idle GPUs back: flat (after --gpu-idle-timeout),
learned (each session's own limit, learned online from the pauses seen so far; without history
the flat timeout), or perfect (a reference that knows each pause's length and releases at its
start when it is longer than --perfect-threshold). --frontier adds the GPU-hours-against-restarts
table: flat timeouts of 5, 10, 15, 30 and 60 minutes, the learned policy, and perfect prediction
at several thresholds, with the flat and perfect curves' busy / reserved at the learned policy's
restart count ("frontier" in --json); --plot PATH draws it.
"""


def _positive(kind: type, minimum: float, inclusive: bool = True):  # type: ignore[no-untyped-def]
    def parse(text: str):  # type: ignore[no-untyped-def]
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < minimum or (not inclusive and value == minimum):
            op = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(f"must be {op} {minimum:g}, not {text}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpuhub simulate",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", nargs="?", help="workload trace (JSON); default: the Adobe trace")
    p.add_argument("--gpus", type=_positive(int, 1), default=64, help="GPUs in the pool (64)")
    p.add_argument(
        "--restart-delay",
        type=_positive(float, 0),
        default=30.0,
        help="seconds a server takes to restart with or without its GPUs (30)",
    )
    p.add_argument(
        "--time-scale",
        type=_positive(float, 0, inclusive=False),
        default=1.0,
        help="multiply every time in the workload (0.5: everything twice as fast) (1)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload (0)")
    p.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma-separated subset of {','.join(POLICIES)}",
    )
    g = p.add_argument_group("synthetic workload (see docs/performance.md)")
    g.add_argument("--synthetic", action="store_true", help="generate the workload instead")
    g.add_argument("--load", type=_positive(float, 0, False), default=1.0, help="arrival x (1)")
    g.add_argument("--hours", type=_positive(float, 0, False), default=48.0, help="arrivals (48)")
    g.add_argument(
        "--sessions-per-hour",
        type=_positive(float, 0, False),
        default=SyntheticParams.sessions_per_hour,
        help=f"arrival rate at load 1 ({SyntheticParams.sessions_per_hour:g})",
    )
    g.add_argument("--write-trace", metavar="PATH", help="also write the generated workload")
    t = p.add_argument_group("policy settings")
    t.add_argument(
        "--activity-timeout",
        type=_positive(float, 0, False),
        default=3600.0,
        help="activity-timeout: stop servers idle this many seconds (3600)",
    )
    rules = Rules()
    t.add_argument(
        "--gpu-idle-timeout",
        type=_positive(float, 0),
        default=rules.gpu_idle_timeout,
        help=f"gpuhub: release GPUs idle this long ({rules.gpu_idle_timeout:g})",
    )
    t.add_argument(
        "--gpu-idle-timeout-under-demand",
        type=_positive(float, 0),
        default=rules.gpu_idle_timeout_under_demand,
        help=f"gpuhub: the same while someone waits ({rules.gpu_idle_timeout_under_demand:g})",
    )
    t.add_argument(
        "--server-idle-timeout",
        type=_positive(float, 0),
        default=rules.server_idle_timeout,
        help=f"gpuhub: stop servers without activity this long, 0: never "
        f"({rules.server_idle_timeout:g})",
    )
    t.add_argument(
        "--release-policy",
        choices=RELEASE_POLICIES,
        default="flat",
        help="gpuhub: when idle GPUs go back: flat, learned or perfect (flat)",
    )
    learned = LearnedSettings()
    t.add_argument(
        "--restart-cost",
        type=_positive(float, 0),
        default=learned.restart_cost,
        help=f"learned: seconds a restart costs the user ({learned.restart_cost:g})",
    )
    t.add_argument(
        "--gpu-hour-value",
        type=_positive(float, 0, False),
        default=learned.gpu_hour_value,
        help=f"learned: seconds of wait one GPU-hour is worth ({learned.gpu_hour_value:g})",
    )
    t.add_argument(
        "--min-idle",
        type=_positive(float, 0),
        default=learned.min_idle,
        help=f"learned: never release GPUs idle less than this ({learned.min_idle:g})",
    )
    t.add_argument(
        "--perfect-threshold",
        type=_positive(float, 0),
        default=600.0,
        help="perfect: release at the start of pauses longer than this (600)",
    )
    f = p.add_argument_group("frontier")
    f.add_argument(
        "--frontier",
        action="store_true",
        help="also run flat 5/10/15/30/60 min, learned and perfect prediction (11 runs)",
    )
    f.add_argument("--plot", metavar="PNG", help="with --frontier: draw it into this file")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown or not names:
        p.error(
            f"--policies: {unknown[0] if unknown else '(empty)'!r} is not one of "
            f"{', '.join(POLICIES)}"
        )
    if args.plot and not args.frontier:
        p.error("--plot: only with --frontier")
    extra: dict[str, object] = {"time_scale": args.time_scale}
    try:
        if args.synthetic:
            if args.trace:
                p.error("give either a trace or --synthetic, not both")
            params = SyntheticParams(
                hours=args.hours, sessions_per_hour=args.sessions_per_hour, load=args.load
            )
            data = generate(params, args.seed)
            if args.write_trace:
                Path(args.write_trace).write_text(json.dumps(data, indent=1))
            name = data["workload_title"]
            workload = workload_from_dict(data, name, args.time_scale)
            extra.update(seed=args.seed, synthetic_parameters=params.as_dict())
        else:
            path = Path(args.trace) if args.trace else default_trace_path()
            if path is None:
                p.error(
                    "no trace given and ../shared/traces/adobe-sensei-2021-06-01-02.json "
                    "not found; give a trace path or --synthetic"
                )
            workload = load_trace(path, args.time_scale)
            name = path.name
        rules = replace(
            Rules(),
            gpu_idle_timeout=args.gpu_idle_timeout,
            gpu_idle_timeout_under_demand=args.gpu_idle_timeout_under_demand,
            server_idle_timeout=args.server_idle_timeout,
        )
        learned = LearnedSettings(
            restart_cost=args.restart_cost,
            gpu_hour_value=args.gpu_hour_value,
            min_idle=args.min_idle,
        )
        specs = [
            PolicySpec(
                n,
                activity_timeout=args.activity_timeout,
                rules=rules,
                release_policy=args.release_policy,
                learned=learned,
                perfect_threshold=args.perfect_threshold,
                label=f"gpuhub ({args.release_policy})"
                if n == "gpuhub" and args.release_policy != "flat"
                else "",
            )
            for n in names
        ]
        config = SimConfig(gpus=args.gpus, restart_delay=args.restart_delay)
        results = compare(workload, config, specs)
        pareto = (
            run_frontier(workload, config, rules, [("settings given", learned)])
            if args.frontier
            else None
        )
    except (WorkloadError, SimulationError, ValueError) as e:
        print(f"gpuhub simulate: error: {e}", file=sys.stderr)
        return 2
    extra["settings"] = {
        "activity_timeout_s": args.activity_timeout,
        "gpu_idle_timeout_s": rules.gpu_idle_timeout,
        "gpu_idle_timeout_under_demand_s": rules.gpu_idle_timeout_under_demand,
        "server_idle_timeout_s": rules.server_idle_timeout,
        "release_policy": args.release_policy,
        "restart_cost_s": learned.restart_cost,
        "gpu_hour_value_s": learned.gpu_hour_value,
        "min_idle_s": learned.min_idle,
        "perfect_threshold_s": args.perfect_threshold,
    }
    if pareto is not None:
        extra["frontier"] = pareto.as_dict()
    report = as_json(name, workload, config, results, extra)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report))
        if pareto is not None:
            print(f"\nGPU-hours against restarts ({name}, {config.gpus} GPUs)\n")
            print(frontier_table(pareto))
    if pareto is not None and args.plot:
        path = plot_frontier([(f"{name}, {config.gpus} GPUs", pareto)], Path(args.plot))
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
