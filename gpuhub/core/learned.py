"""A release policy that learns how long each server's GPU pauses last.

Pure core, next to `policy.decide`: no clock, no I/O. The hub service and the simulator feed it
the same `policy.ServerView`s every cycle (`GapModel.observe`) and hand what it says
(`GapModel.timeouts`) to `policy.decide`, which then releases an idle server's GPUs after that
server's own limit instead of the flat `gpu_idle_timeout`.

The model. A *pause* (an idle gap) starts when all of a server's GPUs turn idle and ends when the
server uses a GPU again: its GPUs read busy, or the server comes back with GPUs after a release
(the new run's idle period starts after the pause's start); its length counts from the user's
latest activity during it (`from_activity`). A pause whose server goes away for
good (stopped, ended) ends *without a return*: releasing its GPUs early would have cost no
restart. Completed pauses are kept per server (`user/server`), per user and for the whole site,
the latest `gaps_per_key` of each (`gaps_site` for the site), so the state stays bounded.

The decision. A server's pauses are taken to follow a mixture of its own history, its user's and
the site's, each history weighing its number of pauses against `prior_weight` pauses of the
next. From idle age `a`, holding the GPUs until a later age `T` and then releasing costs
`gpus * E[min(G, T) - a | G > a]` GPU-hours, each worth `gpu_hour_value` seconds of a user's
wait, plus `restart_cost` times the chance that the pause outlasts `T` and the user comes back.
The server's limit is the first age from `min_idle` on (in steps of `step`) at which releasing now
is no dearer than any later `T`, holding to the end included, and at most `max_idle`. With fewer
than `min_history` site pauses longer than an age the model says nothing from that age on:
without history the flat `gpu_idle_timeout` applies.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .decide import ServerView

SERVER = "server"
USER = "user"
SITE = "site"
SCOPES = (SERVER, USER, SITE)


@dataclass(frozen=True)
class LearnedSettings:
    """Settings of the learned release policy (durations in seconds).

    - `restart_cost`: what a release costs the user when they come back: the restart of the
      server with its GPUs and the restore of the kernels' state (60 s: a restart of about 30 s
      measured by the simulator's default and the restore of a few GB, see docs/performance.md).
    - `gpu_hour_value`: how many seconds of one user's wait one GPU-hour is worth. The higher, the
      sooner idle GPUs go back. The default, 12 s, weighs a restart of 60 s like 5 idle
      GPU-hours: on the Adobe notebook trace it makes as many restarts as the flat 30-minute
      timeout (docs/performance.md), so it trades no restarts for the GPU-hours it gains.
    - `min_idle`: never release GPUs idle less than this, whatever the model says (3 minutes).
    - `max_idle`: never hold idle GPUs longer than this, whatever the model says (2 hours). Where
      the history is too thin to decide, the flat `gpu_idle_timeout` applies instead.
    - `prior_weight`: how many pauses the user's (or site's) estimate weighs in a server's (or
      user's): the larger, the slower a server's own history takes over.
    - `min_history`: site pauses longer than an age needed before the model decides at that age.
    - `gaps_per_key`, `gaps_site`: completed pauses kept per server and per user, and for the
      site (the latest ones).
    - `max_keys`: servers and users with a history, at most (the least recently updated are
      forgotten first).
    - `step`: ages at which the model is asked, from `min_idle` on.
    - `from_activity`: a pause's age counts from the user's latest activity during it (a CPU
      cell run while the GPUs sit idle), not from the GPUs' idle start: a user at work in the
      notebook is more likely to need the GPU again soon than one who left.
    """

    restart_cost: float = 60.0
    gpu_hour_value: float = 12.0
    min_idle: float = 180.0
    max_idle: float = 7200.0
    prior_weight: float = 10.0
    min_history: int = 10
    gaps_per_key: int = 64
    gaps_site: int = 2000
    max_keys: int = 20000
    step: float = 60.0
    from_activity: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "from_activity":
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name}: must be true or false, not {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"{f.name}: must be a number, not {value!r}")
            if f.name in ("min_history", "gaps_per_key", "gaps_site", "max_keys"):
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"{f.name}: must be an integer >= 1, not {value!r}")
            elif f.name in ("gpu_hour_value", "step"):
                if not value > 0 or math.isinf(value):
                    raise ValueError(f"{f.name}: must be a number > 0, not {value!r}")
            elif not value >= 0 or math.isinf(value):
                raise ValueError(f"{f.name}: must be a number >= 0, not {value!r}")


@dataclass(frozen=True)
class IdleTimeout:
    """One server's GPU idle limit and why: `policy.decide` releases its GPUs idle this long."""

    seconds: float
    why: str
    learned: bool = True  # False: the flat timeout (no history yet)


