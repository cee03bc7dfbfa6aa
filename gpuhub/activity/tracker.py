"""From trusted GPU readings over time to each server's `idle.Activity`, kept incrementally.

The readings of a GPU are folded into run-length segments as they come (`idle.classify` for
each reading, a gap longer than `max_gap_s` becomes "unknown"), so asking for a server's activity
costs as much as the segments in one `window_s`, not the whole history. The answers are the ones
`idle.activity` gives for the same readings.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..core import idle
from . import GpuSample, ServerKey


@dataclass
class _Device:
    segments: deque[idle.Segment] = field(default_factory=deque)
    last_t: float | None = None
    last_state: str = idle.UNKNOWN
    last_utilization: float | None = None
    last_memory_used: int | None = None


@dataclass(frozen=True)
class DeviceActivity:
    device: str
    activity: idle.Activity
    utilization: float | None
    memory_used: int | None
    read_at: float | None


def _reading(sample: GpuSample) -> idle.Sample:
    """An `idle.Sample`; where the source has no memory-controller reading, GPU utilisation
    alone decides."""
    util = sample.utilization
    mem = sample.memory_utilization
    if mem is None and util is not None:
        mem = 0.0
    return idle.Sample(sample.at, util, mem)


class TrustedActivity:
    """Readings per (server, device), folded into run-length stretches as they come (memory grows
    with changes of state, not with readings), bounded by `history_s` and `max_devices`."""

    def __init__(
        self, rule: idle.IdleRule, history_s: float = 4 * 3600.0, max_devices: int = 50000
    ):
        self.rule = rule
        self.history_s = max(history_s, rule.window_s)
        self.max_devices = max_devices
        self._devices: dict[ServerKey, dict[str, _Device]] = {}
        self._count = 0

    def add(self, key: ServerKey, samples: Iterable[GpuSample]) -> None:
        devices = self._devices.setdefault(key, {})
        for sample in sorted(samples, key=lambda s: s.at):
            state = devices.get(sample.device)
            if state is None:
                if self._count >= self.max_devices:
                    continue
                state = devices[sample.device] = _Device()
                self._count += 1
            self._fold(state, sample)

    def _fold(self, d: _Device, sample: GpuSample) -> None:
        t = sample.at
        if d.last_t is not None and t <= d.last_t:
            return  # out of order or repeated: ignored
        if d.last_t is not None:
            held_until = min(t, d.last_t + self.rule.max_gap_s)
            self._extend(d, d.last_t, held_until, d.last_state)
            if held_until < t:
                self._extend(d, held_until, t, idle.UNKNOWN)
        state = idle.classify(_reading(sample), self.rule)
        d.last_t, d.last_state = t, state
        d.last_utilization, d.last_memory_used = sample.utilization, sample.memory_used
        horizon = t - self.history_s
        while d.segments and d.segments[0].end < horizon:
            d.segments.popleft()

    @staticmethod
    def _extend(d: _Device, start: float, end: float, state: str) -> None:
        if end <= start:
            return
        if d.segments and d.segments[-1].state == state and d.segments[-1].end >= start:
            last = d.segments[-1]
            d.segments[-1] = idle.Segment(last.start, max(last.end, end), state)
        else:
            d.segments.append(idle.Segment(start, end, state))

    def _segments(self, d: _Device, now: float) -> list[idle.Segment]:
        segs = list(d.segments)
        if d.last_t is None or d.last_t > now:
            return segs
        held_until = min(now, d.last_t + self.rule.max_gap_s)
        tail = [idle.Segment(d.last_t, held_until, d.last_state)]
        if held_until < now:
            tail.append(idle.Segment(held_until, now, idle.UNKNOWN))
        for seg in tail:
            if segs and segs[-1].state == seg.state and segs[-1].end >= seg.start:
                segs[-1] = idle.Segment(segs[-1].start, max(segs[-1].end, seg.end), seg.state)
            elif seg.end > seg.start or seg is tail[0]:
                segs.append(seg)
        return segs

    def segments(self, key: ServerKey, now: float) -> dict[str, list[idle.Segment]]:
        """The stretches of state of each device of `key` kept so far (the last reading held up
        to `now`, or up to `max_gap_s` after it, then unknown): what the GPU-hours count."""
        return {name: self._segments(d, now) for name, d in self._devices.get(key, {}).items()}

    def device_activity(self, key: ServerKey, now: float) -> list[DeviceActivity]:
        out = []
        for name, d in sorted(self._devices.get(key, {}).items()):
            out.append(
                DeviceActivity(
                    name,
                    self._activity(d, now),
                    d.last_utilization,
                    d.last_memory_used,
                    d.last_t,
                )
            )
        return out

    def activity(self, key: ServerKey, now: float) -> tuple[idle.Activity, ...]:
        """One `Activity` per device of `key` that has readings (no readings: none)."""
        return tuple(a.activity for a in self.device_activity(key, now))

    def _activity(self, d: _Device, now: float) -> idle.Activity:
        segs = self._segments(d, now)
        if not segs:
            return idle.Activity(idle.UNKNOWN, None, None)
        state = segs[-1].state
        lo = now - self.rule.window_s
        busy = known = 0.0
        for seg in reversed(segs):
            if seg.end <= lo:
                break
            if seg.state == idle.UNKNOWN:
                continue
            length = max(0.0, min(seg.end, now) - max(seg.start, lo))
            known += length
            if seg.state == idle.BUSY:
                busy += length
        if known > 0:
            fraction: float | None = busy / known
        elif d.last_state != idle.UNKNOWN and d.last_t is not None and d.last_t >= lo:
            fraction = 1.0 if d.last_state == idle.BUSY else 0.0
        else:
            fraction = None
        if state != idle.IDLE:
            return idle.Activity(state, fraction, None)
        return idle.Activity(idle.IDLE, fraction, idle.idle_since(segs, self.rule))

    def forget_others(self, keep: Iterable[ServerKey]) -> None:
        keep = set(keep)
        for key in [k for k in self._devices if k not in keep]:
            self._count -= len(self._devices.pop(key))

    def devices(self) -> Mapping[ServerKey, Sequence[str]]:
        return {k: sorted(v) for k, v in self._devices.items()}
