"""The single-user extension's background GPU sampling, as a share of one CPU core.

Each row is a fresh process running a real Jupyter Server (`ServerApp`, in that process) with
the gpuhub extension loaded as a single-user server loads it: its sampling loop ticks every
`sample_interval` seconds (a `GpuMonitor.tick` in a worker thread: NVML reads of every GPU, and
every `process_scan_interval` a scan of /proc for processes holding the GPUs' device files; then
the status document on the event loop, which looks up every process NVML lists). After a
warm-up, the process measures its own CPU time (`time.process_time`: every thread) against wall
time for `--seconds`. The baseline row is the same server with the same GPUs whose sampling
does not run during the measurement (`sample_interval` of a day): what the server costs idle.

The status document computes each GPU's activity from every reading the monitor keeps
(`history_seconds`, 4 hours by default), so a cycle costs more on a server that has been up for
hours than on one just started. Rows marked `full` measure that steady state: before measuring,
the monitor's history is filled with readings every `sample_interval` over `history_seconds`
(10 minutes busy, 20 idle, repeated), as the sampling itself would have left them. Rows marked
`empty` measure a server in its first minute.

The GPUs are simulated: `gpuhub.nvml_fake` with 1, 4 and 8 GPUs, each with one process (a real
`sleep` process started here) that holds the GPU's device file (a plain file standing in for
`/dev/nvidiaN`, matched with `device_file_pattern`) and that NVML lists on the GPU. Everything
else is the extension's defaults.

The fake NVML is Python code running in the server's process: it checks its scenario file on
every call and builds its answers in Python. A real `libnvidia-ml` call costs differently (a call
into the driver, whose cost depends on the driver, the GPU and how busy it is; not measured
here). A tick makes at least four NVML calls per GPU (two sample reads, memory, compute
processes): on real hardware that part of the worker's time is those calls at the driver's price.
The rest of a cycle (the /proc scan, the status document) is gpuhub's own Python and is measured
as it is.

    .venv/bin/python benchmarks/extension_overhead.py                      # 60 s per row
    .venv/bin/python benchmarks/extension_overhead.py --seconds 5 --gpus 1  # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpuhub import nvml_fake

FAKE_NVML_NOTE = (
    "GPUs simulated by gpuhub.nvml_fake: in-process Python, not libnvidia-ml; "
    "a real driver's NVML calls cost differently"
)
OFF_INTERVAL = 86400.0
#: the coroutine whose steps are the sampling loop's work on the event loop
SAMPLING_STEP = "GpuhubExtension._sample_forever"  # the baseline: no tick during the measurement
HISTORIES = ("empty", "full")


@dataclass(frozen=True)
class Measurement:
    """One process's CPU time over a measured stretch of wall time."""

    gpus: int
    interval_s: float | None  # None: the baseline (no sampling during the measurement)
    history: str  # "empty": a fresh server; "full": readings over the whole history kept
    wall_s: float
    cpu_s: float  # the whole process, every thread
    ticks: int
    tick_cpu_s: float  # inside GpuMonitor.tick (worker thread CPU time)
    processes_on_machine: int  # what a /proc scan walks
    max_loop_lag_ms: float = 0.0  # the longest the event loop was late for a 50 ms timer
    p99_loop_lag_ms: float = 0.0  # its 99th percentile
    max_callback_cpu_ms: float = 0.0  # the most CPU one event-loop callback took (loop thread)
    max_callback_wall_ms: float = 0.0  # the longest one event-loop callback ran (wall time)
    max_callback: str = ""  # which callback took `max_callback_cpu_ms`
    max_step_cpu_ms: float = 0.0  # the most CPU one step of the sampling loop took on the loop
    max_step_wall_ms: float = 0.0  # the longest one step of the sampling loop ran on the loop
    median_step_cpu_ms: float = 0.0  # the CPU of the sampling loop's median step on the loop
    max_gc_pause_ms: float = 0.0  # the longest collection of Python's cyclic garbage collector
    gc_collections: int = 0  # how many it ran (all generations)

    @property
    def core_pct(self) -> float:
        return 100 * self.cpu_s / self.wall_s


@dataclass(frozen=True)
class Row:
    measurement: Measurement
    baseline_pct: float

    @property
    def net_pct(self) -> float:
        """The sampling's share of a core: the process's, less the idle baseline's."""
        return self.measurement.core_pct - self.baseline_pct

    @property
    def cycle_cpu_ms(self) -> float | None:
        """CPU per sampling cycle, whole process, less the baseline's share of the time."""
        m = self.measurement
        if not m.ticks:
            return None
        return 1000 * (m.cpu_s - self.baseline_pct / 100 * m.wall_s) / m.ticks

    @property
    def tick_cpu_ms(self) -> float | None:
        m = self.measurement
        return 1000 * m.tick_cpu_s / m.ticks if m.ticks else None

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.measurement),
            "core_pct": self.measurement.core_pct,
            "baseline_pct": self.baseline_pct,
            "net_pct": self.net_pct,
            "tick_cpu_ms": self.tick_cpu_ms,
            "cycle_cpu_ms": self.cycle_cpu_ms,
        }


