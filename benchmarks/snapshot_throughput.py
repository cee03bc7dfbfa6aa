"""Snapshot and restore throughput against a raw save and load of the same object (`numpy.save`
/ `numpy.load`, `torch.save` / `torch.load`, `pandas.to_pickle` / `pandas.read_pickle`), to the
same disk, in the same kernel.

The kernel is a real ipykernel of the `pytorch` catalogue environment (`.envs/pytorch`), started
the way the single-user server starts kernels: a notebook session through jupyter_server's
`SessionManager` and `AsyncMappingKernelManager`. Snapshots and restores go through the
extension's own `SnapshotManager` with the extension's default settings, so the kernel receives
exactly the code the server sends (`KernelClients.command` + `run_snapshot` / `run_restore`):
the pickle stream and data file per variable, checksums, fsync of every file and folder, the
manifest, the atomic rename. The raw side is one silent cell in the same kernel that writes the
same object to a file next to the snapshots, then flushes and fsyncs it; loading assigns the
loaded object to the same variable, as a restore does.

Objects (`--kinds`): `numpy` (random float64), `torch` (float32), `state_dict` (the weights and
biases of a stack of linear layers), `tensors` (a dict of a thousand float32 tensors) and `pandas`
(a frame of one int64 and four float64 columns), each of the given size. For each kind and size,
the user namespace holds just one variable (`data`), so a snapshot's bytes are that object's.
Every figure is the wall time the caller waits (the request to the kernel included), the median
of `--repeat` rounds after one round that is not counted; gpuhub goes first in even rounds and
second in odd ones. Every restore and load is checked against the original's checksum.

Per operation the kernel's peak resident memory is measured from a reset (`/proc/self/clear_refs`
5) to the end of the operation: "extra peak" is that peak less the memory before it, and for a
restore or load (which start without the object) less the object it brings back. After each
snapshot a second one of the unchanged kernel is taken ("unchanged again", and its share of the
first one's time). Finally, per kernel, the median time of a snapshot request with nothing to
save: the fixed cost of a request.

    .venv/bin/python benchmarks/snapshot_throughput.py                      # 10, 100, 1000 MB
    .venv/bin/python benchmarks/snapshot_throughput.py --sizes 1 --repeat 1  # a quick check

The kernel needs up to twice the largest size in memory (the object and its raw load).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from jupyter_server.services.sessions.sessionmanager import SessionManager

from gpuhub.server.app import GpuhubExtension
from gpuhub.server.snapshots import SnapshotManager, SnapshotSettings

REPO = Path(__file__).resolve().parents[1]
KERNEL_PYTHON = REPO / ".envs" / "pytorch" / "bin" / "python"
KINDS = ("numpy", "torch", "state_dict", "tensors", "pandas")
OPS = ("save", "load")

#: Loaded into the kernel as module `_gpuhub_bench` (never into the user namespace, which is
#: what a snapshot saves). `make` puts the data in the namespace as `data`.
HELPER = r"""
import gc, hashlib, json, os, sys, time
from IPython import get_ipython

last = "null"


def _ns():
    return get_ipython().user_ns


def _arrays(value):
    if isinstance(value, dict):
        for k in sorted(value):
            yield from _arrays(value[k])
    elif type(value).__module__.startswith("pandas"):
        for column in value.columns:
            yield value[column].to_numpy()
    elif type(value).__module__.startswith("torch"):
        yield value.numpy()
    else:
        yield value


def _checksum(value):
    digest = hashlib.sha256()
    for a in _arrays(value):
        digest.update(memoryview(a.reshape(-1)).cast("B"))
    return digest.hexdigest()[:16]


def _nbytes(value):
    return sum(a.nbytes for a in _arrays(value))


