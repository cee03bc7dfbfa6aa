"""GPU-hours: held and busy GPU-seconds per user, group and GPU type, week by week.

Pure core: plain records in, sums out; no clock (every function takes `now`), no database.

- **Held** seconds come from lease intervals (`LeaseInterval`: one GPU, from the lease to its
  release; still open while the GPU is held). They are derived, never counted up: a week's held
  seconds are the overlap of each interval with the week, so a restart of the hub or the service
  can neither lose nor double-count them, and a lease open across a week boundary is split
  between the two weeks.
- **Busy** and **idle** seconds come only from the trusted activity source (the hub host's NVML,
  dcgm-exporter; never from what a user's server reports), as stretches of state
  (`idle.Segment`). Each interval remembers up to when its activity has been counted
  (`activity_until`); `credit_activity` counts the stretch after it, split by week, and moves it
  on, so the store adds each second at most once, in the same transaction as the mark.
- **Unknown** is the rest: held seconds the trusted source said nothing about (no reading, a MIG
  slice without utilisation, the service not running). It counts as neither busy nor idle.

Weeks are ISO weeks in UTC: from Monday 00:00 UTC to the next Monday 00:00 UTC.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .idle import BUSY, IDLE, Segment
from .quotas import RENEWAL, hours_text  # noqa: F401 (shown with the usage)

WEEK = timedelta(days=7)


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def week_start(t: datetime) -> datetime:
    """Monday 00:00 UTC of the week `t` falls in."""
    t = _utc(t)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def week_of(t: datetime, offset: int = 0) -> tuple[datetime, datetime]:
    """[start, end) of the week of `t`, or of the week `offset` weeks from it (-1: the one
    before)."""
    start = week_start(t) + offset * WEEK
    return start, start + WEEK


def week_from_text(value: str, now: datetime) -> tuple[datetime, datetime]:
    """The week `value` names: "this", "last", or a date (YYYY-MM-DD) in it. `ValueError`
    naming the field `week` otherwise."""
    text = (value or "this").strip().lower()
    if text in ("this", "last"):
        return week_of(now, 0 if text == "this" else -1)
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(
            f"week: {value[:40]!r} is not a week: 'this', 'last' or a date (YYYY-MM-DD)"
        ) from None
    return week_of(day)


def split_by_week(start: datetime, end: datetime) -> list[tuple[datetime, float]]:
    """[start, end) as (week start, seconds in that week), oldest first; [] when empty."""
    start, end = _utc(start), _utc(end)
    out: list[tuple[datetime, float]] = []
    while start < end:
        week = week_start(start)
        stop = min(end, week + WEEK)
        out.append((week, (stop - start).total_seconds()))
        start = stop
    return out


def overlap(a_start: datetime, a_end: datetime, b_start: datetime, b_end: datetime) -> float:
    """Seconds [a_start, a_end) and [b_start, b_end) have in common."""
    lo, hi = max(_utc(a_start), _utc(b_start)), min(_utc(a_end), _utc(b_end))
    return max(0.0, (hi - lo).total_seconds())


@dataclass(frozen=True)
class LeaseInterval:
    """One leased GPU from its lease to its release (`ended_at` None: still held)."""

    id: int
    user: str
    server: str
    group: str
    gpu_type: str
    device: str | None
    started_at: datetime
    ended_at: datetime | None = None
    #: up to when the trusted activity of this GPU has been counted (None: not yet)
    activity_until: datetime | None = None

    def end(self, now: datetime) -> datetime:
        """When the interval ends, as of `now` (an open one runs up to `now`)."""
        return min(_utc(self.ended_at), _utc(now)) if self.ended_at else _utc(now)

    def held_seconds(self, start: datetime, end: datetime, now: datetime) -> float:
        """Seconds of [start, end) this GPU was held, as of `now`."""
        return overlap(self.started_at, self.end(now), start, end)

    @property
    def key(self) -> UsageKey:
        return UsageKey(self.user, self.group, self.gpu_type)


@dataclass(frozen=True, order=True)
class UsageKey:
    user: str
    group: str  # "" when no group's quota applies to the user
    gpu_type: str


@dataclass(frozen=True)
class Usage:
    """One (user, group, GPU type)'s GPU-seconds in one week."""

    user: str
    group: str
    gpu_type: str
    held: float
    busy: float = 0.0
    idle: float = 0.0

    @property
    def unknown(self) -> float:
        """Held seconds the trusted source said nothing about (neither busy nor idle)."""
        return max(0.0, self.held - self.busy - self.idle)

    @property
    def idle_share(self) -> float | None:
        """Idle seconds over held seconds (None when nothing was held)."""
        return self.idle / self.held if self.held > 0 else None


def held_seconds(
    intervals: Iterable[LeaseInterval], start: datetime, end: datetime, now: datetime
) -> float:
    """GPU-seconds the intervals held in [start, end), as of `now`."""
    return sum(i.held_seconds(start, end, now) for i in intervals)


