"""Compare GPU policies on the Adobe Sensei notebook trace and on synthetic workloads.

Runs `none`, `activity-timeout`, `gpuhub` and `oracle` side by side on the real trace and on
synthetic workloads at 1x, 2x and 4x the load, prints one table per workload and a summary with
ratios, the GPU-hours-against-restarts frontier of flat timeouts against the learned release
policy and perfect prediction (trace at 64 and 48 GPUs, synthetic loads at seeds 0-2), and draws
the plots of docs/performance.md into docs/img/.

    .venv/bin/python benchmarks/simulate_policies.py             # tables and plots
    .venv/bin/python benchmarks/simulate_policies.py --markdown  # tables as Markdown
    .venv/bin/python benchmarks/simulate_policies.py --quick     # a small smoke run

The trace: Adobe Sensei, June 1-2 2021, the workload template shipped with NotebookOS (Carver et
al., ASPLOS'26, arXiv 2503.20591), repository ds2-lab/NotebookOS-Dashboard, MIT licence.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from gpuhub.core.decide import Rules
from gpuhub.sim import frontier as pareto
from gpuhub.sim.engine import POLICIES, PolicyResult, PolicySpec, SimConfig, simulate
from gpuhub.sim.report import as_json, compare, table
from gpuhub.sim.synthetic import SyntheticParams, generate
from gpuhub.sim.workload import Workload, default_trace_path, load_trace, workload_from_dict

REPO = Path(__file__).resolve().parent.parent
COLORS = {
    "none": "#9e9e9e",
    "activity-timeout": "#f0a030",
    "gpuhub": "#2a7ab9",
    "oracle": "#3a9a4a",
}


def workloads(args: argparse.Namespace) -> list[tuple[str, Workload]]:
    out = []
    if not args.no_trace:
        path = Path(args.trace) if args.trace else default_trace_path()
        if path is None:
            sys.exit("no trace found: give --trace PATH or --no-trace")
        out.append(("Adobe trace", load_trace(path)))
    for load in args.loads:
        params = SyntheticParams(hours=args.hours, load=load)
        data = generate(params, args.seed)
        out.append((f"synthetic {load:g}x", workload_from_dict(data, data["workload_title"])))
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    config = SimConfig(gpus=args.gpus, restart_delay=args.restart_delay, timeline=True)
    for label, workload in workloads(args):
        started = time.perf_counter()
        results = compare(workload, config)
        seconds = time.perf_counter() - started
        report = as_json(label, workload, config, results)
        runs.append(
            {
                "label": label,
                "workload": workload,
                "report": report,
                "results": results,
                "seconds": seconds,
            }
        )
    return runs


SUMMARY_COLUMNS = (
    ("workload", "{}"),
    ("policy", "{}"),
    ("reserved GPU-h", "{:,.0f}"),
    ("x none", "{:.2f}"),
    ("x oracle", "{:.2f}"),
    ("busy/reserved", "{:.2f}"),
    ("wait mean s", "{:,.0f}"),
    ("wait p95 s", "{:,.0f}"),
    ("restarts/sess", "{:.2f}"),
    ("state lost", "{}"),
)


def summary_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in runs:
        p = r["report"]["policies"]
        for name in POLICIES:
            m = p[name]
            values = (
                r["label"],
                name,
                m["reserved_gpu_hours"],
                m["reserved_gpu_hours"] / p["none"]["reserved_gpu_hours"],
                m["reserved_gpu_hours"] / p["oracle"]["reserved_gpu_hours"],
                m["busy_fraction"],
                m["wait_s"]["mean"],
                m["wait_s"]["p95"],
                m["restarts_per_session"],
                m["sessions_state_lost"],
            )
            rows.append(
                [fmt.format(v) for (_h, fmt), v in zip(SUMMARY_COLUMNS, values, strict=True)]
            )
    return rows


def text_table(rows: list[list[str]]) -> str:
    header = [h for h, _f in SUMMARY_COLUMNS]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(
            h.rjust(w) if i > 1 else h.ljust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i > 1 else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    header = [h for h, _f in SUMMARY_COLUMNS]
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plots(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [r["label"] for r in runs]
    width = 0.8 / len(POLICIES)
    written = []

    def bars(ax, metric, scale: float = 1.0) -> None:  # type: ignore[no-untyped-def]
        for i, name in enumerate(POLICIES):
            values = [metric(r["report"]["policies"][name]) * scale for r in runs]
            xs = [x + (i - (len(POLICIES) - 1) / 2) * width for x in range(len(runs))]
            ax.bar(xs, values, width, label=name, color=COLORS[name])
        ax.set_xticks(range(len(runs)), labels)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bars(ax1, lambda m: m["busy_fraction"] or 0.0, 100)
    ax1.set_ylabel("busy / reserved GPU-time (%)")
    ax1.set_title("How much of the reserved GPU-time does work")
    ax1.set_ylim(0, 105)
    bars(ax2, lambda m: m["reserved_gpu_hours"])
    ax2.set_ylabel("reserved GPU-hours")
    ax2.set_title("GPU-hours reserved for the same work")
    ax1.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = out_dir / "sim-utilisation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bars(ax1, lambda m: m["wait_s"]["mean"] / 60)
    ax1.set_ylabel("minutes")
    ax1.set_title("Mean wait of a GPU burst")
    bars(ax2, lambda m: m["wait_s"]["p95"] / 60)
    ax2.set_ylabel("minutes")
    ax2.set_title("95th percentile wait of a GPU burst")
    for ax in (ax1, ax2):
        ax.set_yscale("symlog", linthresh=1)
    ax1.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = out_dir / "sim-wait.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    first = runs[0]
    results: dict[str, PolicyResult] = first["results"]
    fig, ax = plt.subplots(figsize=(11, 4))
    start = min((r.timeline[0][0] for r in results.values() if r.timeline), default=0.0)
    for name in POLICIES:
        tl = results[name].timeline
        if not tl:
            continue
        xs = [(t - start) / 3600 for t, *_ in tl]
        ax.step(xs, [p[1] for p in tl], where="post", label=f"{name}: reserved", color=COLORS[name])
    busy = results["oracle"].timeline
    if busy:
        ax.fill_between(
            [(t - start) / 3600 for t, *_ in busy],
            [p[2] for p in busy],
            step="post",
            alpha=0.25,
            color=COLORS["oracle"],
            label="busy (bursts running)",
        )
    ax.axhline(first["report"]["gpus"], color="black", lw=0.8, ls="--", label="pool size")
    ax.set_xlabel("hours")
    ax.set_ylabel("GPUs")
    ax.set_title(f"GPUs reserved over time: {first['label']}")
    ax.legend(fontsize=8, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    path = out_dir / "sim-timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def sweep(args: argparse.Namespace, workload: Workload) -> list[dict[str, Any]]:
    """The same workload on pools of different sizes: what each policy needs to keep waits short."""
    out = []
    for gpus in args.sweep:
        config = SimConfig(gpus=gpus, restart_delay=args.restart_delay)
        results = compare(workload, config)
        out.append({"gpus": gpus, "policies": {n: r.metrics() for n, r in results.items()}})
    return out


def timeout_sweep(args: argparse.Namespace, workload: Workload) -> list[list[str]]:
    """gpuhub with different GPU idle timeouts: GPU-hours against restarts."""
    config = SimConfig(gpus=args.gpus, restart_delay=args.restart_delay)
    oracle = simulate(workload, PolicySpec("oracle"), config).metrics()["reserved_gpu_hours"]
    rows = []
    for timeout in args.idle_timeouts:
        spec = PolicySpec("gpuhub", rules=Rules(gpu_idle_timeout=timeout))
        m = simulate(workload, spec, config).metrics()
        rows.append(
            [
                _duration(timeout),
                f"{m['reserved_gpu_hours']:,.0f}",
                f"{m['reserved_gpu_hours'] / oracle:.2f}",
                f"{m['busy_fraction']:.2f}",
                f"{m['wait_s']['mean']:.0f} s",
                f"{m['wait_s']['max']:.0f} s",
                f"{m['restarts_per_session']:.1f}",
            ]
        )
    return rows


TIMEOUT_HEADER = [
    "gpu_idle_timeout",
    "reserved GPU-h",
    "x oracle",
    "busy/reserved",
    "wait mean",
    "wait max",
    "restarts/sess",
]


def print_rows(header: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---:" for _ in header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def sweep_rows(points: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["GPUs"] + [f"{n} mean / p95 wait" for n in POLICIES]
    rows = []
    for point in points:
        cells = [str(point["gpus"])]
        for name in POLICIES:
            w = point["policies"][name]["wait_s"]
            cells.append(f"{_duration(w['mean'])} / {_duration(w['p95'])}")
        rows.append(cells)
    return header, rows


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plot_sweep(points: list[dict[str, Any]], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [p["gpus"] for p in points]
    for name in POLICIES:
        ax1.plot(
            xs,
            [p["policies"][name]["wait_s"]["p95"] / 60 for p in points],
            marker="o",
            label=name,
            color=COLORS[name],
        )
        ax2.plot(
            xs,
            [100 * p["policies"][name]["pool_utilization"] for p in points],
            marker="o",
            label=name,
            color=COLORS[name],
        )
    ax1.set_yscale("symlog", linthresh=1)
    ax1.set_xlabel("GPUs in the pool")
    ax1.set_ylabel("minutes")
    ax1.set_title("95th percentile wait of a GPU burst (Adobe trace)")
    ax2.set_xlabel("GPUs in the pool")
    ax2.set_ylabel("% of the pool's GPU-time busy")
    ax2.set_title("Pool utilisation (Adobe trace)")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sim-pool-size.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frontiers(args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat timeouts against the learned policy and perfect prediction, per workload."""
    out = []
    cases: list[tuple[str, Workload, int]] = []
    if runs and runs[0]["label"] == "Adobe trace":
        for gpus in args.frontier_gpus:
            cases.append((f"Adobe trace, {gpus} GPUs", runs[0]["workload"], gpus))
    for load in args.loads:
        for seed in args.frontier_seeds:
            data = generate(SyntheticParams(hours=args.hours, load=load), seed)
            label = f"synthetic {load:g}x seed {seed}, {args.gpus} GPUs"
            cases.append((label, workload_from_dict(data, label), args.gpus))
    for label, workload, gpus in cases:
        config = SimConfig(gpus=gpus, restart_delay=args.restart_delay)
        started = time.perf_counter()
        f = pareto.frontier(workload, config)
        out.append({"label": label, "frontier": f, "seconds": time.perf_counter() - started})
    return out