def make(kind, nbytes):
    global last
    ns = _ns()
    ns.pop("data", None)
    gc.collect()
    import numpy as np
    rng = np.random.default_rng(0)
    if kind == "numpy":
        value = rng.random(nbytes // 8)
    elif kind == "pandas":
        import pandas as pd
        rows = max(1, nbytes // 40)
        value = pd.DataFrame({
            "id": np.arange(rows, dtype=np.int64),
            **{f"x{i}": rng.random(rows) for i in range(4)},
        })
    else:
        import torch
        if kind == "torch":
            value = torch.from_numpy(rng.random(nbytes // 4, dtype=np.float32))
        elif kind == "state_dict":  # a stack of linear layers: weights and biases
            width = 1024
            layers = max(1, min(24, nbytes // (width * width * 4)))
            rows = max(1, nbytes // 4 // layers // (width + 1))
            model = torch.nn.Sequential(*[torch.nn.Linear(width, rows) for _ in range(layers)])
            value = {k: v.detach() for k, v in model.state_dict().items()}
        else:  # "tensors": a thousand tensors of equal size
            each = max(1, nbytes // 4 // 1000)
            value = {f"t{i:04d}": torch.from_numpy(rng.random(each, dtype=np.float32))
                     for i in range(1000)}
    ns["data"] = value
    last = json.dumps({"nbytes": int(_nbytes(value)), "checksum": _checksum(value)})


def _status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS")}


def mark():
    # the peak resident memory reset to the current one (Linux: clear_refs 5)
    global last
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    last = json.dumps(_status()["VmRSS"])


def peak():
    global last
    last = json.dumps(_status()["VmHWM"])


def drop():
    global last
    _ns().pop("data", None)
    gc.collect()
    last = "null"


def peak_rss():
    global last
    import resource
    last = json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def checksum():
    global last
    last = json.dumps(_checksum(_ns()["data"]))


def save(kind, path):
    global last
    value = _ns()["data"]
    started = time.perf_counter()
    with open(path, "wb") as f:
        if kind == "numpy":
            import numpy as np
            np.save(f, value)
        elif kind == "pandas":
            value.to_pickle(f)
        else:
            import torch
            torch.save(value, f)
        f.flush()
        os.fsync(f.fileno())
    last = json.dumps({"seconds": time.perf_counter() - started, "bytes": os.path.getsize(path)})


def load(kind, path):
    global last
    started = time.perf_counter()
    if kind == "numpy":
        import numpy as np
        value = np.load(path)
    elif kind == "pandas":
        import pandas as pd
        value = pd.read_pickle(path)
    else:
        import torch
        value = torch.load(path, weights_only=True)
    _ns()["data"] = value
    last = json.dumps({"seconds": time.perf_counter() - started})
"""
HELPER_MODULE = "_gpuhub_bench"
RESULT = f"__import__('sys').modules[{HELPER_MODULE!r}].last"


@dataclass(frozen=True)
class Row:
    """Median seconds of one operation on one object, through gpuhub and raw."""

    kind: str
    op: str  # "save" (snapshot vs numpy/torch.save) or "load" (restore vs numpy/torch.load)
    nbytes: int
    gpuhub_s: float
    raw_s: float
    gpuhub_kernel_s: float | None  # the snapshot's own duration, from its manifest
    file_bytes: int  # what the snapshot wrote for the object
    raw_file_bytes: int
    kernel_peak_rss: int  # bytes, the kernel's peak resident memory so far
    gpuhub_extra_peak: int = 0  # bytes the operation took at its peak beyond what it keeps
    raw_extra_peak: int = 0
    resave_s: float | None = None  # a second snapshot, nothing changed (save rows only)

    @property
    def gpuhub_mb_s(self) -> float:
        return self.nbytes / 1e6 / self.gpuhub_s

    @property
    def raw_mb_s(self) -> float:
        return self.nbytes / 1e6 / self.raw_s

    @property
    def ratio(self) -> float:
        """gpuhub's throughput relative to the raw call (1.0: as fast)."""
        return self.raw_s / self.gpuhub_s

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "gpuhub_mb_s": self.gpuhub_mb_s,
            "raw_mb_s": self.raw_mb_s,
            "ratio": self.ratio,
        }


def default_settings(root: Path) -> SnapshotSettings:
    """The extension's snapshot settings with their default values, snapshots under `root`."""
    traits = GpuhubExtension.class_traits()

    def default(name: str) -> Any:
        return traits[name].default_value

    return SnapshotSettings(
        root=str(root),
        limit_bytes=default("snapshot_size_limit") or None,
        reserve_bytes=default("snapshot_disk_reserve"),
        keep=default("snapshots_kept"),
        timeout_s=default("snapshot_timeout"),
        restore_timeout_s=default("restore_timeout"),
        auto_restore=False,  # the benchmark restores on its own schedule
    )


class Bench:
    """One notebook kernel of the `pytorch` environment, with gpuhub's snapshot manager."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.snapshot_root = workdir / "snapshots"
        self.raw_dir = workdir / "raw"
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        spec = workdir / "kernels" / "pytorch"
        spec.mkdir(parents=True, exist_ok=True)
        (spec / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": [
                        str(KERNEL_PYTHON),
                        "-m",
                        "ipykernel_launcher",
                        "-f",
                        "{connection_file}",
                    ],
                    "display_name": "PyTorch",
                    "language": "python",
                }
            )
        )
        root = workdir / "work"
        root.mkdir(exist_ok=True)
        (workdir / "runtime").mkdir(exist_ok=True)
        self.km = AsyncMappingKernelManager(
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(workdir / "kernels")]),
            root_dir=str(root),
            connection_dir=str(workdir / "runtime"),
        )
        self.sessions = SessionManager(
            kernel_manager=self.km, contents_manager=AsyncLargeFileManager(root_dir=str(root))
        )
        settings = default_settings(self.snapshot_root)
        self.snapshots = SnapshotManager(self.km, self.sessions, settings)
        self.kernel_id = ""
        self.client: Any = None
        self.cold = False  # evict the files from the page cache before each restore and load

    async def start(self) -> None:
        if not KERNEL_PYTHON.exists():
            raise SystemExit(f"{KERNEL_PYTHON} is missing: run scripts/install-python.sh")
        session = await self.sessions.create_session(
            path="throughput.ipynb", name="throughput.ipynb", type="notebook", kernel_name="pytorch"
        )
        self.kernel_id = session["kernel"]["id"]
        kernel = self.km.get_kernel(self.kernel_id)
        self.client = kernel.client()
        self.client.start_channels()
        await self.client.wait_for_ready(timeout=120)
        await self.execute(
            "import sys, types\n"
            f"_m = sys.modules[{HELPER_MODULE!r}] = types.ModuleType({HELPER_MODULE!r})\n"
            f"exec({HELPER!r}, _m.__dict__)\n"
            "del _m, sys, types",
        )

    async def stop(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
        await self.km.shutdown_all(now=True)
        self.sessions.close()

    async def execute(self, code: str) -> Any:
        """Run `code` as a silent cell; the helper module's `last` result, decoded."""
        reply = await self.client.execute_interactive(
            code,
            silent=True,
            store_history=False,
            user_expressions={"result": RESULT},
            allow_stdin=False,
            timeout=900,
        )
        content = reply["content"]
        if content["status"] != "ok":
            raise RuntimeError(f"the kernel raised {content.get('ename')}: {content.get('evalue')}")
        result = content["user_expressions"].get("result", {})
        if result.get("status") != "ok":
            return None
        return json.loads(ast.literal_eval(result["data"]["text/plain"]))

    async def helper(self, function: str, *args: Any) -> Any:
        rendered = ", ".join(repr(a) for a in args)
        return await self.execute(
            f"__import__('sys').modules[{HELPER_MODULE!r}].{function}({rendered})"
        )

    # -- one round ------------------------------------------------------------------------------

    async def gpuhub_save(self) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        result = await self.snapshots.snapshot(self.kernel_id)
        seconds = time.perf_counter() - started
        if result["status"] != "saved":
            raise RuntimeError(f"snapshot failed: {result}")
        saved = {v["name"]: v for v in result["manifest"]["saved"]}
        if "data" not in saved and "data" in result["manifest"].get("skipped", ()):
            raise RuntimeError(f"the snapshot did not save `data`: {result['manifest']}")
        return seconds, result

    async def gpuhub_load(self, snapshot: str) -> float:
        started = time.perf_counter()
        result = await self.snapshots.restore(self.kernel_id, snapshot, notify=False)
        seconds = time.perf_counter() - started
        if result["status"] != "restored" or "data" not in result["restored"]:
            raise RuntimeError(f"restore failed: {result}")
        return seconds

    async def raw_save(self, kind: str, path: Path) -> tuple[float, int]:
        started = time.perf_counter()
        result = await self.helper("save", kind, str(path))
        return time.perf_counter() - started, int(result["bytes"])

    async def raw_load(self, kind: str, path: Path) -> float:
        started = time.perf_counter()
        await self.helper("load", kind, str(path))
        return time.perf_counter() - started

    async def check(self, expected: str, what: str) -> None:
        got = await self.helper("checksum")
        if got != expected:
            raise RuntimeError(f"{what} brought back different data ({got} != {expected})")

    async def _marked(self, work: Any) -> tuple[Any, int]:
        """Run `work()` (a coroutine function); its result and the kernel's peak resident
        memory during it, less the resident memory before it."""
        before = await self.helper("mark")
        result = await work()
        return result, int(await self.helper("peak")) - int(before)

    async def round(self, kind: str, first: str, expected: str, nbytes: int) -> dict[str, Any]:
        """Save and load once each way; `first` says which way goes first. Each load starts
        without the object in the kernel, so its extra peak memory is the peak less the object
        it brings back."""
        ext = {"numpy": "npy", "pandas": "pkl"}.get(kind, "pt")
        path = self.raw_dir / f"data.{ext}"
        out: dict[str, Any] = {}
        for way in (first, "raw" if first == "gpuhub" else "gpuhub"):
            if way == "gpuhub":
                (seconds, result), out["gpuhub_save_peak"] = await self._marked(self.gpuhub_save)
                out["gpuhub_save"] = seconds
                out["gpuhub_kernel"] = float(result["manifest"]["duration_s"])
                out["file_bytes"] = next(
                    v["bytes"] for v in result["manifest"]["saved"] if v["name"] == "data"
                )
                snapshot = result["snapshot"]
                out["resave"], again = await self.gpuhub_save()  # unchanged: nothing to write
                self.snapshots.delete(again["key"], again["snapshot"])
            else:

                async def raw_save() -> tuple[float, int]:
                    return await self.raw_save(kind, path)

                (out["raw_save"], out["raw_file_bytes"]), out["raw_save_peak"] = await self._marked(
                    raw_save
                )
        for way in (first, "raw" if first == "gpuhub" else "gpuhub"):
            await self.helper("drop")
            if self.cold:
                evict(Path(result["path"]) if way == "gpuhub" else path)
            if way == "gpuhub":

                async def gpuhub_load() -> float:
                    return await self.gpuhub_load(snapshot)

                out["gpuhub_load"], peak = await self._marked(gpuhub_load)
                out["gpuhub_load_peak"] = peak - nbytes
                await self.check(expected, "the restore")
            else:

                async def raw_load() -> float:
                    return await self.raw_load(kind, path)

                out["raw_load"], peak = await self._marked(raw_load)
                out["raw_load_peak"] = peak - nbytes
                await self.check(expected, f"{kind} load")
        self.snapshots.delete(result["key"], snapshot)
        path.unlink()
        return out

    async def fixed_cost(self, repeat: int) -> float:
        """Median seconds of a snapshot request on an idle kernel with nothing to save."""
        await self.helper("drop")
        times = []
        for _ in range(repeat):
            seconds, result = await self.gpuhub_save()
            self.snapshots.delete(result["key"], result["snapshot"])
            times.append(seconds)
        return statistics.median(times)


def evict(path: Path) -> None:
    """Drop a file's (or a folder's files') pages from the page cache, as if written long ago:
    the next read comes from the disk. Only these files; nothing else of the machine's cache."""
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


async def measure(
    workdir: Path, sizes_mb: list[float], kinds: list[str], repeat: int, cold: bool = False
) -> tuple[list[Row], dict[str, float]]:
    """Rows for every kind and size (ascending), one fresh kernel per kind; and per kind, the
    median time of a snapshot request on that idle kernel with nothing to save."""
    rows: list[Row] = []
    fixed: dict[str, float] = {}
    for kind in kinds:
        bench = Bench(workdir / kind)
        bench.cold = cold
        await bench.start()
        try:
            # Warm-up: gpuhub's modules loaded into the kernel, the saving paths imported.
            made = await bench.helper("make", kind, 1024)
            await bench.round(kind, "gpuhub", made["checksum"], int(made["nbytes"]))
            fixed[kind] = await bench.fixed_cost(max(5, repeat))
            for size in sorted(sizes_mb):
                made = await bench.helper("make", kind, int(size * 1e6))
                nbytes = int(made["nbytes"])
                # One round not counted: the first use of this much memory and disk is slower
                # (fresh pages for the process, and on a virtual machine for the machine).
                await bench.round(kind, "raw", made["checksum"], nbytes)
                rounds = [
                    await bench.round(
                        kind, "gpuhub" if i % 2 == 0 else "raw", made["checksum"], nbytes
                    )
                    for i in range(repeat)
                ]
                peak = await bench.helper("peak_rss")

                def median(key: str, rounds: list[dict[str, Any]] = rounds) -> float:
                    return statistics.median(r[key] for r in rounds)

                for op in OPS:
                    rows.append(
                        Row(
                            kind=kind,
                            op=op,
                            nbytes=nbytes,
                            gpuhub_s=median(f"gpuhub_{op}"),
                            raw_s=median(f"raw_{op}"),
                            gpuhub_kernel_s=median("gpuhub_kernel") if op == "save" else None,
                            file_bytes=int(rounds[0]["file_bytes"]),
                            raw_file_bytes=int(rounds[0]["raw_file_bytes"]),
                            kernel_peak_rss=int(peak),
                            gpuhub_extra_peak=int(max(r[f"gpuhub_{op}_peak"] for r in rounds)),
                            raw_extra_peak=int(max(r[f"raw_{op}_peak"] for r in rounds)),
                            resave_s=median("resave") if op == "save" else None,
                        )
                    )
        finally:
            await bench.stop()
    return rows, fixed


def _size(nbytes: int) -> str:
    """The size asked for (a state_dict comes out a few bytes short of it), 3 digits."""
    mb = nbytes / 1e6
    return f"{mb / 1000:.3g} GB" if mb >= 995 else f"{mb:.3g} MB"


def _operation(r: Row, code: str = "") -> str:
    raw = {"numpy": "numpy", "pandas": "pandas"}.get(r.kind, "torch")
    verb = (
        ("save" if r.op == "save" else "load")
        if raw != "pandas"
        else ("to_pickle" if r.op == "save" else "read_pickle")
    )
    return f"{'snapshot' if r.op == 'save' else 'restore'} vs {code}{raw}.{verb}{code}"


def _mb(n: int) -> str:
    """Memory beyond what the operation keeps; below zero (memory the process had already,
    used again) shows as none."""
    return f"{max(0, n) / 1e6:,.0f} MB"


def _resave(r: Row) -> str:
    if r.resave_s is None:
        return ""
    return f"{r.resave_s:.2f} s ({r.resave_s / r.gpuhub_s:.0%})"


def table(rows: list[Row], repeat: int, fixed: dict[str, float] | None = None) -> str:
    head = (
        f"{'object':<11}{'size':>9}  {'operation':<32}{'gpuhub MB/s':>12}{'raw MB/s':>10}"
        f"{'gpuhub/raw':>12}{'extra peak':>12}{'raw extra':>11}  {'unchanged again':<16}"
    )
    lines = [
        f"snapshot throughput: median of {repeat} round(s), wall time of each request",
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{r.kind:<11}{_size(r.nbytes):>9}  {_operation(r):<32}{r.gpuhub_mb_s:>12,.0f}"
            f"{r.raw_mb_s:>10,.0f}{r.ratio:>11.2f}x{_mb(r.gpuhub_extra_peak):>12}"
            f"{_mb(r.raw_extra_peak):>11}  {_resave(r):<16}"
        )
    for kind, seconds in (fixed or {}).items():
        lines.append(
            f"(a snapshot request with nothing to save, {kind} kernel: {seconds * 1000:.0f} ms)"
        )
    return "\n".join(line.rstrip() for line in lines)


def markdown(rows: list[Row], fixed: dict[str, float] | None = None) -> str:
    lines = [
        "| object | size | operation | gpuhub MB/s | raw MB/s | gpuhub / raw "
        "| extra peak memory, gpuhub | extra peak memory, raw | second snapshot, unchanged |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kind} | {_size(r.nbytes)} | {_operation(r, '`')} | {r.gpuhub_mb_s:,.0f} "
            f"| {r.raw_mb_s:,.0f} | {r.ratio:.2f} | {_mb(r.gpuhub_extra_peak)} "
            f"| {_mb(r.raw_extra_peak)} | {_resave(r)} |"
        )
    out = "\n".join(line.rstrip() for line in lines)
    if fixed:
        out += "\n\n" + "; ".join(
            f"{kind}: {seconds * 1000:.0f} ms" for kind, seconds in fixed.items()
        )
    return out


def plot(rows: list[Row], path: Path) -> Path:
    """gpuhub's speed relative to the raw save and load, per object and size: snapshots left,
    restores right, with the 0.8 and 1.0 lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r.kind for r in rows))
    sizes = sorted({round(r.nbytes / 1e6, -1) or r.nbytes / 1e6 for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.8 / max(1, len(sizes))
    for ax, op, title in zip(axes, OPS, ("snapshot / raw save", "restore / raw load"), strict=True):
        for j, size in enumerate(sizes):
            values = []
            for kind in kinds:
                match = [
                    r
                    for r in rows
                    if r.kind == kind
                    and r.op == op
                    and (round(r.nbytes / 1e6, -1) or r.nbytes / 1e6) == size
                ]
                values.append(match[0].ratio if match else 0.0)
            positions = [i + (j - (len(sizes) - 1) / 2) * width for i in range(len(kinds))]
            ax.bar(positions, values, width, label=_size(int(size * 1e6)))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.8, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_title(title)
    axes[0].set_ylabel("gpuhub speed / raw speed (same run)")
    axes[1].legend(title="object size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[10, 100, 1000], help="MB (10^6 bytes)"
    )
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, help="where snapshots and raw files go (default: a temporary folder)"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="restore and load from the disk: the files' pages dropped from the page cache first",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--plot", type=Path, help="also draw the ratios into this PNG file")
    parser.add_argument(
        "--results",
        type=Path,
        help="read the results of an earlier --json run instead of measuring",
    )
    args = parser.parse_args()
    if args.repeat < 1 or any(s <= 0 for s in args.sizes):
        parser.error("--repeat and --sizes must be positive")
    if args.results:
        saved = json.loads(args.results.read_text())
        fields = Row.__dataclass_fields__
        rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in saved["rows"]]
        fixed = saved["fixed_cost_s"]
    else:
        workdir = Path(tempfile.mkdtemp(prefix="gpuhub-snapshot-bench-", dir=args.dir))
        try:
            rows, fixed = asyncio.run(
                measure(workdir, args.sizes, args.kinds, args.repeat, args.cold)
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps({"rows": [r.to_dict() for r in rows], "fixed_cost_s": fixed}, indent=1))
    elif args.markdown:
        print(markdown(rows, fixed))
    else:
        print(table(rows, args.repeat, fixed))
        print(f"(kernel: {KERNEL_PYTHON}; files under {args.dir or tempfile.gettempdir()})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    sys.exit(main())