def week_usage(
    intervals: Iterable[LeaseInterval],
    activity: Mapping[UsageKey, tuple[float, float]],
    start: datetime,
    end: datetime,
    now: datetime,
) -> list[Usage]:
    """Each (user, group, GPU type)'s held GPU-seconds in [start, end) from `intervals`, with
    the (busy, idle) seconds counted for it in that week (`activity`); ordered by key."""
    held: dict[UsageKey, float] = {}
    for interval in intervals:
        seconds = interval.held_seconds(start, end, now)
        if seconds > 0:
            held[interval.key] = held.get(interval.key, 0.0) + seconds
    out = []
    for key in sorted(set(held) | set(activity)):
        busy, idle = activity.get(key, (0.0, 0.0))
        hold = held.get(key, 0.0)
        # what was counted busy or idle was held; rounding never makes it more
        busy, idle = min(busy, hold), min(idle, max(0.0, hold - min(busy, hold)))
        out.append(Usage(key.user, key.group, key.gpu_type, hold, busy, idle))
    return out


def hoarders(usage: Iterable[Usage]) -> list[Usage]:
    """The holders ranked by idle GPU-seconds (most first), then held, then name."""
    return sorted(usage, key=lambda u: (-u.idle, -u.held, u.user, u.group, u.gpu_type))


def totals(usage: Iterable[Usage], by_user: bool = False) -> dict[tuple[str, ...], Usage]:
    """The usage summed by (group, GPU type), or by (user, group, GPU type)."""
    out: dict[tuple[str, ...], Usage] = {}
    for u in usage:
        key = (u.user, u.group, u.gpu_type) if by_user else (u.group, u.gpu_type)
        old = out.get(key) or Usage(u.user if by_user else "", u.group, u.gpu_type, 0.0)
        out[key] = Usage(
            old.user, u.group, u.gpu_type, old.held + u.held, old.busy + u.busy, old.idle + u.idle
        )
    return out


# -- busy and idle seconds from the trusted source -----------------------------------------------


@dataclass(frozen=True)
class ActivityCredit:
    """What to add for one interval: (week start, busy seconds, idle seconds) per week touched,
    and the new `activity_until`."""

    interval_id: int
    key: UsageKey
    until: datetime
    weeks: tuple[tuple[datetime, float, float], ...]

    @property
    def busy(self) -> float:
        return sum(b for _w, b, _i in self.weeks)

    @property
    def idle(self) -> float:
        return sum(i for _w, _b, i in self.weeks)


def _ts(t: datetime) -> float:
    return _utc(t).timestamp()


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def credit_activity(
    interval: LeaseInterval, segments: Sequence[Segment], now: datetime
) -> ActivityCredit | None:
    """The busy and idle seconds of `interval`'s GPU since its `activity_until` (or its start)
    up to its end or `now`, from the trusted stretches of state `segments` (unix seconds);
    None when there is nothing new to count. Time the segments do not cover is unknown."""
    begin = _utc(interval.activity_until or interval.started_at)
    begin = max(begin, _utc(interval.started_at))
    stop = interval.end(now)
    if stop <= begin:
        return None
    lo, hi = _ts(begin), _ts(stop)
    weeks: dict[datetime, list[float]] = {}
    for seg in segments:
        if seg.state not in (BUSY, IDLE):
            continue
        s, e = max(seg.start, lo), min(seg.end, hi)
        if e <= s:
            continue
        for week, seconds in split_by_week(_at(s), _at(e)):
            slot = weeks.setdefault(week, [0.0, 0.0])
            slot[0 if seg.state == BUSY else 1] += seconds
    return ActivityCredit(
        interval.id,
        interval.key,
        stop,
        tuple((w, b, i) for w, (b, i) in sorted(weeks.items())),
    )


def device_segments(
    intervals: Sequence[LeaseInterval], by_device: Mapping[str, Sequence[Segment]]
) -> dict[int, Sequence[Segment]]:
    """Which trusted device's stretches belong to which interval of one server: the interval's
    own device where the lease names one (local backend), else the server's readings in device
    order, one device per interval (Kubernetes, where the cluster picks the GPUs of a pod: a
    pod's GPUs are interchangeable for counting). An interval left without a device is unknown."""
    out: dict[int, Sequence[Segment]] = {}
    named = {i.device for i in intervals if i.device}
    spare = [d for d in sorted(by_device) if d not in named]
    for interval in sorted(intervals, key=lambda i: (i.started_at, i.id)):
        if interval.device:
            out[interval.id] = by_device.get(interval.device, ())
        elif spare:
            out[interval.id] = by_device[spare.pop(0)]
        else:
            out[interval.id] = ()
    return out


# -- showing GPU-hours ---------------------------------------------------------------------------


def hours(seconds: float) -> float:
    return seconds / 3600.0


#: Characters that make a spreadsheet read a cell as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_cell(value: object) -> str:
    """A text cell a spreadsheet shows as text: one starting like a formula (=, +, -, @, a tab
    or a line break) gets a leading apostrophe (OWASP's advice on CSV injection). Numbers are
    passed as numbers by the caller, not through here."""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text