# -- the measured process -------------------------------------------------------------------------


def child(spec: dict[str, Any]) -> None:
    """Run a Jupyter Server with the gpuhub extension here; write a Measurement as JSON."""
    from jupyter_server.serverapp import ServerApp

    app = ServerApp()
    app.initialize(
        argv=[
            "--no-browser",
            "--allow-root",
            "--ip=127.0.0.1",
            f"--port={spec['port']}",
            f"--ServerApp.root_dir={spec['root']}",
            f"--IdentityProvider.token={uuid.uuid4().hex}",
            "--ServerApp.log_level=WARN",
            '--ServerApp.jpserver_extensions={"gpuhub.server": True}',
            f"--GpuhubExtension.sample_interval={spec['interval']}",
            f"--GpuhubExtension.device_file_pattern={spec['pattern']}",
        ]
    )
    extension = app.web_app.settings["gpuhub_extension"]
    monitor = extension.monitor
    if spec["history"] == "full":
        fill_history(monitor, spec["uuids"], spec["interval"])
    marks: dict[str, Any] = {"lags": [], "measuring": False}
    callbacks = time_callbacks(marks)
    collections = time_collections(marks)

    async def probe() -> None:
        """How late the event loop runs a 50 ms timer: what a blocked loop makes users wait
        (and what the machine's other processes make it wait: the loop's thread is not
        running while they are)."""
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(0.05)
            if marks["measuring"]:
                marks["lags"].append(time.perf_counter() - asked - 0.05)

    def start() -> None:
        marks["measuring"] = True
        callbacks.update(cpu=0.0, wall=0.0, name="", step_cpu=0.0, step_wall=0.0, steps=[])
        collections.update(longest=0.0, count=0)
        marks.update(
            cpu=time.process_time(),
            wall=time.perf_counter(),
            ticks=monitor.ticks,
            tick_cpu=monitor.tick_cpu_s,
        )

    def stop() -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        marks["measuring"] = False
        lags = sorted(marks["lags"]) or [0.0]
        result = Measurement(
            gpus=spec["gpus"],
            interval_s=None if spec["interval"] >= OFF_INTERVAL else spec["interval"],
            history=spec["history"],
            wall_s=wall - marks["wall"],
            cpu_s=cpu - marks["cpu"],
            ticks=monitor.ticks - marks["ticks"],
            tick_cpu_s=monitor.tick_cpu_s - marks["tick_cpu"],
            processes_on_machine=sum(1 for e in os.listdir("/proc") if e.isdigit()),
            max_loop_lag_ms=1000 * lags[-1],
            p99_loop_lag_ms=1000 * lags[int(0.99 * (len(lags) - 1))],
            max_callback_cpu_ms=1000 * callbacks["cpu"],
            max_callback_wall_ms=1000 * callbacks["wall"],
            max_callback=callbacks["name"],
            max_step_cpu_ms=1000 * callbacks["step_cpu"],
            max_step_wall_ms=1000 * callbacks["step_wall"],
            median_step_cpu_ms=1000 * statistics.median(callbacks["steps"] or [0.0]),
            max_gc_pause_ms=1000 * collections["longest"],
            gc_collections=collections["count"],
        )
        Path(spec["out"]).write_text(json.dumps(asdict(result)))
        app.stop()

    app.io_loop.add_callback(lambda: asyncio.ensure_future(probe()))
    app.io_loop.call_later(spec["warmup"], start)
    app.io_loop.call_later(spec["warmup"] + spec["seconds"], stop)
    app.start()


def time_callbacks(marks: dict[str, Any]) -> dict[str, Any]:
    """Time every callback the event loop runs (coroutine steps, timers, I/O handlers) while
    `marks["measuring"]`: the longest in wall time, and the most CPU time of the loop's thread
    one callback took, with its name. A callback's CPU time is what it holds the loop for by its
    own work; its wall time adds the time its thread waited (for the CPU, which the machine's
    other processes share, or for the GIL, which this process's worker threads share)."""
    longest: dict[str, Any] = {"cpu": 0.0, "wall": 0.0, "name": "", "step_cpu": 0.0}
    longest["step_wall"] = 0.0
    longest["steps"] = []
    run = asyncio.events.Handle._run

    def timed(handle: asyncio.events.Handle) -> None:
        if not marks["measuring"]:
            return run(handle)
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return run(handle)
        finally:
            cpu = time.thread_time() - cpu
            wall = time.perf_counter() - wall
            longest["wall"] = max(longest["wall"], wall)
            if cpu > longest["cpu"]:
                longest["cpu"] = cpu
                longest["name"] = _callback_name(handle)
            if _callback_name(handle) == SAMPLING_STEP:
                longest["step_cpu"] = max(longest["step_cpu"], cpu)
                longest["steps"].append(cpu)
                longest["step_wall"] = max(longest["step_wall"], wall)

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]
    return longest


