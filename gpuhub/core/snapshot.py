"""Kernel snapshots, the pure part: the manifest, what is skipped and why, size accounting,
where snapshots live and which one is the latest good one.

A snapshot of one kernel is a folder `<root>/<key>/<name>/` holding `manifest.json` and one
pickle per saved variable under `vars/`. `<key>` names the notebook (or, without one, the
kernel); `<name>` is the UTC time it was taken (`20260102T030405.123456Z`), so names sort by
time. A snapshot is written to a hidden `.tmp-...` folder next to it and renamed into place when
complete; a folder without the leading dot is always whole.

This module is stdlib-only on purpose: its source is also loaded into kernels, whose environments
do not have gpuhub installed. Keep it that way (no gpuhub imports, no third-party imports).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT = 3
#: manifest formats this code restores: 1 (one dill pickle per variable), 2 (a pickle stream
#: and a data file of large buffers per variable, CRC-32 checksums) and 3 (the same, with the
#: checksum algorithm named per variable: XXH3-128 or CRC-32)
READABLE_FORMATS = (1, 2, 3)
MANIFEST = "manifest.json"
VARS_DIR = "vars"
TMP_PREFIX = ".tmp-"
RESTORED_MARK = "restored.json"  # in <root>/<key>/: the last snapshot restored automatically
RESTORE_NEXT = "restore-next.json"  # in <root>/<key>/: the snapshot chosen for the next start

#: IPython's own names in the user namespace: never user data, not listed in manifests.
IPYTHON_NAMES = frozenset(
    {
        "In",
        "Out",
        "_",
        "__",
        "___",
        "_i",
        "_ii",
        "_iii",
        "_ih",
        "_oh",
        "_dh",
        "_sh",
        "exit",
        "quit",
        "get_ipython",
        "__builtin__",
        "__builtins__",
        "__name__",
        "__doc__",
        "__package__",
        "__loader__",
        "__spec__",
        "__file__",
        "__session__",
    }
)
_HISTORY_NAME = re.compile(r"^_(i)?\d+$")

#: (class, qualified by module, anywhere in an object's MRO) -> why it is not saved
SKIP_TYPES: Mapping[str, str] = {
    "_io._IOBase": "an open file: files are not saved, open it again after the restore",
    "io.IOBase": "an open file: files are not saved, open it again after the restore",
    "tempfile._TemporaryFileWrapper": "an open temporary file: it is gone after a restart",
    "builtins.generator": "a generator: its running state cannot be saved",
    "builtins.coroutine": "a coroutine: its running state cannot be saved",
    "builtins.async_generator": "an async generator: its running state cannot be saved",
    "builtins.frame": "an execution frame: it cannot be saved",
    "builtins.traceback": "a traceback: it cannot be saved",
    "threading.Thread": "a thread: running threads cannot be saved, start it again",
    "socket.socket": "a network socket: connections cannot be saved",
    "subprocess.Popen": "a running subprocess: processes cannot be saved",
    "sqlite3.Connection": "a database connection: connect again after the restore",
    "sqlite3.Cursor": "a database cursor: connect again after the restore",
    "multiprocessing.pool.Pool": "a worker pool: its processes cannot be saved",
    "concurrent.futures._base.Executor": "a worker pool: its workers cannot be saved",
    "asyncio.events.AbstractEventLoop": "an event loop: it belongs to the running process",
    "torch.cuda.streams.Stream": "a CUDA stream: it belongs to the GPU context",
    "torch.cuda.streams.Event": "a CUDA event: it belongs to the GPU context",
    "torch.utils.data.dataloader._BaseDataLoaderIter": "a data loader iterator: recreate it",
    "ipywidgets.widgets.widget.Widget": "a widget: it lives in the browser, run its cell again",
}

#: types whose values are never shared references worth keeping identity for
ATOMIC_TYPES = frozenset(
    {"builtins.int", "builtins.float", "builtins.bool", "builtins.str", "builtins.bytes"}
    | {"builtins.complex", "builtins.NoneType"}
)


def is_ipython_name(name: str) -> bool:
    """True for IPython's own names (input/output history, helpers): not user variables."""
    return name in IPYTHON_NAMES or bool(_HISTORY_NAME.match(name))


