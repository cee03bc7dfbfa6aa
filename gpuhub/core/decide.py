"""Which GPUs to give back and which servers to stop: the release decisions.

Pure core. The hub service (and the simulator) hand in plain views of each server and of the wait
queue; `decide` returns the actions to take, each with a reason a person can read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .idle import Activity

# --- Decisions: which GPUs to give back, which servers to stop ---------------------------------
#
# The hub service turns hub API JSON and each server's `/api/gpuhub/status` into `ServerView`s and
# the wait queue into `Demand`; `decide` returns the `Action`s to take, each with a reason a person
# can read and a `rule` label for metrics and the action history. The simulator calls the same
# function. Adapters execute the actions: an action with `snapshot=True` is taken only after a good
# snapshot of the server's kernels, and not at all if the snapshot fails.

RELEASE = "release"
STOP = "stop"


@dataclass(frozen=True)
class ServerView:
    """What the service knows about one running server at one moment.

    `gpu_activity` has one `idle.Activity` per GPU held (empty while the status is not readable).
    `kernels_executing` and `outside_gpu_processes` mark work in progress: a kernel running a cell,
    or a program outside the kernels (a script in a terminal, VS Code) holding the GPU open.
    `last_activity` is the user's last activity as the hub sees it (None when unknown; `started`
    stands in for it then). `snapshot_failures` counts consecutive failed snapshots, the latest at
    `last_snapshot_failure`. `lease_warned_at` is when the user was warned that the maximum GPU
    lease is running out (None: not warned yet). `kept_until`: the user asked to keep the GPU
    until then (a keep within the service's policy, `gpuhub.service.keeps`): no idle rule takes
    it before; the maximum lease still does.
    """

    user: str
    server: str = ""
    groups: frozenset[str] = frozenset()
    gpus: int = 0
    gpu_type: str | None = None
    gpu_activity: tuple[Activity, ...] = ()
    kernels_executing: bool = False
    outside_gpu_processes: bool = False
    last_activity: float | None = None
    started: float | None = None
    status_readable: bool = True
    lease_start: float | None = None
    lease_warned_at: float | None = None
    snapshot_failures: int = 0
    last_snapshot_failure: float | None = None
    kept_until: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.user, self.server)

    def kept(self, now: float) -> bool:
        return self.kept_until is not None and now < self.kept_until

    @property
    def label(self) -> str:
        return f"{self.user}/{self.server}" if self.server else self.user

    @property
    def work_in_progress(self) -> bool:
        return self.kernels_executing or self.outside_gpu_processes

    def gpu_idle_for(self, now: float) -> float | None:
        """Seconds all of this server's GPUs have been idle, or None if any is not known idle."""
        if not self.status_readable or self.gpus <= 0 or len(self.gpu_activity) < self.gpus:
            return None
        if any(a.state != "idle" or a.idle_since is None for a in self.gpu_activity):
            return None
        return max(0.0, now - max(a.idle_since for a in self.gpu_activity))  # type: ignore[type-var]

    def gpu_busy(self) -> bool:
        return any(a.state == "busy" for a in self.gpu_activity)

    def gpu_unknown(self) -> bool:
        """A held GPU whose activity is not known (unreadable status, MIG, stalled sampler)."""
        if self.gpus <= 0:
            return False
        if not self.status_readable or len(self.gpu_activity) < self.gpus:
            return True
        return any(a.state == "unknown" for a in self.gpu_activity)


@dataclass(frozen=True)
class Waiting:
    """One queued request: `user` has waited since `since` for `gpus` GPUs of `gpu_type`.

    `gpu_type` None: any type will do.
    """

    user: str
    since: float
    gpus: int = 1
    gpu_type: str | None = None


@dataclass(frozen=True)
class Demand:
    """Who waits for a GPU, and how many GPUs of each type are free right now."""

    waiting: tuple[Waiting, ...] = ()
    free_gpus: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Rules:
    """When the service gives GPUs back and stops servers (all durations in seconds).

    - `gpu_idle_timeout`: release a GPU idle this long (30 minutes: a coffee break or a meeting
      keeps the GPU, an abandoned notebook does not hold it for the afternoon).
    - `gpu_idle_timeout_under_demand`: the shorter grace when someone waits for a GPU of that type
      (5 minutes: longer than the gap between most cells, see the notebook trace in the docs).
    - `server_idle_timeout`: stop a server without user activity this long (0 disables; 1 hour
      like Zero to JupyterHub's culler, harmless here since kernels are snapshotted first).
    - `max_gpu_lease`: maximum GPU lease per group (None: unlimited); a user in several groups
      gets the most generous. `max_gpu_lease_default` for users in none of them.
    - `max_gpu_lease_warning`: the user is warned this long before the lease ends, and the lease
      never ends less than this long after the warning. `lease_end_action`: "release" (restart
      without GPU) or "stop".
    - `snapshot_retry`: wait after a failed snapshot before trying again, doubled per further
      failure up to `snapshot_retry_max`.
    - `force_after_snapshot_failures`: after this many consecutive failed snapshots, act without a
      snapshot (kernel state is lost). None (the default): never.
    """

    gpu_idle_timeout: float = 1800.0
    gpu_idle_timeout_under_demand: float = 300.0
    server_idle_timeout: float = 3600.0
    max_gpu_lease: Mapping[str, float | None] = field(default_factory=dict)
    max_gpu_lease_default: float | None = None
    max_gpu_lease_warning: float = 900.0
    lease_end_action: str = RELEASE
    snapshot_retry: float = 60.0
    snapshot_retry_max: float = 3600.0
    force_after_snapshot_failures: int | None = None

    def __post_init__(self) -> None:
        def number(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}: must be a number of seconds >= 0, not {value!r}")

        for name in (
            "gpu_idle_timeout",
            "gpu_idle_timeout_under_demand",
            "server_idle_timeout",
            "max_gpu_lease_warning",
            "snapshot_retry",
            "snapshot_retry_max",
        ):
            number(name, getattr(self, name))
        number("max_gpu_lease_default", self.max_gpu_lease_default, allow_none=True)
        if not isinstance(self.max_gpu_lease, Mapping):
            raise ValueError("max_gpu_lease: must be a mapping of group -> seconds")
        for group, value in self.max_gpu_lease.items():
            number(f"max_gpu_lease.{group}", value, allow_none=True)
        if self.lease_end_action not in (RELEASE, STOP):
            raise ValueError(
                f"lease_end_action: must be {RELEASE!r} or {STOP!r}, not {self.lease_end_action!r}"
            )
        n = self.force_after_snapshot_failures
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"force_after_snapshot_failures: must be an integer >= 1, not {n!r}")

    def max_lease_for(self, groups: Iterable[str]) -> float | None:
        """The maximum GPU lease for a member of `groups` (None: unlimited)."""
        named = [g for g in set(groups) if g in self.max_gpu_lease]
        if not named:
            return self.max_gpu_lease_default
        limits = [self.max_gpu_lease[g] for g in named]
        if any(v is None for v in limits):
            return None
        return max(limits)  # type: ignore[type-var]

    def snapshot_backoff(self, failures: int) -> float:
        """How long to wait after the `failures`-th consecutive failed snapshot."""
        if failures <= 0:
            return 0.0
        return min(self.snapshot_retry * 2 ** (failures - 1), self.snapshot_retry_max)