def frontier_summary(items: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "workload",
        "learned busy/reserved",
        "restarts/sess",
        "wait p95",
        "flat at same restarts",
        "gain",
        "perfect at same restarts",
        "share of possible gain",
    ]
    rows = []
    for item in items:
        f = item["frontier"]
        for p in f.learned:
            c = f.compare(p)
            flat, perfect, share = (
                c["flat_at_same_restarts"],
                c["perfect_at_same_restarts"],
                c["share_of_possible_gain"],
            )
            rows.append(
                [
                    item["label"],
                    f"{p.busy_fraction:.3f}",
                    f"{p.restarts:.2f}",
                    _duration(p.wait_p95),
                    "-" if flat is None else f"{flat:.3f}",
                    "-" if c["gain_over_flat"] is None else f"{c['gain_over_flat']:+.3f}",
                    "-" if perfect is None else f"{perfect:.3f}",
                    "-" if share is None else f"{100 * share:.0f} %",
                ]
            )
    return header, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trace", help="trace file (default: ../shared/traces/adobe-sensei-...)")
    p.add_argument("--no-trace", action="store_true", help="synthetic workloads only")
    p.add_argument("--gpus", type=int, default=64, help="GPUs in the pool (64)")
    p.add_argument("--restart-delay", type=float, default=30.0, help="seconds (30)")
    p.add_argument("--loads", default="1,2,4", help="synthetic loads (1,2,4)")
    p.add_argument("--hours", type=float, default=48.0, help="synthetic arrival window (48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(REPO / "docs" / "img"), help="where plots go")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--json", metavar="PATH", help="also write every report as JSON")
    p.add_argument("--quick", action="store_true", help="smoke run: 6 h of synthetic load")
    p.add_argument(
        "--idle-timeouts",
        default="300,600,1800,3600",
        help="gpuhub GPU idle timeouts (s) to run the trace with; empty: none",
    )
    p.add_argument(
        "--sweep",
        default="32,48,64,96,128,160",
        help="pool sizes to run the trace on (32,48,64,96,128,160); empty: none",
    )
    p.add_argument(
        "--frontier-gpus",
        default="64,48",
        help="pool sizes for the trace's GPU-hours-against-restarts frontier (64,48); empty: none",
    )
    p.add_argument(
        "--frontier-seeds",
        default="0,1,2",
        help="synthetic seeds for the frontier, at every --loads (0,1,2); empty: none",
    )
    args = p.parse_args(argv)
    try:
        args.frontier_gpus = [int(x) for x in args.frontier_gpus.split(",") if x.strip()]
        args.frontier_seeds = [int(x) for x in args.frontier_seeds.split(",") if x.strip()]
    except ValueError:
        p.error("--frontier-gpus / --frontier-seeds: not a list of integers")
    try:
        args.loads = [float(x) for x in args.loads.split(",") if x.strip()]
    except ValueError:
        p.error(f"--loads: not a list of numbers: {args.loads!r}")
    try:
        args.sweep = [int(x) for x in args.sweep.split(",") if x.strip()]
    except ValueError:
        p.error(f"--sweep: not a list of GPU counts: {args.sweep!r}")
    try:
        args.idle_timeouts = [float(x) for x in args.idle_timeouts.split(",") if x.strip()]
    except ValueError:
        p.error(f"--idle-timeouts: not a list of seconds: {args.idle_timeouts!r}")
    if args.quick:
        args.hours = 6.0
        args.sweep = []
        args.idle_timeouts = []
        args.frontier_gpus = []
        args.frontier_seeds = args.frontier_seeds[:1]
        args.no_trace = args.no_trace or (args.trace is None and default_trace_path() is None)

    started = time.perf_counter()
    runs = run(args)
    for r in runs:
        print(f"## {r['label']} ({r['seconds']:.1f} s for 4 policies)\n")
        print(table(r["report"]))
        print()
    rows = summary_rows(runs)
    print("## Summary: each policy against none (no culling) and oracle (the physical limit)\n")
    print(markdown_table(rows) if args.markdown else text_table(rows))
    points: list[dict[str, Any]] = []
    if args.sweep and runs and runs[0]["label"] == "Adobe trace":
        points = sweep(args, runs[0]["workload"])
        header, rows = sweep_rows(points)
        print("\n## Adobe trace on pools of different sizes: burst wait, mean / p95\n")
        print_rows(header, rows, args.markdown)
    if args.idle_timeouts and runs and runs[0]["label"] == "Adobe trace":
        print(f"\n## Adobe trace, gpuhub with other GPU idle timeouts ({args.gpus} GPUs)\n")
        print_rows(TIMEOUT_HEADER, timeout_sweep(args, runs[0]["workload"]), args.markdown)
    fronts = frontiers(args, runs)
    for item in fronts:
        print(f"\n## GPU-hours against restarts: {item['label']} ({item['seconds']:.0f} s)\n")
        print(pareto.table(item["frontier"], markdown=args.markdown))
    if fronts:
        print("\n## The learned release policy against the flat timeouts at the same restarts\n")
        print_rows(*frontier_summary(fronts), args.markdown)
    if args.json:
        everything = {
            "runs": [r["report"] for r in runs],
            "pool_sizes": points,
            "frontiers": [{"label": f["label"], **f["frontier"].as_dict()} for f in fronts],
        }
        Path(args.json).write_text(json.dumps(everything, indent=2))
    if not args.no_plots:
        for path in plots(runs, Path(args.out_dir)):
            print(f"wrote {path}")
        if points:
            print(f"wrote {plot_sweep(points, Path(args.out_dir))}")
        if fronts:
            path = Path(args.out_dir) / "sim-frontier.png"
            shown = [(f["label"], f["frontier"]) for f in fronts]
            print(f"wrote {pareto.plot(shown, path)}")
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