def skip_reason(mro: Sequence[str]) -> str | None:
    """Why an object whose classes (module-qualified, most derived first) are `mro` is not
    saved, or None when it can be tried."""
    for name in mro:
        reason = SKIP_TYPES.get(name)
        if reason:
            return reason
    return None


def type_names(cls: type) -> tuple[str, ...]:
    """Module-qualified names of `cls` and its bases, most derived first."""
    return tuple(f"{c.__module__}.{c.__qualname__}" for c in getattr(cls, "__mro__", (cls,)))


# -- size accounting -------------------------------------------------------------------------


def remaining(limit: int | None, used: int, free_disk: int | None, reserve: int) -> int | None:
    """Bytes the snapshot may still write: under `limit` (None or 0: no limit) and leaving
    `reserve` bytes free on the disk."""
    caps = []
    if limit:
        caps.append(limit - used)
    if free_disk is not None:
        caps.append(free_disk - reserve)
    return max(0, min(caps)) if caps else None


def over_budget(estimate: int | None, left: int | None) -> str | None:
    """Why a variable of `estimate` bytes (None: unknown) is not written, with `left` bytes
    left (None: no limit); None when it may be written."""
    if left is None or estimate is None:
        return None
    if estimate > left:
        return f"too large: about {human_bytes(estimate)}, {human_bytes(left)} left under the limit"
    return None


def human_bytes(n: int | float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value = float(n)
    for unit in units:
        if abs(value) < 1024 or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# -- the manifest ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedVariable:
    """A variable in a snapshot. `kind` is "pickle" (its value, in `file`) or "module" (an
    imported module, imported again on restore). `refs` names other variables it refers to
    (restored first); `devices` lists the GPU devices its tensors were on.

    Formats 2 and 3: `file` is a pickle stream of `file_bytes` bytes with checksum `checksum`
    (hex), written by `pickler` ("pickle": Python's C pickler, or "dill"); its large buffers are
    in `data_file` (`data_bytes` bytes, one checksum per 16 MiB chunk, concatenated, in
    `data_digests`). `hash_algorithm` names the checksums' algorithm: "xxh3_128" (32 hex digits)
    or "crc32" (8; format 2 knew only CRC-32, and called `data_digests` `data_crcs`).
    `bytes` is both files together. `reused` names the earlier snapshot whose identical files
    were linked into this one instead of being written again (the files are this snapshot's
    own all the same: removing the earlier snapshot does not affect them)."""

    name: str
    type: str
    kind: str
    bytes: int = 0
    file: str | None = None
    module: str | None = None
    refs: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    pickler: str = ""
    file_bytes: int = 0
    checksum: str | None = None
    data_file: str | None = None
    data_bytes: int = 0
    data_digests: str = ""
    reused: str | None = None
    hash_algorithm: str = "crc32"


@dataclass(frozen=True)
class SkippedVariable:
    """A variable that is not in the snapshot, and why. `bytes` is its estimated size when the
    size limit was the reason."""

    name: str
    type: str
    reason: str
    bytes: int | None = None


@dataclass(frozen=True)
class Manifest:
    key: str
    name: str
    created: float  # unix seconds
    kernel_id: str | None = None
    notebook: str | None = None
    python: str = ""
    packages: Mapping[str, str] = field(default_factory=dict)
    saved: tuple[SavedVariable, ...] = ()
    skipped: tuple[SkippedVariable, ...] = ()
    limit_bytes: int | None = None
    duration_s: float = 0.0
    format: int = FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(v.bytes for v in self.saved)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["packages"] = dict(self.packages)
        out["total_bytes"] = self.total_bytes
        out["created_iso"] = iso(self.created)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


def manifest_from_dict(data: Mapping[str, Any]) -> Manifest:
    """A Manifest from its JSON form; ValueError naming the field when it is malformed."""
    if not isinstance(data, Mapping):
        raise ValueError("manifest: not an object")
    if data.get("format") not in READABLE_FORMATS:
        raise ValueError(f"manifest.format: unsupported {data.get('format')!r}")
    # format 1 wrote every variable with dill, and did not say so
    pickler = {"pickler": "dill"} if data.get("format") == 1 else {}
    try:
        saved = tuple(
            SavedVariable(
                **{
                    **(pickler if v.get("kind") == "pickle" else {}),
                    **_renamed(v),
                    "refs": tuple(v.get("refs", ())),
                    "devices": tuple(v.get("devices", ())),
                }
            )
            for v in data.get("saved", ())
        )
        skipped = tuple(SkippedVariable(**v) for v in data.get("skipped", ()))
    except (TypeError, AttributeError) as e:
        raise ValueError(f"manifest.saved/skipped: {e}") from None
    for name in ("key", "name"):
        if not isinstance(data.get(name), str):
            raise ValueError(f"manifest.{name}: missing")
    return Manifest(
        key=data["key"],
        name=data["name"],
        created=float(data.get("created", 0)),
        kernel_id=data.get("kernel_id"),
        notebook=data.get("notebook"),
        python=str(data.get("python", "")),
        packages=dict(data.get("packages") or {}),
        saved=saved,
        skipped=skipped,
        limit_bytes=data.get("limit_bytes"),
        duration_s=float(data.get("duration_s", 0.0)),
        format=int(data["format"]),
    )


def _renamed(v: Mapping[str, Any]) -> dict[str, Any]:
    """A saved variable's fields under this version's names (format 2's `data_crcs` are the
    CRC-32s now in `data_digests`)."""
    out = dict(v)
    if "data_crcs" in out:
        out.setdefault("data_digests", out.pop("data_crcs"))
        out.pop("data_crcs", None)
    return out


def manifest_from_json(text: str) -> Manifest:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"manifest: not JSON ({e})") from None
    return manifest_from_dict(data)