@dataclass(frozen=True)
class Action:
    """Something to do to one server, with `rule` (a short label) and `reason` (for people)."""

    user: str
    server: str
    rule: str
    reason: str


@dataclass(frozen=True)
class ReleaseGpu(Action):
    """Restart the server with the same interface and environment and no GPU."""

    gpus: int = 0
    gpu_type: str | None = None
    snapshot: bool = True


@dataclass(frozen=True)
class StopServer(Action):
    """Stop the server (its GPUs, if any, go back to the pool)."""

    gpus: int = 0
    gpu_type: str | None = None
    snapshot: bool = True


@dataclass(frozen=True)
class Warn(Action):
    """Tell the user (and the admins) something; change nothing.

    Emitted on every cycle while the condition holds; adapters notify once per server and rule.
    """


class IdleLimit(Protocol):
    """A server's own GPU idle limit (e.g. `gpuhub.core.learned.IdleTimeout`) and why."""

    @property
    def seconds(self) -> float: ...

    @property
    def why(self) -> str: ...


# rule labels
RULE_GPU_IDLE = "gpu-idle"
RULE_GPU_IDLE_LEARNED = "gpu-idle-learned"
RULE_GPU_DEMAND = "gpu-demand"
RULE_SERVER_IDLE = "server-idle"
RULE_MAX_LEASE = "max-lease"
RULE_MAX_LEASE_WARNING = "max-lease-warning"
RULE_WORK_IN_PROGRESS = "work-in-progress"
RULE_SNAPSHOT_RETRY = "snapshot-retry"


