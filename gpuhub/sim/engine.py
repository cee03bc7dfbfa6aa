"""Discrete-event simulation of a GPU pool under one policy.

The pool has `gpus` GPUs of one type. Sessions arrive as in the workload and replay their bursts
one after the other. A session that needs GPUs and has none asks the queue for them; the queue
serves requests in arrival order, and a later request that fits is served while an earlier,
larger one waits (as a scheduler retrying pending pods does). A server that lost its GPUs, or was
stopped, restarts (`restart_delay`) before its next burst runs, holding its GPUs while it does.

Policies:

- `none`: a session's server gets its GPUs at the start and keeps them until the session ends.
- `activity-timeout`: the same, and every `every` seconds servers without activity for `timeout`
  are stopped, as jupyterhub-idle-culler does; kernel state is lost, the next burst restarts the
  server (with its GPUs).
- `gpuhub`: the same start, and every `every` seconds the real `gpuhub.core.decide` runs on
  views built with the real `core.idle.activity` from each GPU's utilisation; its releases and
  stops are applied (kernels are snapshotted, so no state is lost). The next GPU burst brings the
  GPUs back through the queue and a restart.
  `release_policy` chooses when an idle GPU goes back: `flat` (the rules' `gpu_idle_timeout`),
  `learned` (each session's own limit from `gpuhub.core.learned.GapModel`, fed the same views every
  tick, learning online from nothing), or `perfect` (a reference no real policy can run: it knows
  each pause's length, and releases at the pause's start when the pause is longer than
  `perfect_threshold`, else holds; the other rules, demand included, still apply).
- `oracle`: a burst gets exactly the GPUs it uses when it starts and gives them back when it ends,
  with no restart: the physical limit.

Activity, as the hub sees it: a running burst (a kernel executing, GPU or CPU) and the moments a
burst starts and ends. GPU readings: a burst's utilisation from the workload on the GPUs it uses,
memory-controller utilisation `mem_util_ratio` times that; 0 otherwise. The readings are exact step
functions, so the simulation records one at each change and lets a reading hold until the next
(`IdleRule.max_gap_s` = infinity).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..core import decide, idle
from ..core.decide import Demand, ReleaseGpu, Rules, ServerView, StopServer, Waiting, Warn
from ..core.idle import IdleRule, Sample
from ..core.learned import GapModel, LearnedSettings
from .workload import SessionSpec, Workload

NONE = "none"
ACTIVITY_TIMEOUT = "activity-timeout"
GPUHUB = "gpuhub"
ORACLE = "oracle"
POLICIES = (NONE, ACTIVITY_TIMEOUT, GPUHUB, ORACLE)
FLAT = "flat"
LEARNED = "learned"
PERFECT = "perfect"
RELEASE_POLICIES = (FLAT, LEARNED, PERFECT)


class SimulationError(ValueError):
    """A simulation that cannot run as asked; the message names the setting."""


@dataclass(frozen=True)
class SimConfig:
    gpus: int = 64
    restart_delay: float = 30.0
    gpu_type: str = "gpu"
    timeline: bool = False  # record (t, reserved, busy, waiting) for plots


@dataclass(frozen=True)
class PolicySpec:
    """Which policy, with its settings (see the module documentation)."""

    name: str
    activity_timeout: float = 3600.0
    cull_every: float = 600.0  # jupyterhub-idle-culler's check interval (Zero to JupyterHub)
    rules: Rules = field(default_factory=Rules)
    idle_rule: IdleRule = field(default_factory=lambda: IdleRule(max_gap_s=math.inf))
    service_every: float = 60.0  # gpuhub service loop interval
    mem_util_ratio: float = 0.5
    release_policy: str = FLAT  # gpuhub only: flat, learned or perfect
    learned: LearnedSettings = field(default_factory=LearnedSettings)
    perfect_threshold: float = 600.0  # perfect: release at the start of pauses longer than this
    label: str = ""  # the name in reports (default: `name`)

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise SimulationError(f"policy: {self.name!r} is not one of {', '.join(POLICIES)}")
        if self.release_policy not in RELEASE_POLICIES:
            raise SimulationError(
                f"release_policy: {self.release_policy!r} is not one of "
                f"{', '.join(RELEASE_POLICIES)}"
            )
        t = self.perfect_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise SimulationError(f"perfect_threshold: must be a number >= 0, not {t!r}")
        for name in ("activity_timeout", "cull_every", "service_every"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise SimulationError(f"{name}: must be a number > 0, not {value!r}")


@dataclass
class _Session:
    spec: SessionSpec
    index: int = 0  # next burst
    phase: str = "new"  # new, waiting, restarting, gap, burst, tail, ended
    server_up: bool = False
    held: int = 0
    hold_since: float = 0.0
    due: float = 0.0  # when the burst being waited for was due
    carried_wait: float = 0.0  # wait at spawn, charged to the next GPU burst
    last_activity: float = 0.0
    server_started: float = 0.0
    lease_start: float | None = None
    samples: list[list[Sample]] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float = 0.0
    releases: int = 0
    stops: int = 0
    restarts: int = 0
    warnings: int = 0
    state_lost: int = 0
    ran_any: bool = False
    spawned: bool = False  # the first spawn is done


@dataclass(frozen=True)
class _Request:
    session: _Session
    gpus: int
    since: float


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class PolicyResult:
    policy: str
    reserved_gpu_hours: float
    busy_gpu_hours: float
    util_weighted_gpu_hours: float
    waits: list[float]
    sessions: list[_Session]
    gpu_sessions: int
    peak_reserved: int
    actions: dict[str, int]
    timeline: list[tuple[float, int, int, int]]
    span_s: float
    gpus: int

    def metrics(self) -> dict[str, Any]:
        """The documented result fields (see `gpuhub simulate --help`)."""
        waits = sorted(self.waits)
        n = max(1, self.gpu_sessions)
        gpu_sessions = [s for s in self.sessions if s.spec.gpus > 0]
        reserved = self.reserved_gpu_hours
        return {
            "reserved_gpu_hours": round(reserved, 3),
            "busy_gpu_hours": round(self.busy_gpu_hours, 3),
            "idle_reserved_gpu_hours": round(reserved - self.busy_gpu_hours, 3),
            "busy_fraction": round(self.busy_gpu_hours / reserved, 4) if reserved else None,
            "utilization_weighted_busy_fraction": (
                round(self.util_weighted_gpu_hours / reserved, 4) if reserved else None
            ),
            "pool_utilization": (
                round(self.busy_gpu_hours * 3600 / (self.gpus * self.span_s), 4)
                if self.span_s
                else None
            ),
            "wait_s": {
                "mean": round(sum(waits) / len(waits), 1) if waits else 0.0,
                "p50": round(_quantile(waits, 0.5), 1),
                "p95": round(_quantile(waits, 0.95), 1),
                "max": round(waits[-1], 1) if waits else 0.0,
            },
            "bursts_waited_fraction": (
                round(sum(1 for w in waits if w > 0) / len(waits), 4) if waits else 0.0
            ),
            "releases_per_session": round(sum(s.releases for s in gpu_sessions) / n, 3),
            "restarts_per_session": round(sum(s.restarts for s in gpu_sessions) / n, 3),
            "stops_per_session": round(sum(s.stops for s in gpu_sessions) / n, 3),
            "sessions_state_lost": sum(1 for s in self.sessions if s.state_lost),
            "session_delay_hours": round(
                sum((s.ended_at - s.started_at) - s.spec.length for s in self.sessions) / 3600, 3
            ),
            "peak_reserved_gpus": self.peak_reserved,
            "actions": dict(sorted(self.actions.items())),
        }


class _Simulation:
    def __init__(
        self,
        workload: Workload,
        spec: PolicySpec,
        config: SimConfig,
        model: GapModel | None = None,
    ) -> None:
        self.workload = workload
        self.spec = spec
        self.config = config
        self.now = 0.0
        self.free = config.gpus
        self.queue: list[_Request] = []
        self.events: list[tuple[float, int, int, Callable[[], None]]] = []
        self.seq = 0
        self.sessions = [_Session(s) for s in workload.sessions]
        self.active = 0
        self.reserved_s = 0.0
        self.busy_s = 0.0
        self.util_s = 0.0
        self.waits: list[float] = []
        self.reserved_now = 0
        self.busy_now = 0
        self.peak_reserved = 0
        self.actions: dict[str, int] = {}
        self.timeline: list[tuple[float, int, int, int]] = []
        self.pending_starts = 0
        self.model: GapModel | None = None
        self.rules = spec.rules
        if spec.name == GPUHUB and spec.release_policy == LEARNED:
            self.model = model if model is not None else GapModel(spec.learned)
        self.perfect = spec.name == GPUHUB and spec.release_policy == PERFECT
        if self.perfect:
            # Pauses are released at their start or held to their end: no idle timeout.
            self.rules = replace(spec.rules, gpu_idle_timeout=math.inf)

    # --- events -----------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[[], None], priority: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, priority, self.seq, fn))

    def record(self) -> None:
        self.peak_reserved = max(self.peak_reserved, self.reserved_now)
        if not self.config.timeline:
            return
        waiting = sum(r.gpus for r in self.queue)
        point = (self.now, self.reserved_now, self.busy_now, waiting)
        if self.timeline and self.timeline[-1][0] == self.now:
            self.timeline[-1] = point
        else:
            self.timeline.append(point)

    def count(self, label: str) -> None:
        self.actions[label] = self.actions.get(label, 0) + 1

    # --- GPUs -------------------------------------------------------------------------------
    def request(self, s: _Session, gpus: int) -> None:
        s.phase = "waiting"
        self.queue.append(_Request(s, gpus, self.now))
        self.grant()

    def grant(self) -> None:
        granted = []
        for req in list(self.queue):
            if req.gpus <= self.free:
                self.free -= req.gpus
                self.queue.remove(req)
                granted.append(req)
        for req in granted:
            s = req.session
            s.held = req.gpus
            s.hold_since = self.now
            s.lease_start = self.now
            s.samples = [[Sample(self.now, 0.0, 0.0)] for _ in range(req.gpus)]
            self.reserved_now += req.gpus
            self.record()
            self.on_granted(s)
        if not granted:
            self.record()

    def free_gpus(self, s: _Session) -> None:
        if s.held:
            self.reserved_s += s.held * (self.now - s.hold_since)
            self.free += s.held
            self.reserved_now -= s.held
            s.held = 0
            s.samples = []
            s.lease_start = None
            self.grant()

    def set_util(self, s: _Session, utils: tuple[float, ...]) -> None:
        ratio = self.spec.mem_util_ratio
        for i, gpu in enumerate(s.samples):
            u = utils[i] if i < len(utils) else 0.0
            gpu.append(Sample(self.now, u, u * ratio))

    # --- sessions ---------------------------------------------------------------------------
    def start_session(self, s: _Session) -> None:
        s.started_at = self.now
        s.last_activity = self.now
        self.active += 1
        if self.spec.name != ORACLE and s.spec.gpus > 0:
            s.due = self.now
            self.request(s, s.spec.gpus)  # spawned with its GPUs; waits if none are free
        else:
            self.server_up(s)
            self.next_step(s)

    def server_up(self, s: _Session) -> None:
        s.spawned = True
        s.server_up = True
        s.server_started = self.now

    def on_granted(self, s: _Session) -> None:
        if not s.spawned:
            # The first spawn: its wait is charged to the next GPU burst.
            s.carried_wait += self.now - s.due
            self.server_up(s)
            self.next_step(s)
            self.perfect_release(s)
            return
        if self.spec.name == ORACLE:
            self.run_burst(s)
        else:
            self.restart(s)

    def restart(self, s: _Session) -> None:
        s.phase = "restarting"
        s.restarts += 1

        def done() -> None:
            self.server_up(s)
            self.run_burst(s)

        self.at(self.now + self.config.restart_delay, done)

    def next_step(self, s: _Session) -> None:
        bursts = s.spec.bursts
        if s.index < len(bursts):
            s.phase = "gap"
            self.at(self.now + bursts[s.index].gap_before, lambda: self.burst_due(s))
        else:
            s.phase = "tail"
            self.at(self.now + s.spec.tail, lambda: self.end_session(s))

    def burst_due(self, s: _Session) -> None:
        burst = s.spec.bursts[s.index]
        s.due = self.now
        s.last_activity = self.now  # the user runs a cell
        if self.spec.name == ORACLE:
            if burst.gpus > 0:
                self.request(s, burst.gpus)
            else:
                self.run_burst(s)
            return
        if s.server_up and (burst.gpus == 0 or s.held >= burst.gpus):
            self.run_burst(s)
            return
        # A stopped server restarts with its GPUs under a plain culler (the spawn profile has
        # them); gpuhub attaches GPUs only when the burst needs them.
        wants_gpus = burst.gpus > 0 or (self.spec.name != GPUHUB and s.spec.gpus > 0)
        if wants_gpus and s.held == 0:
            self.request(s, s.spec.gpus)
        else:
            self.restart(s)

    def run_burst(self, s: _Session) -> None:
        burst = s.spec.bursts[s.index]
        s.phase = "burst"
        s.ran_any = True
        s.last_activity = self.now
        if burst.gpus > 0:
            self.waits.append(self.now - s.due + s.carried_wait)
            s.carried_wait = 0.0
            self.busy_s += burst.gpus * burst.duration
            mean_util = sum(burst.utilization) / len(burst.utilization)
            self.util_s += burst.gpus * burst.duration * mean_util / 100.0
            self.busy_now += burst.gpus
            self.set_util(s, burst.utilization)
            self.record()
        self.at(self.now + burst.duration, lambda: self.end_burst(s))

    def end_burst(self, s: _Session) -> None:
        burst = s.spec.bursts[s.index]
        s.last_activity = self.now
        if burst.gpus > 0:
            self.busy_now -= burst.gpus
            self.set_util(s, ())
            self.record()
            if self.spec.name == ORACLE:
                s.releases += 1
                self.free_gpus(s)
        s.index += 1
        self.next_step(s)
        if burst.gpus > 0:
            self.perfect_release(s)

    def perfect_release(self, s: _Session) -> None:
        """`perfect`: give the GPUs back now if the pause starting now is long enough."""
        if not self.perfect or not s.held:
            return
        pause = 0.0
        for burst in s.spec.bursts[s.index :]:
            pause += burst.gap_before
            if burst.gpus > 0:
                break
            pause += burst.duration
        else:
            pause = math.inf  # no GPU burst left: the session ends without using them again
        if pause > self.spec.perfect_threshold:
            self.count("ReleaseGpu:perfect")
            self.take_gpus(s)

    def end_session(self, s: _Session) -> None:
        s.phase = "ended"
        s.server_up = False
        s.ended_at = self.now
        self.free_gpus(s)
        self.active -= 1

    # --- policies ---------------------------------------------------------------------------
    def take_gpus(self, s: _Session) -> None:
        if s.held:
            s.releases += 1
            self.free_gpus(s)

    def cull_tick(self) -> None:
        for s in self.sessions:
            if not s.server_up or s.phase in ("burst", "ended", "restarting", "waiting"):
                continue
            if self.now - s.last_activity >= self.spec.activity_timeout:
                s.server_up = False
                s.stops += 1
                if s.ran_any:
                    s.state_lost += 1
                self.count("cull")
                self.take_gpus(s)
        self.schedule_tick(self.cull_tick, self.spec.cull_every)

    def views(self) -> tuple[list[ServerView], dict[str, _Session]]:
        by_id: dict[str, _Session] = {}
        views = []
        rule = self.spec.idle_rule
        for s in self.sessions:
            if not s.server_up or s.phase in ("ended", "restarting"):
                continue
            by_id[s.spec.id] = s
            views.append(
                ServerView(
                    user=s.spec.id,
                    gpus=s.held,
                    gpu_type=self.config.gpu_type if s.held else None,
                    gpu_activity=tuple(idle.activity(g, rule, self.now) for g in s.samples),
                    kernels_executing=s.phase == "burst",
                    last_activity=s.last_activity,
                    started=s.server_started,
                    lease_start=s.lease_start,
                )
            )
        return views, by_id

    def service_tick(self) -> None:
        views, by_id = self.views()
        demand = Demand(
            tuple(
                Waiting(r.session.spec.id, r.since, r.gpus, self.config.gpu_type)
                for r in self.queue
            ),
            {self.config.gpu_type: self.free},
        )
        timeouts = None
        if self.model is not None:
            self.model.observe(views, self.now)
            timeouts = self.model.timeouts(views, self.rules.gpu_idle_timeout)
        for action in decide.decide(views, demand, self.now, self.rules, timeouts):
            s = by_id[action.user]
            self.count(f"{type(action).__name__}:{action.rule}")
            if isinstance(action, Warn):
                s.warnings += 1
                continue
            if s.phase == "burst":
                # Only a maximum lease ends running work; the simulation does not model that.
                self.count("ignored-during-burst")
                continue
            if isinstance(action, ReleaseGpu):
                self.take_gpus(s)
            elif isinstance(action, StopServer):
                s.server_up = False
                s.stops += 1
                if not action.snapshot and s.ran_any:
                    s.state_lost += 1
                self.take_gpus(s)
        # Sessions waiting at spawn may now get GPUs; grant() already ran on each free_gpus().
        self.schedule_tick(self.service_tick, self.spec.service_every)

    def schedule_tick(self, fn: Callable[[], None], every: float) -> None:
        if self.active > 0 or self.pending_starts > 0:
            self.at(self.now + every, fn, priority=1)

    # --- run --------------------------------------------------------------------------------
    def run(self) -> PolicyResult:
        too_big = [s for s in self.workload.sessions if s.gpus > self.config.gpus]
        if too_big:
            need = max(s.gpus for s in too_big)
            raise SimulationError(
                f"gpus: session {too_big[0].id} reserves {need} GPUs but the pool has only "
                f"{self.config.gpus}; use at least {need}"
            )
        self.pending_starts = len(self.sessions)
        for s in self.sessions:

            def start(s: _Session = s) -> None:
                self.pending_starts -= 1
                self.start_session(s)

            self.at(s.spec.start, start)
        first = min((s.spec.start for s in self.sessions), default=0.0)
        if self.spec.name == ACTIVITY_TIMEOUT:
            self.at(first + self.spec.cull_every, self.cull_tick, priority=1)
        elif self.spec.name == GPUHUB:
            self.at(first + self.spec.service_every, self.service_tick, priority=1)
        while self.events:
            t, _prio, _seq, fn = heapq.heappop(self.events)
            self.now = t
            fn()
        if self.queue:  # cannot happen: every request fits the pool
            raise SimulationError("gpus: requests left waiting at the end of the simulation")
        end = max((s.ended_at for s in self.sessions), default=first)
        return PolicyResult(
            policy=self.spec.label or self.spec.name,
            reserved_gpu_hours=self.reserved_s / 3600,
            busy_gpu_hours=self.busy_s / 3600,
            util_weighted_gpu_hours=self.util_s / 3600,
            waits=self.waits,
            sessions=self.sessions,
            gpu_sessions=sum(1 for s in self.sessions if s.spec.gpus > 0),
            peak_reserved=self.peak_reserved,
            actions=self.actions,
            timeline=self.timeline,
            span_s=end - first,
            gpus=self.config.gpus,
        )


def simulate(
    workload: Workload, spec: PolicySpec, config: SimConfig, model: GapModel | None = None
) -> PolicyResult:
    """Run `workload` on a pool of `config.gpus` GPUs under one policy.

    `model`: with the learned release policy, start from this model (what a site has learned
    before) instead of from nothing; it goes on learning during the run.
    """
    if isinstance(config.gpus, bool) or not isinstance(config.gpus, int) or config.gpus < 1:
        raise SimulationError(f"gpus: must be an integer >= 1, not {config.gpus!r}")
    delay = config.restart_delay
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not delay >= 0:
        raise SimulationError(f"restart_delay: must be a number of seconds >= 0, not {delay!r}")
    return _Simulation(workload, spec, config, model).run()