# -- names and places ------------------------------------------------------------------------


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def snapshot_key(notebook: str | None, kernel_id: str | None) -> str:
    """The folder name for a notebook's snapshots (its path, readable and unique), or for a
    kernel without a notebook (`kernel-<id>`)."""
    if notebook:
        readable = _UNSAFE.sub("_", notebook.strip("/")).strip("._") or "notebook"
        digest = hashlib.sha256(notebook.strip("/").encode()).hexdigest()[:10]
        return f"{readable[-80:]}-{digest}"
    if not kernel_id:
        raise ValueError("snapshot key: a notebook path or a kernel id is needed")
    return f"kernel-{_UNSAFE.sub('_', kernel_id)}"


def timestamp_name(t: float) -> str:
    """Folder name for a snapshot taken at unix time `t`: sortable UTC time, microseconds."""
    whole = int(t)
    micro = round((t - whole) * 1e6)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(whole)) + f".{micro:06d}Z"


_NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z$")


def is_snapshot_name(name: str) -> bool:
    return bool(_NAME.match(name))


def iso(t: float) -> str:
    """ISO 8601 UTC with a Z, as Jupyter's REST API writes times."""
    whole = int(t)
    millis = int((t - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def complete_snapshots(names: Iterable[str]) -> list[str]:
    """Folder names that are finished snapshots, oldest first (temporary folders excluded)."""
    return sorted(n for n in names if is_snapshot_name(n))


def latest(names: Iterable[str]) -> str | None:
    done = complete_snapshots(names)
    return done[-1] if done else None


def to_prune(names: Iterable[str], keep: int, protect: Iterable[str] = ()) -> list[str]:
    """Finished snapshots beyond the `keep` newest (never the newest one, never one in
    `protect`: the snapshot a user chose to restore next)."""
    done = complete_snapshots(names)
    keep = max(1, keep)
    kept = set(protect)
    return [n for n in (done[:-keep] if len(done) > keep else []) if n not in kept]


def temp_prefix(name: str, pid: int) -> str:
    """Prefix of the temporary folder a process `pid` writes snapshot `name` into."""
    return f"{TMP_PREFIX}{name}-{pid}-"


def temp_pid(folder: str) -> int | None:
    """The PID that wrote a temporary folder, from its name (None if not a temporary)."""
    m = re.match(rf"^{re.escape(TMP_PREFIX)}\d{{8}}T\d{{6}}\.\d{{6}}Z-(\d+)-", folder)
    return int(m.group(1)) if m else None


def stale_temporaries(
    names: Iterable[str],
    now: float,
    mtimes: Mapping[str, float],
    alive: Iterable[int],
    older_than: float = 6 * 3600,
) -> list[str]:
    """Temporary folders of interrupted snapshots: their writer is gone (not in `alive`), or
    they were last touched more than `older_than` seconds ago (a PID reused since)."""
    alive = set(alive)
    out = []
    for n in names:
        if not n.startswith(TMP_PREFIX):
            continue
        pid = temp_pid(n)
        if pid is None or pid not in alive or now - mtimes.get(n, now) > older_than:
            out.append(n)
    return sorted(out)


# -- restore ---------------------------------------------------------------------------------


def restore_order(saved: Sequence[SavedVariable]) -> list[SavedVariable]:
    """Modules first, then every variable after the variables it refers to (snapshot order
    otherwise; variables in a reference cycle keep their snapshot order)."""
    by_name = {v.name: v for v in saved}
    order: list[SavedVariable] = []
    placed: set[str] = set()
    visiting: set[str] = set()

    def place(v: SavedVariable) -> None:
        if v.name in placed or v.name in visiting:
            return
        visiting.add(v.name)
        for ref in v.refs:
            if ref in by_name:
                place(by_name[ref])
        visiting.discard(v.name)
        placed.add(v.name)
        order.append(v)

    for v in saved:
        if v.kind == "module":
            place(v)
    for v in saved:
        place(v)
    return order


@dataclass(frozen=True)
class RestoreReport:
    """What a restore brought back. `moved` lists variables whose GPU tensors came back on the
    CPU (no GPU in the new kernel)."""

    key: str
    snapshot: str | None
    restored: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    skipped_at_snapshot: tuple[tuple[str, str], ...] = ()
    moved: tuple[str, ...] = ()
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "snapshot": self.snapshot,
            "restored": list(self.restored),
            "failed": [{"name": n, "reason": r} for n, r in self.failed],
            "skipped_at_snapshot": [{"name": n, "reason": r} for n, r in self.skipped_at_snapshot],
            "moved_to_cpu": list(self.moved),
            "error": self.error,
        }


def summary(report: RestoreReport, limit: int = 12) -> str:
    """A few lines for the notebook user: what came back and what did not."""

    def names(items: Sequence[str]) -> str:
        shown = ", ".join(items[:limit])
        return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")

    if report.error:
        return f"gpuhub: nothing restored: {report.error}"
    if report.snapshot is None:
        return "gpuhub: no snapshot to restore"
    head = (
        f"gpuhub: restored {len(report.restored)} variable(s) from the snapshot of "
        f"{_readable_name(report.snapshot)}"
    )
    lines = [head + (f": {names(report.restored)}" if report.restored else "")]
    for name, reason in report.failed:
        lines.append(f"  not restored: {name} ({reason})")
    for name, reason in report.skipped_at_snapshot:
        lines.append(f"  not in the snapshot: {name} ({reason})")
    if report.moved:
        lines.append(f"  on the CPU now (no GPU here): {names(list(report.moved))}")
    return "\n".join(lines)


def _readable_name(name: str) -> str:
    if not is_snapshot_name(name):
        return name
    return f"{name[0:4]}-{name[4:6]}-{name[6:8]} {name[9:11]}:{name[11:13]}:{name[13:15]} UTC"