def _minutes(seconds: float) -> str:
    """A duration as a user reads it, never rounded up past a limit it is compared with:
    `45 s`, `1 min 30 s` (under 10 min, seconds are kept), `31 min` (whole minutes, rounded
    down), `3.5 h`."""
    whole = int(seconds)
    if whole < 90:
        return f"{whole} s"
    minutes, rest = divmod(whole, 60)
    if minutes < 10 and rest:
        return f"{minutes} min {rest} s"
    if whole < 3 * 3600:
        return f"{minutes} min"
    return f"{seconds / 3600:.1f} h"


def _gpus(n: int, gpu_type: str | None) -> str:
    kind = f"{gpu_type} " if gpu_type else ""
    return f"{n} {kind}GPU" + ("s" if n != 1 else "")


def _protected_reason(view: ServerView) -> str:
    if view.kernels_executing and view.outside_gpu_processes:
        return "a kernel is executing and a program outside the kernels has the GPU open"
    if view.kernels_executing:
        return "a kernel is executing"
    return "a program outside the kernels (a terminal or VS Code) has the GPU open"


def _act(
    kind: str, view: ServerView, rule: str, reason: str, now: float, rules: Rules
) -> Action | None:
    """A release or stop of `view`, gated by its snapshot failures; None while backing off."""
    failures = view.snapshot_failures
    snapshot = True
    if failures > 0:
        forced = rules.force_after_snapshot_failures
        if forced is not None and failures >= forced:
            snapshot = False
            reason += (
                f"; {failures} snapshots failed in a row, acting without one "
                "(the kernels' state is lost)"
            )
        else:
            retry_at = (view.last_snapshot_failure or 0.0) + rules.snapshot_backoff(failures)
            if now < retry_at:
                return Warn(
                    view.user,
                    view.server,
                    RULE_SNAPSHOT_RETRY,
                    f"{reason}, but the last {failures} snapshot(s) failed; "
                    f"trying again in {_minutes(retry_at - now)}",
                )
            reason += f" (snapshot attempt {failures + 1})"
    cls = ReleaseGpu if kind == RELEASE else StopServer
    return cls(view.user, view.server, rule, reason, view.gpus, view.gpu_type, snapshot)


def _user_idle_for(view: ServerView, now: float) -> float | None:
    last = view.last_activity if view.last_activity is not None else view.started
    if last is None:
        return None
    return max(0.0, now - last)


def _lease_actions(view: ServerView, now: float, rules: Rules) -> Action | None:
    if view.gpus <= 0 or view.lease_start is None:
        return None
    limit = rules.max_lease_for(view.groups)
    if limit is None:
        return None
    age = now - view.lease_start
    warning = rules.max_gpu_lease_warning
    if age < limit - warning:
        return None
    if view.lease_warned_at is None:
        ends = max(view.lease_start + limit, now + warning)
        return Warn(
            view.user,
            view.server,
            RULE_MAX_LEASE_WARNING,
            f"the GPU lease reaches its maximum of {_minutes(limit)}; the GPU will be "
            f"{'released' if rules.lease_end_action == RELEASE else 'stopped'} "
            f"in {_minutes(ends - now)}: save your work",
        )
    if age >= limit and now - view.lease_warned_at >= warning:
        return _act(
            rules.lease_end_action,
            view,
            RULE_MAX_LEASE,
            f"GPU held for {_minutes(age)}, the maximum lease is {_minutes(limit)}",
            now,
            rules,
        )
    return None