@dataclass(frozen=True)
class Gap:
    """A completed pause: `length` seconds, `returned` False when the server went away first."""

    length: float
    returned: bool = True


class History:
    """The latest pauses of one server, user or the site, with sorted views for quick sums."""

    def __init__(self, limit: int, gaps: Iterable[Gap] = ()) -> None:
        self.gaps: deque[Gap] = deque(gaps, maxlen=limit)
        self._sorted: list[float] | None = None
        self._suffix: list[float] = []
        self._returned: list[int] = []

    def add(self, gap: Gap) -> None:
        self.gaps.append(gap)
        self._sorted = None

    def __len__(self) -> int:
        return len(self.gaps)

    def _prepare(self) -> None:
        ordered = sorted(self.gaps, key=lambda g: g.length)
        self._sorted = [g.length for g in ordered]
        n = len(ordered)
        self._suffix = [0.0] * (n + 1)
        self._returned = [0] * (n + 1)
        for i in range(n - 1, -1, -1):
            self._suffix[i] = self._suffix[i + 1] + ordered[i].length
            self._returned[i] = self._returned[i + 1] + (1 if ordered[i].returned else 0)

    def beyond(self, age: float) -> tuple[int, float, int]:
        """Pauses longer than `age`: how many, their total time past `age`, how many returned."""
        if self._sorted is None:
            self._prepare()
        assert self._sorted is not None
        i = bisect.bisect_right(self._sorted, age)
        n = len(self._sorted) - i
        return n, self._suffix[i] - age * n, self._returned[i]

    def to_json(self) -> list[list[float]]:
        return [[round(g.length, 1), 1 if g.returned else 0] for g in self.gaps]

    @classmethod
    def from_json(cls, data: Any, limit: int) -> History:
        gaps = []
        if isinstance(data, list):
            for item in data:
                if (
                    isinstance(item, list)
                    and len(item) == 2
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in item)
                    and item[0] >= 0
                ):
                    gaps.append(Gap(float(item[0]), bool(item[1])))
        return cls(limit, gaps)


@dataclass
class OpenGap:
    """A pause under way: since `start`, last seen with idle GPUs at `seen`, at all at `present`."""

    start: float
    seen: float
    present: float
    away: bool = False  # seen without its GPUs since (released, or the server is gone)
    active: float = 0.0  # the user's latest activity seen during the pause (0: none)

    def since(self, from_activity: bool) -> float:
        """Where the pause's age counts from: its start, or the user's latest activity."""
        return max(self.start, self.active) if from_activity else self.start


@dataclass(frozen=True)
class _Curve:
    """One history at each age of the grid: pauses longer than it, their time past it, and how
    many of them ended with a return, each divided by the history's number of pauses `n`."""

    n: int
    counts: list[float]
    residual: list[float]
    returned: list[float]


def key_of(scope: str, view_key: tuple[str, str]) -> str:
    user, server = view_key
    if scope == SERVER:
        return f"{user}/{server}"
    if scope == USER:
        return user
    return ""


