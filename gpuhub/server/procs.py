"""Which local processes hold a GPU: open GPU device files, found through /proc.

A process that uses CUDA keeps `/dev/nvidiaN` open (N is the GPU's minor number, which NVML
reports) for as long as it lives. Reading another user's `/proc/<pid>/fd` is not allowed, so this
sees the server user's own processes: its kernels, terminals, and scripts started from them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_DEVICE_PATTERN = r"^/dev/nvidia(\d+)$"


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int | None
    cmdline: str


def read_process(pid: int, proc: str = "/proc") -> ProcessInfo | None:
    """The process's parent and command line; None when it is gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    rest = stat[stat.rfind(")") + 2 :].split()
    ppid = int(rest[1]) if len(rest) > 1 and rest[1].isdigit() else None
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmdline = ""
    if not cmdline:
        cmdline = stat[stat.find("(") + 1 : stat.rfind(")")]
    return ProcessInfo(pid, ppid, cmdline[:300])


def device_holders(
    minors: Iterable[int],
    pattern: str = DEFAULT_DEVICE_PATTERN,
    proc: str = "/proc",
    exclude: Iterable[int] = (),
) -> dict[int, set[int]]:
    """pid -> the minors in `minors` whose device file it has open (readable processes only)."""
    wanted = set(minors)
    if not wanted:
        return {}
    regex = re.compile(pattern)
    skip = set(exclude)
    out: dict[int, set[int]] = {}
    try:
        entries = os.listdir(proc)
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit() or int(entry) in skip:
            continue
        fd_dir = f"{proc}/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # another user's process, or gone
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            m = regex.match(target)
            if m and int(m.group(1)) in wanted:
                out.setdefault(int(entry), set()).add(int(m.group(1)))
    return out


def has_device_open(pid: int, pattern: str = DEFAULT_DEVICE_PATTERN, proc: str = "/proc") -> bool:
    """True when `pid` is a readable local process with a GPU device file open."""
    regex = re.compile(pattern)
    try:
        fds = os.listdir(f"{proc}/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if regex.match(os.readlink(f"{proc}/{pid}/fd/{fd}")):
                return True
        except OSError:
            continue
    return False


def owner_among(
    pid: int, candidates: dict[int, str], proc: str = "/proc", max_depth: int = 64
) -> str | None:
    """The value of `candidates` for `pid` or its nearest ancestor in it (a kernel's id for a
    kernel and the processes it started), else None."""
    seen = 0
    current: int | None = pid
    while current and seen < max_depth:
        if current in candidates:
            return candidates[current]
        info = read_process(current, proc)
        if info is None:
            return None
        current = info.ppid
        seen += 1
    return None