def _server_decision(
    view: ServerView, now: float, rules: Rules, timeout: IdleLimit | None = None
) -> Action | None:
    """The one action for `view` from its own state (demand is handled afterwards)."""
    if not view.status_readable:
        # Never idle when unreadable; only the lease limit, which does not depend on status.
        return _lease_actions(view, now, rules)

    user_idle = _user_idle_for(view, now)
    gpu_idle = view.gpu_idle_for(now)
    kept = view.kept(now)
    server_idle = (
        not kept
        and rules.server_idle_timeout > 0
        and user_idle is not None
        and user_idle >= rules.server_idle_timeout
        and not view.gpu_busy()
        and not view.gpu_unknown()
    )
    limit = rules.gpu_idle_timeout if timeout is None else timeout.seconds
    gpu_idle_long = view.gpus > 0 and gpu_idle is not None and gpu_idle >= limit and not kept

    if view.work_in_progress:
        lease = _lease_actions(view, now, rules)
        if lease is not None:
            return lease
        if server_idle or gpu_idle_long:
            what = (
                f"no activity for {_minutes(user_idle or 0)}"
                if server_idle
                else f"GPU idle for {_minutes(gpu_idle or 0)}"
            )
            return Warn(
                view.user,
                view.server,
                RULE_WORK_IN_PROGRESS,
                f"{what}, but {_protected_reason(view)}: "
                f"{'the GPU is kept' if view.gpus else 'the server keeps running'}",
            )
        return None

    if server_idle:
        return _act(
            STOP,
            view,
            RULE_SERVER_IDLE,
            f"no user activity for {_minutes(user_idle or 0)} "
            f"(limit {_minutes(rules.server_idle_timeout)})",
            now,
            rules,
        )
    lease = _lease_actions(view, now, rules)
    if lease is not None and not isinstance(lease, Warn):
        return lease
    if gpu_idle_long:
        why = f"limit {_minutes(limit)}" if timeout is None or not timeout.why else timeout.why
        learned = timeout is not None and getattr(timeout, "learned", False)
        return _act(
            RELEASE,
            view,
            RULE_GPU_IDLE_LEARNED if learned else RULE_GPU_IDLE,
            f"{_gpus(view.gpus, view.gpu_type)} idle for {_minutes(gpu_idle or 0)}"
            + (f"; {why}" if learned else f" ({why})"),
            now,
            rules,
        )
    return lease


def _frees_gpus(action: Action | None) -> bool:
    return isinstance(action, (ReleaseGpu, StopServer))


def _reclaim(
    servers: Sequence[ServerView],
    decided: dict[tuple[str, str], Action | None],
    demand: Demand,
    now: float,
    rules: Rules,
) -> None:
    """Release the longest-idle GPUs for waiting users, only as many as they want."""
    if not demand.waiting:
        return
    # GPUs that become free anyway: free now, plus those released or stopped this cycle.
    supply: dict[str | None, int] = {t: max(0, n) for t, n in demand.free_gpus.items()}
    for view in servers:
        if view.gpus > 0 and _frees_gpus(decided.get(view.key)):
            supply[view.gpu_type] = supply.get(view.gpu_type, 0) + view.gpus

    # Candidates: idle past the shorter grace, not protected, no action yet.
    candidates = []
    for view in servers:
        if (
            view.gpus <= 0
            or view.work_in_progress
            or view.kept(now)
            or decided.get(view.key) is not None
        ):
            continue
        idle = view.gpu_idle_for(now)
        if idle is None or idle < rules.gpu_idle_timeout_under_demand:
            continue
        candidates.append((idle, view))
    candidates.sort(key=lambda c: (-c[0], c[1].user, c[1].server))

    # Longest-waiting first; typed requests before "any type" ones.
    queue = sorted(demand.waiting, key=lambda w: (w.gpu_type is None, w.since, w.user))
    for waiting in queue:
        wanted = max(0, waiting.gpus)
        for gpu_type in list(supply) if waiting.gpu_type is None else [waiting.gpu_type]:
            n = min(supply.get(gpu_type, 0), wanted)
            supply[gpu_type] = supply.get(gpu_type, 0) - n
            wanted -= n
        while wanted > 0:
            pick = next(
                (
                    c
                    for c in candidates
                    if waiting.gpu_type is None or c[1].gpu_type == waiting.gpu_type
                ),
                None,
            )
            if pick is None:
                break
            candidates.remove(pick)
            idle, view = pick
            action = _act(
                RELEASE,
                view,
                RULE_GPU_DEMAND,
                f"{_gpus(view.gpus, view.gpu_type)} idle for {_minutes(idle)} while "
                f"{waiting.user} has waited {_minutes(max(0.0, now - waiting.since))} for "
                f"{_gpus(waiting.gpus, waiting.gpu_type)} "
                f"(limit under demand {_minutes(rules.gpu_idle_timeout_under_demand)})",
                now,
                rules,
            )
            decided[view.key] = action
            if _frees_gpus(action):
                # Leftover GPUs of a multi-GPU holder go to the next in line.
                got = view.gpus
                used = min(got, wanted)
                wanted -= used
                if got > used:
                    supply[view.gpu_type] = supply.get(view.gpu_type, 0) + got - used