@dataclass
class GapModel:
    """Per-server, per-user and site pause histories, and the pauses under way."""

    settings: LearnedSettings = field(default_factory=LearnedSettings)
    #: how long a server may be absent from the views before its pause ends without a return
    absent_grace: float = 900.0

    def __post_init__(self) -> None:
        self.histories: dict[tuple[str, str], History] = {}
        self.open: dict[tuple[str, str], OpenGap] = {}
        #: servers whose pause under way began, went away or ended since `take_changed`
        self.open_changed: set[tuple[str, str]] = set()
        #: (scope, key) of histories changed since `take_changed` last ran
        self.changed: set[tuple[str, str]] = set()
        self._cache: dict[tuple[str, str], tuple[tuple[Any, ...], IdleTimeout]] = {}
        self._versions: dict[tuple[str, str], int] = {}
        self._site_epoch = 0
        self._site_epoch_size = 0
        self._curves: dict[tuple[str, str], tuple[tuple[int, float, int], _Curve]] = {}

    # -- histories ---------------------------------------------------------------------------

    def history(self, scope: str, key: str) -> History:
        limit = self.settings.gaps_site if scope == SITE else self.settings.gaps_per_key
        h = self.histories.get((scope, key))
        if h is None:
            h = self.histories[(scope, key)] = History(limit)
        else:
            # most recently used last: the oldest are forgotten first
            self.histories[(scope, key)] = self.histories.pop((scope, key))
        return h

    def load(self, scope: str, key: str, data: Any) -> None:
        """Restore one history saved with `to_json` (e.g. from the store)."""
        if scope not in SCOPES:
            return
        limit = self.settings.gaps_site if scope == SITE else self.settings.gaps_per_key
        self.histories[(scope, key)] = History.from_json(data, limit)
        self._bump(scope, key)
        self._trim()

    def to_json(self, scope: str, key: str) -> list[list[float]]:
        h = self.histories.get((scope, key))
        return h.to_json() if h is not None else []

    def take_changed(self) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        """The histories ((scope, key)) and open pauses (server keys) changed since the last
        call, to save them."""
        out, self.changed = self.changed, set()
        opened, self.open_changed = self.open_changed, set()
        return out, opened

    def open_to_json(self, view_key: tuple[str, str]) -> list[float] | None:
        gap = self.open.get(view_key)
        if gap is None:
            return None
        return [round(gap.start, 1), round(gap.seen, 1), 1 if gap.away else 0]

    def load_open(self, view_key: tuple[str, str], data: Any, now: float) -> None:
        """Restore a pause under way saved with `open_to_json`; it counts as present `now`."""
        if (
            isinstance(data, list)
            and len(data) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
        ):
            start, seen, away = data
            self.open[view_key] = OpenGap(float(start), float(seen), now, bool(away))

    def _bump(self, scope: str, key: str) -> None:
        self._versions[(scope, key)] = self._versions.get((scope, key), 0) + 1
        if scope == SITE:
            self._site_changed()

    def record(self, view_key: tuple[str, str], gap: Gap) -> None:
        """Add a completed pause of the server `view_key` to its, its user's and the site's."""
        for scope in SCOPES:
            key = key_of(scope, view_key)
            self.history(scope, key).add(gap)
            self._bump(scope, key)
            self.changed.add((scope, key))
        self._trim()

    def _trim(self) -> None:
        excess = len(self.histories) - self.settings.max_keys - 1  # the site's does not count
        if excess <= 0:
            return
        for scope_key in list(self.histories):
            if excess <= 0:
                break
            if scope_key[0] == SITE:
                continue
            del self.histories[scope_key]
            self._versions.pop(scope_key, None)
            excess -= 1

    # -- observing ---------------------------------------------------------------------------

    def observe(self, views: Sequence[ServerView], now: float) -> None:
        """Follow the pauses of the servers in this cycle's views."""
        present = set()
        for view in views:
            present.add(view.key)
            gap = self.open.get(view.key)
            if gap is not None:
                gap.present = now
            if view.gpus <= 0 or not view.status_readable:
                if gap is not None and not gap.away and view.gpus <= 0:
                    gap.away = True
                    self.open_changed.add(view.key)
                continue
            idle_for = view.gpu_idle_for(now)
            if idle_for is not None:
                start = now - idle_for
                if gap is None:
                    self.open[view.key] = OpenGap(start, now, now)
                    self.open_changed.add(view.key)
                elif start > gap.start + 1.0:
                    # A new idle period: the pause ended when the GPUs were used again (or when
                    # the server came back with its GPUs).
                    since = gap.since(self.settings.from_activity)
                    self.record(view.key, Gap(max(0.0, start - since)))
                    self.open[view.key] = OpenGap(start, now, now)
                    self.open_changed.add(view.key)
                else:
                    gap.seen = now
                    if view.kernels_executing:
                        gap.active = now
                    elif view.last_activity is not None and view.last_activity <= now:
                        gap.active = max(gap.active, view.last_activity)
            elif view.gpu_busy() and gap is not None:
                end = now
                if gap.away and view.started is not None and view.started > gap.seen:
                    end = view.started
                since = gap.since(self.settings.from_activity)
                self.record(view.key, Gap(max(0.0, end - since)))
                del self.open[view.key]
                self.open_changed.add(view.key)
        for key, gap in list(self.open.items()):
            if key not in present and now - gap.present > self.absent_grace:
                # The server went away: the pause ended without the user coming back.
                since = gap.since(self.settings.from_activity)
                self.record(key, Gap(max(0.0, gap.present - since), returned=False))
                del self.open[key]
                self.open_changed.add(key)
        if len(self.open) > self.settings.max_keys:
            for key in sorted(self.open, key=lambda k: self.open[k].present)[
                : len(self.open) - self.settings.max_keys
            ]:
                del self.open[key]
                self.open_changed.add(key)

    # -- deciding ----------------------------------------------------------------------------

    def grid(self, flat: float) -> list[float]:
        """The ages at which the model is asked: `min_idle`, then every `step` to the ceiling."""
        s = self.settings
        ceiling = max(flat, s.max_idle)
        ages, age = [], min(s.min_idle, flat)
        while age <= ceiling:
            ages.append(age)
            age += s.step
        return ages

    def _curve(self, scope: str, key: str, ages: Sequence[float]) -> _Curve | None:
        """One history's pauses beyond each age, as shares of its pauses (cached per version)."""
        h = self.histories.get((scope, key))
        if h is None or not len(h):
            return None
        version = self._site_epoch if scope == SITE else self._versions.get((scope, key), 0)
        cache_key = (scope, key)
        cached = self._curves.get(cache_key)
        if cached is not None and cached[0] == (version, ages[0], len(ages)):
            return cached[1]
        n = len(h)
        counts, residual, returned = [], [], []
        for age in ages:
            c, t, r = h.beyond(age)
            counts.append(c / n)
            residual.append(t / n)
            returned.append(r / n)
        curve = _Curve(n, counts, residual, returned)
        if len(self._curves) > 4 * self.settings.max_keys:
            self._curves.clear()
        self._curves[cache_key] = ((version, ages[0], len(ages)), curve)
        return curve

    def _site_changed(self) -> None:
        site = self.histories.get((SITE, ""))
        size = len(site) if site is not None else 0
        # The site's curve is recomputed when it has grown by 2 % (at least 5 pauses).
        if abs(size - self._site_epoch_size) >= max(5, self._site_epoch_size // 50):
            self._site_epoch += 1
            self._site_epoch_size = size

    def release_after(self, view: ServerView, flat: float) -> IdleTimeout:
        """`view`'s GPU idle limit: the first age where holding costs more than any later release.

        With the pauses' distribution (a mixture of the server's, the user's and the site's
        histories), holding the GPUs from age `a` until `T` (then releasing) costs
        `gpus * value * E[min(G, T) - a | G > a] + restart_cost * P(G > T and a return | G > a)`.
        The GPUs go back at the first age where releasing now is no dearer than any later `T`,
        holding to the end included.
        """
        s = self.settings
        if view.gpus <= 0:
            return IdleTimeout(flat, "", learned=False)
        user_key, server_key = key_of(USER, view.key), key_of(SERVER, view.key)
        versions = (
            self._versions.get((SERVER, server_key), 0),
            self._versions.get((USER, user_key), 0),
            self._site_epoch,
            view.gpus,
            flat,
        )
        cached = self._cache.get(view.key)
        if cached is not None and cached[0] == versions:
            return cached[1]
        result = self._limit(view, flat, server_key, user_key)
        if len(self._cache) > 2 * s.max_keys:
            self._cache.clear()
        self._cache[view.key] = (versions, result)
        return result

    def _limit(self, view: ServerView, flat: float, server_key: str, user_key: str) -> IdleTimeout:
        s = self.settings
        ages = self.grid(flat)
        site = self._curve(SITE, "", ages)
        if site is None or not ages:
            return IdleTimeout(flat, f"limit {_minutes(flat)}; no pauses learned yet", False)
        site_h = self.histories[(SITE, "")]
        # Mixture weights: each history weighs its pauses against `prior_weight` of the next.
        k = s.prior_weight
        parts: list[tuple[float, _Curve]] = [(1.0, site)]
        for scope, key in ((USER, user_key), (SERVER, server_key)):
            curve = self._curve(scope, key, ages)
            if curve is None:
                continue
            w = curve.n / (curve.n + k)
            parts = [(weight * (1 - w), c) for weight, c in parts] + [(w, curve)]
        value = view.gpus * s.gpu_hour_value / 3600.0
        # f(T): what holding past T saves over releasing at T, unnormalised (see above); the
        # GPUs go back at the first age a where f(a) >= f(T) for every later T, and f(a) >= 0.
        f = []
        for i in range(len(ages)):
            residual = sum(w * c.residual[i] for w, c in parts)
            returned = sum(w * c.returned[i] for w, c in parts)
            f.append(value * residual - s.restart_cost * returned)
        thin = next(
            (i for i, age in enumerate(ages) if site_h.beyond(age)[0] < s.min_history), len(ages)
        )
        later = [0.0] * (thin + 1)  # the best of f after each age; holding to the end: 0
        for i in range(thin - 1, -1, -1):
            later[i] = max(later[i + 1], f[i + 1] if i + 1 < thin else 0.0)
        for i in range(thin):
            if f[i] >= later[i]:
                age = ages[i]
                return IdleTimeout(age, self._explain(view.key, age), True)
        if thin < len(ages) and ages[thin] > flat:
            age = ages[thin]
            return IdleTimeout(age, f"too few pauses longer than {_minutes(age)} to hold longer")
        if thin == len(ages):
            longest = _minutes(ages[-1])
            return IdleTimeout(ages[-1], f"the longest the learned policy holds is {longest}")
        return IdleTimeout(flat, f"limit {_minutes(flat)}; too few pauses this long learned", False)

    def _explain(self, view_key: tuple[str, str], age: float) -> str:
        for scope in (SERVER, USER, SITE):
            h = self.histories.get((scope, key_of(scope, view_key)))
            if h is None:
                continue
            n, total, returned = h.beyond(age)
            if n >= min(self.settings.prior_weight, 3) or scope == SITE:
                if n == 0:
                    return f"no pause longer than {_minutes(age)} seen (learned limit)"
                text = (
                    f"{WHOSE[scope]} pauses longer than {_minutes(age)} lasted "
                    f"{_minutes(age + total / n)} on average"
                )
                if returned < n:
                    text += f" ({n - returned} of {n} ended with the server gone)"
                return text
        return "learned limit"

    def timeouts(
        self, views: Sequence[ServerView], flat: float
    ) -> dict[tuple[str, str], IdleTimeout]:
        """The learned limits of the views that hold GPUs (for `policy.decide`).

        With `from_activity`, a pause's age counts from the user's latest activity during it, so
        the limit is moved by the time from the GPUs' idle start to that activity.
        """
        out = {}
        for v in views:
            if v.gpus <= 0:
                continue
            limit = self.release_after(v, flat)
            gap = self.open.get(v.key)
            if limit.learned and gap is not None and self.settings.from_activity:
                shift = gap.since(True) - gap.start
                if shift > 0:
                    why = f"{limit.why} (counted from the last activity, {_minutes(shift)} later)"
                    limit = IdleTimeout(limit.seconds + shift, why, True)
            out[v.key] = limit
        return out

    def summary(self) -> Mapping[str, int]:
        counts = {scope: 0 for scope in SCOPES}
        for scope, _key in self.histories:
            counts[scope] += 1
        return {**counts, "open": len(self.open)}


WHOSE = {SERVER: "this server's", USER: "your", SITE: "this site's"}


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
