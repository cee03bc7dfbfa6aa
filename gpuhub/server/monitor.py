"""GPU activity of one single-user server: NVML readings over time, the processes holding its
GPUs, and the status document served at `/api/gpuhub/status`.

`GpuMonitor.tick` runs in a worker thread every few seconds; everything else reads what the last
tick left, under a lock, on the server's event loop. Each GPU's activity is kept up to date
reading by reading (`idle.ActivityTracker`), so what the event loop does per status document does
not grow with the history kept.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .. import nvml
from ..core import idle
from ..core.snapshot import iso
from . import procs

UNAVAILABLE = "unavailable"


def wanted_gpus(env: Mapping[str, str]) -> list[str] | None:
    """The GPUs this server was given, as listed in its environment: `GPUHUB_GPUS` (set by
    gpuhub's spawners), else `CUDA_VISIBLE_DEVICES`; None when neither is set (in a container
    NVML shows only the container's GPUs: all of them are the server's)."""
    for name in ("GPUHUB_GPUS", "CUDA_VISIBLE_DEVICES"):
        if name in env:
            return [t.strip() for t in env[name].split(",") if t.strip()]
    return None


def selector(tokens: list[str] | None) -> Callable[[nvml.GpuDevice], bool] | None:
    """Which NVML devices `tokens` (UUIDs, unique UUID prefixes, or indices) name; None: all.

    A whole GPU in MIG mode named by its UUID selects all of its instances.
    """
    if tokens is None:
        return None

    def select(device: nvml.GpuDevice) -> bool:
        return any(_names(token, device) for token in tokens)

    return select


def _names(token: str, device: nvml.GpuDevice) -> bool:
    if token.isdigit():
        return not device.is_mig_instance and device.index == int(token)
    if token in (device.uuid, device.parent_uuid):
        return True
    return len(token) >= 8 and device.uuid.startswith(token)


class GpuMonitor:
    """Samples the server's GPUs and remembers `history_s` seconds of readings."""

    def __init__(
        self,
        rule: idle.IdleRule,
        interval: float = 5.0,
        history_s: float = 4 * 3600,
        scan_interval: float = 15.0,
        device_pattern: str = procs.DEFAULT_DEVICE_PATTERN,
        env: Mapping[str, str] | None = None,
        sampler: nvml.Sampler | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        env = os.environ if env is None else env
        self.rule = rule
        self.interval = interval
        self.history_s = max(history_s, rule.window_s)
        self.scan_interval = scan_interval
        self.device_pattern = device_pattern
        self.wanted = wanted_gpus(env)
        self.sampler = sampler or nvml.Sampler(selector(self.wanted))
        self.clock = clock
        self._lock = threading.Lock()
        self._trackers: dict[str, idle.ActivityTracker] = {}
        self._poll: nvml.Poll | None = None
        self._holders: dict[int, set[int]] = {}
        self._scanned_at: float | None = None
        self.last_gpu_activity: float | None = None
        self.tick_cpu_s = 0.0
        self.ticks = 0

    # -- worker thread --------------------------------------------------------------------------

    def tick(self, exclude_pids: tuple[int, ...] = ()) -> nvml.Poll:
        """One NVML poll (and, every `scan_interval`, one /proc scan)."""
        cpu0 = time.thread_time()
        now = self.clock()
        poll = self.sampler.poll(now, self.interval)
        holders = None
        if self._scanned_at is None or now - self._scanned_at >= self.scan_interval:
            minors = set((poll.minors or {}).values())
            holders = procs.device_holders(
                minors, self.device_pattern, exclude=(os.getpid(), *exclude_pids)
            )
        with self._lock:
            self._poll = poll
            for r in poll.readings:
                self._record(r.uuid, idle.Sample(r.t, r.util, r.mem_util), now)
            if holders is not None:
                self._holders, self._scanned_at = holders, now
        self.tick_cpu_s += time.thread_time() - cpu0
        self.ticks += 1
        return poll

    def _record(self, uuid: str, sample: idle.Sample, now: float) -> None:
        tracker = self._trackers.get(uuid)
        if tracker is None:
            tracker = self._trackers[uuid] = idle.ActivityTracker(self.rule, self.history_s)
        tracker.add(sample, now)

    def record(self, uuid: str, samples: list[idle.Sample], now: float) -> None:
        """Add readings of one GPU taken elsewhere (in time order), as ticks would."""
        with self._lock:
            for sample in samples:
                self._record(uuid, sample, now)

    # -- event loop -----------------------------------------------------------------------------

    def activities(self, now: float) -> dict[str, idle.Activity]:
        with self._lock:
            return {uuid: t.activity(now) for uuid, t in self._trackers.items()}

    def status(
        self,
        now: float,
        kernels: list[dict[str, Any]],
        count_external: bool = True,
    ) -> dict[str, Any]:
        """The GPU part of the status document (see the handler for the whole shape).

        `kernels` are the server's kernel models with their `pid`; processes under a kernel are
        the kernel's, every other process holding one of the GPUs is "external".
        """
        with self._lock:
            poll = self._poll
            holders = {pid: set(m) for pid, m in self._holders.items()}
        activities = self.activities(now)
        kernel_pids = {k["pid"]: k["id"] for k in kernels if k.get("pid")}
        readings = {r.uuid: r for r in (poll.readings if poll else ())}
        devices = list(poll.devices) if poll else []
        minors = (poll.minors or {}) if poll else {}
        by_minor: dict[int, list[str]] = {}
        for uuid, minor in minors.items():
            by_minor.setdefault(minor, []).append(uuid)

        external: dict[int, dict[str, Any]] = {}
        kernel_gpus: dict[str, set[str]] = {}

        def note(pid: int, uuid: str, source: str) -> str | None:
            owner = procs.owner_among(pid, kernel_pids)
            if owner is not None:
                kernel_gpus.setdefault(owner, set()).add(uuid)
                return owner
            entry = external.get(pid)
            if entry is None:
                info = procs.read_process(pid)
                entry = external[pid] = {
                    "pid": pid,
                    "cmdline": info.cmdline if info else "",
                    "gpus": [],
                    "seen_by": [],
                }
            if uuid not in entry["gpus"]:
                entry["gpus"].append(uuid)
            if source not in entry["seen_by"]:
                entry["seen_by"].append(source)
            return None

        for pid, pid_minors in sorted(holders.items()):
            for minor in sorted(pid_minors):
                for uuid in by_minor.get(minor, ()):
                    note(pid, uuid, "device-file")

        gpus = []
        for device in devices:
            reading = readings.get(device.uuid)
            gpus.append(self._gpu_entry(device, reading, activities.get(device.uuid), now, note))
        seen = {d.uuid for d in devices}
        for token in self.wanted or ():
            if not any(_names(token, d) for d in devices) and token not in seen:
                reason = (
                    poll.reason
                    if poll and not poll.available
                    else "this GPU is not visible to NVML"
                )
                gpus.append(_unavailable_entry(token, reason or "NVML is not available"))

        busy_reasons = [
            f"GPU {g['uuid']} is busy ({_pct(g['utilization']['gpu'])} utilisation)"
            for g in gpus
            if g["state"] == idle.BUSY
        ]
        external_list = sorted(external.values(), key=lambda e: e["pid"])
        if count_external:
            busy_reasons += [
                f"process {e['pid']} ({e['cmdline'][:60]}) outside the kernels holds "
                f"{', '.join(e['gpus'])}"
                for e in external_list
            ]
        return {
            "nvml": {
                "available": bool(poll and poll.available),
                "reason": poll.reason if poll else "not sampled yet",
                "driver_version": poll.driver_version if poll else None,
                "simulated": bool(poll and poll.simulated),
                "sample_interval_s": self.interval,
                "sampled_at": iso(poll.t) if poll else None,
            },
            "rule": {
                "util_threshold": self.rule.util_threshold,
                "mem_util_threshold": self.rule.mem_util_threshold,
                "min_busy_s": self.rule.min_busy_s,
                "window_s": self.rule.window_s,
                "max_gap_s": self.rule.max_gap_s,
            },
            "gpus": gpus,
            "external_processes": external_list,
            "kernel_gpus": {k: sorted(v) for k, v in kernel_gpus.items()},
            "busy": bool(busy_reasons),
            "busy_reasons": busy_reasons,
        }

    def _gpu_entry(
        self,
        device: nvml.GpuDevice,
        reading: nvml.Reading | None,
        activity: idle.Activity | None,
        now: float,
        note: Callable[[int, str, str], str | None],
    ) -> dict[str, Any]:
        state = activity.state if activity else idle.UNKNOWN
        reason = ""
        if reading is None:
            reason = "not sampled yet"
        elif reading.source == "unsupported":
            reason = (
                "NVML does not report utilisation for MIG instances"
                if device.is_mig_instance
                else "NVML does not report utilisation for this GPU"
            )
        elif reading.source == "error":
            reason = f"NVML read failed: {reading.error}"
        processes = []
        for p in (reading.processes or ()) if reading else ():
            local = procs.has_device_open(p.pid, self.device_pattern)
            owner = note(p.pid, device.uuid, "nvml") if local else None
            processes.append(
                {"pid": p.pid, "used_memory": p.used_memory, "kernel_id": owner, "local": local}
            )
        idle_since = activity.idle_since if activity else None
        return {
            "uuid": device.uuid,
            "index": device.index,
            "name": device.name,
            "mig": device.is_mig_instance,
            "parent_uuid": device.parent_uuid,
            "simulated": device.simulated,
            "state": state,
            "reason": reason,
            "idle_since": iso(idle_since) if idle_since is not None else None,
            "idle_for_s": round(now - idle_since, 1) if idle_since is not None else None,
            "utilization": {
                "gpu": reading.util if reading else None,
                "memory": reading.mem_util if reading else None,
                "busy_fraction": activity.busy_fraction if activity else None,
                "window_s": self.rule.window_s,
                "source": reading.source if reading else None,
            },
            "memory": {
                "used": reading.memory_used if reading else None,
                "total": (reading.memory_total if reading else None) or device.memory_total,
            },
            "processes": processes,
            "processes_listed": bool(reading and reading.processes is not None),
        }


def _pct(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0f} %"


def _unavailable_entry(uuid: str, reason: str) -> dict[str, Any]:
    return {
        "uuid": uuid,
        "index": None,
        "name": None,
        "mig": uuid.startswith("MIG-"),
        "parent_uuid": None,
        "simulated": False,
        "state": UNAVAILABLE,
        "reason": reason,
        "idle_since": None,
        "idle_for_s": None,
        "utilization": {
            "gpu": None,
            "memory": None,
            "busy_fraction": None,
            "window_s": None,
            "source": None,
        },
        "memory": {"used": None, "total": None},
        "processes": [],
        "processes_listed": False,
    }
