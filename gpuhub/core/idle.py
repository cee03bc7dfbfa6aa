"""From NVML samples to GPU activity: busy, idle since when, or unknown.

Pure core: no NVML, no clock. The Jupyter Server extension feeds the samples it takes, the hub
service reads the result, and the simulator feeds step functions through the same code.

Model. Each `Sample` is one reading of one GPU at time `t`. A reading holds until the next one
(NVML utilisation is itself an average over the last sample period), but never for longer than
`IdleRule.max_gap_s`: past that the GPU's state is unknown, because the sampler stopped or could
not read it. A reading is

- *busy* when the GPU utilisation is above `util_threshold` or the memory-controller utilisation
  is above `mem_util_threshold` (either is enough, even if the other is unknown);
- *idle* when both are known and at or below their thresholds;
- *unknown* otherwise (a MIG instance, where NVML does not report utilisation; a failed read).
  Unknown never counts as idle.

A GPU is idle since the start of the current run of idle readings, where a busy stretch shorter
than `min_busy_s` that has already ended does not break the run (a quick `print(x.sum())` on a
GPU that sat idle for an hour does not mean the user is back to work). A busy stretch that lasts
`min_busy_s` or longer, or any unknown stretch, ends the run. While a busy stretch is still going
on the GPU is reported busy; once it ends short, the earlier idle period resumes as if nothing had
happened.

Defaults, and why:

- `util_threshold = 5.0` %: NVML's GPU utilisation is the share of the sample period in which any
  kernel ran. A GPU whose process only holds a CUDA context reads 0; monitoring (nvidia-smi,
  DCGM), a display, or a notebook that touches a tensor now and then reads a few percent. Work
  sits above: in the Adobe Sensei notebook trace the median burst runs at 11 % and 86 % of the
  per-GPU burst readings are above 5 %. The slow rest (data loading, small models) reads as idle
  here, and is kept by the hub service's other check: a kernel that is executing keeps its GPU.
- `mem_util_threshold = 1.0` %: the memory controller is at 0 when nothing runs; anything that
  reads or writes GPU memory shows up. 1 % absorbs rounding.
- `min_busy_s = 60.0` s: one minute of sustained work ends an idle period; shorter spikes do not.
  This is the same order as Run:ai's 30-second windows and far below the release timeouts
  (30 minutes, 5 under demand), so a user who really resumes is never missed.
- `window_s = 3600.0` s: the busy fraction is reported over the last hour, the period over which
  people usually judge whether a GPU is "used" (and Zero to JupyterHub's default cull timeout).
- `max_gap_s = 60.0` s: samplers read every few seconds; a reading older than a minute means the
  sampler is stalled, and a stalled sampler must not make a GPU look idle.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, MutableSequence, Sequence
from dataclasses import dataclass
from itertools import islice

BUSY = "busy"
IDLE = "idle"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Sample:
    """One NVML reading of one GPU."""

    t: float  # unix seconds
    util: float | None  # GPU utilisation percent; None = unknown (not supported, e.g. MIG)
    mem_util: float | None  # memory-controller utilisation percent; None = unknown


@dataclass(frozen=True)
class IdleRule:
    """When a GPU counts as idle (see the module documentation for the reasoning)."""

    util_threshold: float = 5.0
    mem_util_threshold: float = 1.0
    min_busy_s: float = 60.0  # busy stretches shorter than this do not end an idle period
    window_s: float = 3600.0  # busy_fraction is measured over the last window_s seconds
    max_gap_s: float = 60.0  # a reading holds at most this long; later the state is unknown

    def __post_init__(self) -> None:
        for name in ("util_threshold", "mem_util_threshold", "min_busy_s", "max_gap_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: must be a number >= 0, not {value!r}")
            if math.isnan(value):
                raise ValueError(f"{name}: must be a number >= 0, not NaN")
        w = self.window_s
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0:
            raise ValueError(f"window_s: must be a number > 0, not {w!r}")


@dataclass(frozen=True)
class Activity:
    """What the samples say about one GPU at `now`.

    `state` is "busy", "idle" or "unknown". `busy_fraction` is busy time over known time in the
    last `window_s` (None when nothing is known there). `idle_since` is set only when `state` is
    "idle": the start of the current idle period.
    """

    state: str  # "busy" | "idle" | "unknown"
    busy_fraction: float | None
    idle_since: float | None

    def idle_for(self, now: float) -> float:
        """Seconds the GPU has been idle at `now` (0 unless idle)."""
        if self.state != IDLE or self.idle_since is None:
            return 0.0
        return max(0.0, now - self.idle_since)


def classify(sample: Sample, rule: IdleRule) -> str:
    """ "busy", "idle" or "unknown" for one reading."""
    util, mem = sample.util, sample.mem_util
    if util is not None and math.isnan(util):
        util = None
    if mem is not None and math.isnan(mem):
        mem = None
    if (util is not None and util > rule.util_threshold) or (
        mem is not None and mem > rule.mem_util_threshold
    ):
        return BUSY
    if util is None or mem is None:
        return UNKNOWN
    return IDLE


@dataclass(frozen=True)
class Segment:
    """A stretch of time in one state: [start, end)."""

    start: float
    end: float
    state: str

    @property
    def duration(self) -> float:
        return self.end - self.start


def segments(samples: Sequence[Sample], rule: IdleRule, now: float) -> list[Segment]:
    """The samples up to `now` as a step function of states, adjacent equal states merged.

    Time before the first sample is not covered; a gap longer than `max_gap_s` after a reading
    (including the time up to `now`) becomes an unknown segment.
    """
    ordered = sorted((s for s in samples if s.t <= now), key=lambda s: s.t)
    out: list[Segment] = []
    last = len(ordered) - 1
    for i, sample in enumerate(ordered):
        next_t = ordered[i + 1].t if i < last else now
        held_until = min(next_t, sample.t + rule.max_gap_s)
        # The latest reading decides the current state even when it was taken at `now`.
        _merge(out, sample.t, held_until, classify(sample, rule), keep_empty=i == last)
        if held_until < next_t:
            _merge(out, held_until, next_t, UNKNOWN)
    return out


def idle_since(segs: list[Segment], rule: IdleRule) -> float:
    """Start of the idle period that the last (idle) segment belongs to."""
    return _idle_since(reversed(segs), rule)


def _idle_since(newest_first: Iterator[Segment], rule: IdleRule) -> float:
    """`idle_since` over the segments newest first (the latest one idle): short busy spikes
    between idle stretches do not end the idle period."""
    since = next(newest_first).start
    while True:
        spike = next(newest_first, None)
        before = next(newest_first, None) if spike is not None else None
        if spike is None or before is None:
            return since
        if spike.state == BUSY and spike.duration < rule.min_busy_s and before.state == IDLE:
            since = before.start
        else:
            return since


def _busy_fraction(
    newest_first: Iterable[Segment],
    samples_newest_first: Iterable[Sample],
    rule: IdleRule,
    now: float,
) -> float | None:
    """Busy share of the known time in the last `window_s` (segments and readings newest first,
    none after `now`); with no known stretch yet, the share of busy readings in the window."""
    lo = now - rule.window_s
    busy = known = 0.0
    for seg in newest_first:
        if seg.end <= lo:
            break
        if seg.state == UNKNOWN:
            continue
        length = max(0.0, min(seg.end, now) - max(seg.start, lo))
        known += length
        if seg.state == BUSY:
            busy += length
    if known > 0:
        return busy / known
    # Readings with no duration yet (a single reading taken at `now`): count them.
    known_states = []
    for sample in samples_newest_first:
        if sample.t < lo:
            break
        state = classify(sample, rule)
        if state != UNKNOWN:
            known_states.append(state)
    if not known_states:
        return None
    return sum(1 for s in known_states if s == BUSY) / len(known_states)


def _newest_first(samples: Sequence[Sample], now: float) -> Iterator[Sample]:
    """The readings up to `now`, newest first (sorted only when asked for)."""
    yield from sorted((s for s in samples if s.t <= now), key=lambda s: s.t, reverse=True)


def activity(samples: Sequence[Sample], rule: IdleRule, now: float) -> Activity:
    """Activity of one GPU at `now` from its readings (any order; readings after `now` ignored).

    `idle_since` looks at every reading given, so it can reach further back than `window_s`;
    callers bound it by how many readings they keep.
    """
    segs = segments(samples, rule, now)
    state = segs[-1].state if segs else UNKNOWN
    fraction = _busy_fraction(reversed(segs), _newest_first(samples, now), rule, now)
    if state != IDLE:
        return Activity(state=state, busy_fraction=fraction, idle_since=None)
    return Activity(state=IDLE, busy_fraction=fraction, idle_since=idle_since(segs, rule))


class ActivityTracker:
    """`activity()` of one GPU kept up to date one reading at a time, for a sampler that keeps
    the readings of the last `keep_s` seconds: each reading costs a constant amount of work,
    and asking for the activity costs what the merged stretches in the last `window_s` (and,
    for `idle_since`, the short busy spikes back to the start of the idle period) cost, not the
    number of readings kept. The answers are `activity(readings kept, rule, now)`'s.

    Readings are expected in time order; one older than the latest makes the tracker rebuild
    its stretches from the readings it keeps (a clock that stepped back)."""

    def __init__(self, rule: IdleRule, keep_s: float) -> None:
        self.rule = rule
        self.keep_s = keep_s
        self.samples: deque[Sample] = deque()
        self._closed: deque[Segment] = deque()  # the readings before the latest, merged

    def add(self, sample: Sample, now: float | None = None) -> None:
        """Record a reading; readings older than `now - keep_s` are forgotten (now: the
        reading's time when not given)."""
        last = self.samples[-1] if self.samples else None
        self.samples.append(sample)
        if last is not None and sample.t < last.t:
            self._rebuild()
        elif last is not None:
            self._close(last, sample.t)
        self._prune((sample.t if now is None else now) - self.keep_s)

    def _close(self, sample: Sample, next_t: float) -> None:
        held_until = min(next_t, sample.t + self.rule.max_gap_s)
        _merge(self._closed, sample.t, held_until, classify(sample, self.rule))
        if held_until < next_t:
            _merge(self._closed, held_until, next_t, UNKNOWN)

    def _rebuild(self) -> None:
        ordered = sorted(self.samples, key=lambda s: s.t)
        self.samples = deque(ordered)
        self._closed = deque()
        for i in range(len(ordered) - 1):
            self._close(ordered[i], ordered[i + 1].t)

    def _prune(self, cutoff: float) -> None:
        samples = self.samples
        if not samples or samples[0].t >= cutoff:
            return
        while samples and samples[0].t < cutoff:
            samples.popleft()
        if not samples:
            self._closed.clear()
            return
        first = samples[0].t
        closed = self._closed
        while closed and closed[0].end <= first:
            closed.popleft()
        if closed and closed[0].start < first:
            closed[0] = Segment(first, closed[0].end, closed[0].state)

    def activity(self, now: float) -> Activity:
        samples = self.samples
        if not samples:
            return Activity(state=UNKNOWN, busy_fraction=None, idle_since=None)
        last = samples[-1]
        if now < last.t:  # asked about the past: the general computation
            return activity(list(samples), self.rule, now)
        closed = self._closed
        tail: deque[Segment] = deque([closed[-1]]) if closed else deque()
        held_until = min(now, last.t + self.rule.max_gap_s)
        _merge(tail, last.t, held_until, classify(last, self.rule), keep_empty=True)
        if held_until < now:
            _merge(tail, held_until, now, UNKNOWN)
        state = tail[-1].state if tail else UNKNOWN

        def backwards() -> Iterator[Segment]:
            yield from reversed(tail)
            yield from islice(reversed(closed), 1, None)

        fraction = _busy_fraction(backwards(), reversed(samples), self.rule, now)
        if state != IDLE:
            return Activity(state=state, busy_fraction=fraction, idle_since=None)
        return Activity(
            state=IDLE, busy_fraction=fraction, idle_since=_idle_since(backwards(), self.rule)
        )


def _merge(
    out: MutableSequence[Segment], start: float, end: float, state: str, keep_empty: bool = False
) -> None:
    """`segments`' rule for adding a stretch: merged into the previous one when they touch and
    are in the same state."""
    if out and out[-1].state == state and out[-1].end >= start:
        out[-1] = Segment(out[-1].start, max(out[-1].end, end), state)
    elif end > start or keep_empty:
        out.append(Segment(start, end, state))
