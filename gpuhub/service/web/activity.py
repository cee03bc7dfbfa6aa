"""GPU utilisation readings of the last hour, per GPU, for the pages' sparklines.

Every status document the service reads (its own loop's and the pages') passes through
`ActivityLog.record`; the log keeps one reading per GPU and `resolution` seconds for `window`
seconds, in memory. A service restart starts the figures afresh: they are for the eye, the
decisions use the servers' own sampling.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any


class ActivityLog:
    def __init__(self, window: float = 3600.0, resolution: float = 60.0) -> None:
        self.window = window
        self.resolution = max(1.0, resolution)
        self._readings: dict[str, deque[tuple[float, float | None]]] = {}
        #: (user, server) -> (when, the latest status document read)
        self._latest: dict[tuple[str, str], tuple[float, Mapping[str, Any]]] = {}
        self._lock = threading.Lock()

    def remember(
        self, user: str, server: str, status: Mapping[str, Any], t: float | None = None
    ) -> None:
        """Keep a server's latest status (and record its GPUs' utilisation)."""
        t = time.time() if t is None else t
        self.record(status, t)
        with self._lock:
            self._latest[(user, server)] = (t, status)

    def latest(
        self, user: str, server: str, max_age: float, now: float | None = None
    ) -> Mapping[str, Any] | None:
        """The server's status read at most `max_age` seconds ago, if any."""
        now = time.time() if now is None else now
        with self._lock:
            entry = self._latest.get((user, server))
        if entry is None or now - entry[0] > max_age:
            return None
        return entry[1]

    def forget_others(self, keep: set[tuple[str, str]]) -> None:
        with self._lock:
            for key in [k for k in self._latest if k not in keep]:
                del self._latest[key]

    def add(self, uuid: str, t: float, utilization: float | None) -> None:
        with self._lock:
            readings = self._readings.setdefault(uuid, deque())
            if readings and t - readings[-1][0] < self.resolution:
                # keep one reading per `resolution`: the busier one (a burst is worth showing)
                last_t, last_v = readings[-1]
                if utilization is not None and (last_v is None or utilization > last_v):
                    readings[-1] = (last_t, utilization)
            else:
                readings.append((t, utilization))
            while readings and readings[0][0] < t - self.window:
                readings.popleft()

    def record(self, status: Mapping[str, Any], t: float | None = None) -> None:
        """Note the utilisation of every GPU in a server's status document."""
        t = time.time() if t is None else t
        for gpu in status.get("gpus") or ():
            if not isinstance(gpu, Mapping) or not isinstance(gpu.get("uuid"), str):
                continue
            util = gpu.get("utilization")
            value = util.get("gpu") if isinstance(util, Mapping) else None
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            self.add(gpu["uuid"], t, float(value) if ok else None)

    def series(self, uuid: str, now: float | None = None, buckets: int = 30) -> list[float | None]:
        """The last `window` seconds in `buckets` slots, oldest first: the highest reading of
        each slot, None where there was none."""
        now = time.time() if now is None else now
        out: list[float | None] = [None] * buckets
        span = self.window / buckets
        with self._lock:
            readings = list(self._readings.get(uuid, ()))
        for t, v in readings:
            age = now - t
            if age < 0 or age >= self.window or v is None:
                continue
            slot = buckets - 1 - int(age // span)
            current = out[slot]
            out[slot] = v if current is None else max(current, v)
        return out