@dataclass(frozen=True)
class Plan:
    """When a server's GPUs go back if nothing changes (`at`, Unix seconds), by which rule."""

    at: float
    rule: str
    reason: str


def planned_release(
    view: ServerView,
    now: float,
    rules: Rules,
    timeout: IdleLimit | None = None,
    under_demand: bool = False,
) -> Plan | None:
    """The earliest release of `view`'s GPUs the rules foresee now: the maximum lease's end, or,
    while all its GPUs are idle and no work is in progress, the end of the idle limit (the
    shorter one `under_demand`, when someone waits for its GPU type), not before a keep ends.
    None when none is foreseen (busy, unknown, no GPU). What the user is warned of."""
    if view.gpus <= 0:
        return None
    plans: list[Plan] = []
    limit = rules.max_lease_for(view.groups)
    if limit is not None and view.lease_start is not None:
        warned = view.lease_warned_at
        end = view.lease_start + limit
        end = max(end, (warned if warned is not None else now) + rules.max_gpu_lease_warning)
        plans.append(Plan(end, RULE_MAX_LEASE, f"the maximum GPU lease is {_minutes(limit)}"))
    idle_for = view.gpu_idle_for(now)
    if idle_for is not None and not view.work_in_progress:
        seconds = rules.gpu_idle_timeout if timeout is None else timeout.seconds
        rule = RULE_GPU_IDLE
        if under_demand and rules.gpu_idle_timeout_under_demand < seconds:
            seconds, rule = rules.gpu_idle_timeout_under_demand, RULE_GPU_DEMAND
        at = round(now - idle_for + seconds)
        if view.kept_until is not None:
            at = max(at, view.kept_until)
        why = f"an idle GPU goes back after {_minutes(seconds)}" + (
            " while someone waits for one" if rule == RULE_GPU_DEMAND else ""
        )
        plans.append(Plan(at, rule, why))
    return min(plans, key=lambda p: p.at) if plans else None


def decide(
    servers: Sequence[ServerView],
    demand: Demand,
    now: float,
    rules: Rules,
    timeouts: Mapping[tuple[str, str], IdleLimit] | None = None,
) -> list[Action]:
    """The actions to take now, at most one per server, in the order of `servers`.

    - A server without user activity for `server_idle_timeout` is stopped.
    - GPUs all idle for `gpu_idle_timeout` are released, or for the server's own limit in
      `timeouts` (keyed by `ServerView.key`; the learned release policy, `gpuhub.core.learned`),
      whose `why` the reason gives.
    - While users wait, the longest-idle holders of the wanted type are released after
      `gpu_idle_timeout_under_demand`, only as many GPUs as are wanted beyond those free or
      freed anyway.
    - Work in progress (an executing kernel, a program outside the kernels holding the GPU) is
      never released or stopped by these rules: a `Warn` says why instead. Only the maximum GPU
      lease ends it, at least `max_gpu_lease_warning` after a warning.
    - A server whose status cannot be read, or whose GPU activity is unknown, is never idle.
    - After a failed snapshot nothing is done until the backoff has passed (a `Warn` says so);
      only `force_after_snapshot_failures` acts without a snapshot.
    """
    decided: dict[tuple[str, str], Action | None] = {}
    for view in servers:
        if view.key in decided:
            raise ValueError(f"servers: {view.label} listed twice")
        timeout = timeouts.get(view.key) if timeouts else None
        decided[view.key] = _server_decision(view, now, rules, timeout)
    _reclaim(servers, decided, demand, now, rules)
    return [a for view in servers if (a := decided[view.key]) is not None]