def time_collections(marks: dict[str, Any]) -> dict[str, Any]:
    """The longest pause of Python's cyclic garbage collector while `marks["measuring"]` (it
    runs inside whatever callback allocated last, on any thread, and holds the GIL)."""
    out: dict[str, Any] = {"longest": 0.0, "count": 0, "started": 0.0}

    def callback(phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            out["started"] = time.perf_counter()
        elif marks["measuring"]:
            out["longest"] = max(out["longest"], time.perf_counter() - out["started"])
            out["count"] += 1

    gc.callbacks.append(callback)
    return out


def _callback_name(handle: asyncio.events.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):  # a coroutine's step: name the coroutine
        coro = owner.get_coro()
        return getattr(coro, "__qualname__", repr(coro))
    return getattr(callback, "__qualname__", repr(callback))[:120]


def fill_history(monitor: Any, uuids: list[str], interval: float) -> None:
    """The readings `monitor` would hold after sampling for its whole `history_s`: one every
    `interval` seconds, 10 minutes busy and 20 idle in turn, given to it as ticks would."""
    from gpuhub.core import idle

    now = time.time()
    count = int(monitor.history_s // interval)
    for uuid_ in uuids:
        samples = []
        for k in range(count, 0, -1):
            t = now - k * interval
            busy = (t // 60) % 30 < 10
            samples.append(idle.Sample(t, 60.0 if busy else 0.0, 30.0 if busy else 0.0))
        monitor.record(uuid_, samples, now)


# -- the driver -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Machine:
    """Simulated GPUs: device files, one process holding each, a fake-NVML scenario."""

    def __init__(self, workdir: Path, gpus: int) -> None:
        self.workdir = workdir
        self.dev = workdir / "dev"
        self.dev.mkdir(parents=True, exist_ok=True)
        self.pattern = rf"^{re.escape(str(self.dev))}/nvidia(\d+)$"
        self.holders: list[subprocess.Popen] = []
        scenario = nvml_fake.simulated_gpus(gpus)
        self.uuids = [g["uuid"] for g in scenario["gpus"]]
        for i, gpu in enumerate(scenario["gpus"]):
            device = self.dev / f"nvidia{i}"
            device.touch()
            with open(device) as f:  # the holder keeps it open as its stdin
                holder = subprocess.Popen(["sleep", "1000000"], stdin=f, start_new_session=True)
            self.holders.append(holder)
            busy = i % 2 == 0
            gpu.update(
                minor=i,
                util=60 if busy else 0,
                mem_util=30 if busy else 0,
                memory_used=(20 if busy else 2) * 1024**3,
                processes=[{"pid": holder.pid, "used_memory": 2 * 1024**3}],
            )
        self.scenario = workdir / "gpus.json"
        nvml_fake.write_scenario(self.scenario, scenario)

    def close(self) -> None:
        for holder in self.holders:
            if holder.poll() is None:
                holder.send_signal(signal.SIGTERM)
                holder.wait(10)


def server_env(workdir: Path, scenario: Path) -> dict[str, str]:
    """A server's environment of its own: HOME, Jupyter folders, the fake NVML, all GPUs."""
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUHUB_", "JUPYTER_"))} | {
        "HOME": str(home),
        "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
        "JUPYTER_DATA_DIR": str(home / ".local" / "share" / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(home / ".local" / "share" / "jupyter" / "runtime"),
        "GPUHUB_FAKE_NVML": str(scenario),
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if "GPUHUB_TEST_RUN" in os.environ:  # a test run ends the processes it started
        env["GPUHUB_TEST_RUN"] = os.environ["GPUHUB_TEST_RUN"]
    return env


def measure_one(
    workdir: Path, gpus: int, interval: float, history: str, seconds: float, warmup: float
) -> Measurement:
    run = workdir / f"gpus{gpus}-interval{interval:g}-{history}"
    machine = Machine(run, gpus)
    try:
        root = run / "work"
        root.mkdir()
        out = run / "result.json"
        spec = {
            "gpus": gpus,
            "interval": interval,
            "history": history,
            "uuids": machine.uuids,
            "seconds": seconds,
            "warmup": warmup,
            "port": free_port(),
            "root": str(root),
            "pattern": machine.pattern,
            "out": str(out),
        }
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            env=server_env(run, machine.scenario),
            cwd=root,
            capture_output=True,
            text=True,
            timeout=warmup + seconds + 120,
        )
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"the measured server failed:\n{done.stderr[-3000:]}")
        return Measurement(**json.loads(out.read_text()))
    finally:
        machine.close()


def measure(
    workdir: Path,
    gpu_counts: list[int],
    intervals: list[float],
    histories: list[str],
    seconds: float,
    warmup: float,
) -> list[Row]:
    baseline = measure_one(workdir, max(gpu_counts), OFF_INTERVAL, "empty", seconds, warmup)
    rows = [Row(baseline, baseline.core_pct)]
    for history in histories:
        for gpus in gpu_counts:
            for interval in intervals:
                m = measure_one(workdir, gpus, interval, history, seconds, warmup)
                rows.append(Row(m, baseline.core_pct))
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: list[Row], seconds: float) -> str:
    head = (
        f"{'GPUs':>5}{'interval s':>12}{'history':>9}{'ticks':>7}{'tick CPU ms':>13}"
        f"{'cycle CPU ms':>14}{'process % core':>16}{'sampling % core':>17}{'loop lag ms':>13}"
        f"{'lag p99 ms':>12}{'callback CPU ms':>17}{'callback wall ms':>18}{'step CPU ms':>13}"
        f"{'step wall ms':>14}{'GC pause ms':>13}  longest callback"
    )
    lines = [
        f"extension sampling overhead: {seconds:g} s of wall time per row, one process each",
        f"({FAKE_NVML_NOTE})",
        head,
        "-" * len(head),
    ]
    for r in rows:
        m = r.measurement
        interval = "off" if m.interval_s is None else f"{m.interval_s:g}"
        net = "(baseline)" if m.interval_s is None else f"{r.net_pct:.3f}"
        lines.append(
            f"{m.gpus:>5}{interval:>12}{m.history:>9}{m.ticks:>7}{_ms(r.tick_cpu_ms):>13}"
            f"{_ms(r.cycle_cpu_ms if m.interval_s else None):>14}{m.core_pct:>16.3f}{net:>17}"
            f"{m.max_loop_lag_ms:>13.1f}{m.p99_loop_lag_ms:>12.1f}{m.max_callback_cpu_ms:>17.2f}"
            f"{m.max_callback_wall_ms:>18.2f}{m.max_step_cpu_ms:>13.2f}{m.max_step_wall_ms:>14.2f}"
            f"{m.max_gc_pause_ms:>13.2f}  {m.max_callback}"
        )
    processes = rows[-1].measurement.processes_on_machine
    lines.append(f"(processes on the machine, walked by each /proc scan: about {processes})")
    return "\n".join(lines)


def _loop(m: Measurement) -> str:
    return (
        f"{m.max_loop_lag_ms:.1f} / {m.p99_loop_lag_ms:.1f} ms "
        f"| {m.max_callback_cpu_ms:.2f} / {m.max_callback_wall_ms:.1f} ms "
        f"| {m.median_step_cpu_ms:.2f}, {m.max_step_cpu_ms:.2f} / {m.max_step_wall_ms:.2f} ms"
    )


def markdown(rows: list[Row]) -> str:
    lines = [
        "| GPUs | sample interval | history | ticks | CPU per tick (worker) "
        "| CPU per cycle (process) | process, % of a core | sampling, % of a core "
        "| event-loop delay, max / p99 | longest callback, CPU / wall "
        "| sampling step on the loop: CPU median, max / wall max |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r.measurement
        if m.interval_s is None:
            lines.append(
                f"| {m.gpus} | off (baseline) | {m.history} | {m.ticks} | - | - "
                f"| {m.core_pct:.3f} | - | {_loop(m)} |"
            )
            continue
        lines.append(
            f"| {m.gpus} | {m.interval_s:g} s | {m.history} | {m.ticks} | {_ms(r.tick_cpu_ms)} ms "
            f"| {_ms(r.cycle_cpu_ms)} ms | {m.core_pct:.3f} | {r.net_pct:.3f} | {_loop(m)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument(
        "--intervals",
        type=float,
        nargs="+",
        default=[5.0, 1.0],
        help="sample intervals in seconds (5: the extension's default)",
    )
    parser.add_argument(
        "--history",
        nargs="+",
        choices=HISTORIES,
        default=list(HISTORIES),
        help="empty: a server just started; full: after history_seconds of sampling",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time per row")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.seconds <= 0 or min(args.gpus) < 1 or min(args.intervals) <= 0:
        parser.error("--seconds, --gpus and --intervals must be positive")
    workdir = Path(tempfile.mkdtemp(prefix="gpuhub-overhead-bench-"))
    try:
        rows = measure(workdir, args.gpus, args.intervals, args.history, args.seconds, args.warmup)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps({"note": FAKE_NVML_NOTE, "rows": [r.to_dict() for r in rows]}, indent=1))
    elif args.markdown:
        print(markdown(rows))
    else:
        print(table(rows, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
