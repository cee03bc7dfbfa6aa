"""policy.decide: which GPUs are released and which servers stopped, and why."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpuhub.core.decide import (
    Demand,
    ReleaseGpu,
    Rules,
    ServerView,
    StopServer,
    Waiting,
    Warn,
    decide,
)
from gpuhub.core.idle import Activity

NOW = 1_000_000.0
RULES = Rules()


def idle(seconds: float) -> Activity:
    return Activity("idle", 0.0, NOW - seconds)


BUSY = Activity("busy", 0.9, None)
UNKNOWN = Activity("unknown", None, None)


def srv(user: str = "ada", *acts: Activity, **kw) -> ServerView:
    """A server holding one A100 per activity given, with recent user activity by default."""
    defaults = dict(
        gpus=len(acts),
        gpu_type="a100" if acts else None,
        gpu_activity=tuple(acts),
        last_activity=NOW - 60,
        started=NOW - 7200,
        lease_start=NOW - 7200 if acts else None,
    )
    defaults.update(kw)
    return ServerView(user, **defaults)


def summary(actions) -> list[tuple[str, str, str]]:
    return [(type(a).__name__, a.user, a.rule) for a in actions]


def want(user: str, gpus: int = 1, gpu_type: str | None = "a100", waited: float = 60):
    return Waiting(user, NOW - waited, gpus, gpu_type)


# (name, servers, demand, rules, expected [(Action type, user, rule)])
CASES = [
    (
        "gpu idle past timeout: release",
        [srv("ada", idle(1800))],
        Demand(),
        RULES,
        [("ReleaseGpu", "ada", "gpu-idle")],
    ),
    ("gpu idle under timeout: keep", [srv("ada", idle(1799))], Demand(), RULES, []),
    ("gpu busy: keep", [srv("ada", BUSY)], Demand(), RULES, []),
    (
        "gpu unknown (MIG): never idle",
        [srv("ada", UNKNOWN, last_activity=NOW - 90000)],
        Demand(),
        RULES,
        [],
    ),
    (
        "no activity reported for a held GPU: not idle",
        [srv("ada", gpus=1, gpu_type="a100", gpu_activity=())],
        Demand(),
        RULES,
        [],
    ),
    ("two GPUs, one busy: keep", [srv("ada", idle(5000), BUSY)], Demand(), RULES, []),
    (
        "two GPUs, both idle: shorter idle time counts",
        [srv("ada", idle(5000), idle(1000)), srv("bob", idle(5000), idle(2000))],
        Demand(),
        RULES,
        [("ReleaseGpu", "bob", "gpu-idle")],
    ),
    (
        "kernel executing: warn, keep",
        [srv("ada", idle(5000), kernels_executing=True)],
        Demand(),
        RULES,
        [("Warn", "ada", "work-in-progress")],
    ),
    (
        "program outside kernels holds GPU: warn, keep",
        [srv("ada", idle(5000), outside_gpu_processes=True)],
        Demand(),
        RULES,
        [("Warn", "ada", "work-in-progress")],
    ),
    (
        "work in progress, nothing idle: no warning",
        [srv("ada", BUSY, kernels_executing=True)],
        Demand(),
        RULES,
        [],
    ),
    (
        "status unreadable: never idle",
        [srv("ada", gpus=1, gpu_type="a100", status_readable=False, last_activity=NOW - 90000)],
        Demand(),
        RULES,
        [],
    ),
    (
        "no user activity: stop (wins over release)",
        [srv("ada", idle(5000), last_activity=NOW - 3600)],
        Demand(),
        RULES,
        [("StopServer", "ada", "server-idle")],
    ),
    (
        "no user activity, server without GPU: stop",
        [srv("ada", last_activity=NOW - 4000)],
        Demand(),
        RULES,
        [("StopServer", "ada", "server-idle")],
    ),
    (
        "no user activity but GPU busy: keep",
        [srv("ada", BUSY, last_activity=NOW - 9000)],
        Demand(),
        RULES,
        [],
    ),
    (
        "no user activity, kernel executing: warn",
        [srv("bob", last_activity=NOW - 9000, kernels_executing=True)],
        Demand(),
        RULES,
        [("Warn", "bob", "work-in-progress")],
    ),
    (
        "server_idle_timeout 0 disables stopping",
        [srv("ada", last_activity=NOW - 1e6)],
        Demand(),
        Rules(server_idle_timeout=0),
        [],
    ),
    (
        "last activity unknown: start time stands in",
        [srv("ada", last_activity=None, started=NOW - 4000)],
        Demand(),
        RULES,
        [("StopServer", "ada", "server-idle")],
    ),
    (
        "last activity and start unknown: keep",
        [srv("ada", last_activity=None, started=None)],
        Demand(),
        RULES,
        [],
    ),
    # demand-aware reclaim
    (
        "demand: longest-idle holder first, only as many as wanted",
        [srv("ada", idle(400)), srv("bob", idle(1200)), srv("cy", idle(700))],
        Demand((want("zoe"),)),
        RULES,
        [("ReleaseGpu", "bob", "gpu-demand")],
    ),
    (
        "demand for two GPUs: two holders",
        [srv("ada", idle(400)), srv("bob", idle(1200)), srv("cy", idle(700))],
        Demand((want("zoe", gpus=2),)),
        RULES,
        [("ReleaseGpu", "bob", "gpu-demand"), ("ReleaseGpu", "cy", "gpu-demand")],
    ),
    (
        "two waiters, one GPU each",
        [srv("ada", idle(400)), srv("bob", idle(1200))],
        Demand((want("zoe"), want("yan", waited=10))),
        RULES,
        [("ReleaseGpu", "ada", "gpu-demand"), ("ReleaseGpu", "bob", "gpu-demand")],
    ),
    (
        "demand: holders inside the short grace keep",
        [srv("ada", idle(299)), srv("bob", idle(100))],
        Demand((want("zoe"),)),
        RULES,
        [],
    ),
    (
        "demand met by a free GPU: no reclaim",
        [srv("ada", idle(1200))],
        Demand((want("zoe"),), {"a100": 1}),
        RULES,
        [],
    ),
    (
        "demand met by a release anyway: no extra reclaim",
        [srv("ada", idle(2000)), srv("bob", idle(1200))],
        Demand((want("zoe"),)),
        RULES,
        [("ReleaseGpu", "ada", "gpu-idle")],
    ),
    (
        "demand for another type: keep",
        [srv("ada", idle(1200))],
        Demand((want("zoe", gpu_type="h100"),)),
        RULES,
        [],
    ),
    (
        "demand for any type",
        [srv("ada", idle(600)), srv("bob", idle(700), gpu_type="h100")],
        Demand((want("zoe", gpu_type=None),)),
        RULES,
        [("ReleaseGpu", "bob", "gpu-demand")],
    ),
    (
        "demand: work in progress is not reclaimed, next idle holder is",
        [
            srv("ada", idle(1700), kernels_executing=True),
            srv("bob", idle(600)),
        ],
        Demand((want("zoe"),)),
        RULES,
        [("ReleaseGpu", "bob", "gpu-demand")],
    ),
    (
        "demand: unreadable status is not reclaimed",
        [srv("ada", gpus=1, gpu_type="a100", status_readable=False)],
        Demand((want("zoe"),)),
        RULES,
        [],
    ),
    (
        "demand: a 2-GPU holder covers two waiters",
        [srv("ada", idle(1000), idle(1000)), srv("bob", idle(900))],
        Demand((want("zoe"), want("yan", waited=5))),
        RULES,
        [("ReleaseGpu", "ada", "gpu-demand")],
    ),
]


@pytest.mark.parametrize(
    ("name", "servers", "demand", "rules", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_decide(name, servers, demand, rules, expected):
    assert summary(decide(servers, demand, NOW, rules)) == expected


def test_actions_carry_gpus_snapshot_and_a_reason():
    (action,) = decide([srv("ada", idle(2400), server="train")], Demand(), NOW, RULES)
    assert action == ReleaseGpu(
        "ada", "train", "gpu-idle", "1 a100 GPU idle for 40 min (limit 30 min)", 1, "a100", True
    )
    (action,) = decide([srv("bob", idle(400))], Demand((want("zoe", waited=240),)), NOW, RULES)
    assert "zoe has waited 4 min" in action.reason and "idle for 6 min 40 s" in action.reason


@pytest.mark.parametrize(
    ("idle_s", "limit_s", "said"),
    [
        (100, 90, "idle for 1 min 40 s (limit 1 min 30 s)"),
        (150, 120, "idle for 2 min 30 s (limit 2 min)"),
        (1919, 1800, "idle for 31 min (limit 30 min)"),
        (60, 45, "idle for 60 s (limit 45 s)"),
    ],
)
def test_durations_are_never_rounded_up_past_their_limit(idle_s, limit_s, said):
    """A release notice must not say "idle for 2 min (limit 2 min)" after 90 s."""
    rules = Rules(gpu_idle_timeout=limit_s)
    (action,) = decide([srv("ada", idle(idle_s))], Demand(), NOW, rules)
    assert action.reason.endswith(said), action.reason


def test_warning_names_the_work_in_progress():
    (w,) = decide(
        [srv("ada", idle(3000), kernels_executing=True, outside_gpu_processes=True)],
        Demand(),
        NOW,
        RULES,
    )
    assert isinstance(w, Warn)
    assert "kernel is executing" in w.reason and "outside the kernels" in w.reason


# maximum GPU lease: (lease age, warned this long ago or None, work in progress, expected)
HOUR = 3600.0
LEASE_RULES = Rules(max_gpu_lease={"students": 8 * HOUR}, max_gpu_lease_warning=900)
LEASE_CASES = [
    (7 * HOUR, None, False, []),
    (8 * HOUR - 900, None, False, [("Warn", "ada", "max-lease-warning")]),
    (8 * HOUR - 300, 600, False, []),  # warned, not at the limit yet
    (8 * HOUR, 300, False, []),  # at the limit but warned too recently
    (9 * HOUR, None, False, [("Warn", "ada", "max-lease-warning")]),  # never ends unwarned
    (8 * HOUR, 900, False, [("ReleaseGpu", "ada", "max-lease")]),
    (8 * HOUR, 900, True, [("ReleaseGpu", "ada", "max-lease")]),  # ends work in progress too
]


@pytest.mark.parametrize(("age", "warned_ago", "busy_kernel", "expected"), LEASE_CASES)
def test_max_gpu_lease(age, warned_ago, busy_kernel, expected):
    view = srv(
        "ada",
        BUSY,
        groups=frozenset({"students"}),
        lease_start=NOW - age,
        lease_warned_at=None if warned_ago is None else NOW - warned_ago,
        kernels_executing=busy_kernel,
    )
    assert summary(decide([view], Demand(), NOW, LEASE_RULES)) == expected


def test_max_lease_can_stop_and_idle_release_wins_before_limit():
    rules = replace(LEASE_RULES, lease_end_action="stop")
    view = srv(
        "ada",
        BUSY,
        groups=frozenset({"students"}),
        lease_start=NOW - 9 * HOUR,
        lease_warned_at=NOW - HOUR,
    )
    (a,) = decide([view], Demand(), NOW, rules)
    assert isinstance(a, StopServer) and a.rule == "max-lease"
    # In the warning window an idle GPU is still released by the idle rule.
    view = srv("ada", idle(2000), groups=frozenset({"students"}), lease_start=NOW - 8 * HOUR + 60)
    assert summary(decide([view], Demand(), NOW, LEASE_RULES)) == [
        ("ReleaseGpu", "ada", "gpu-idle")
    ]


@pytest.mark.parametrize(
    ("groups", "table", "default", "expected"),
    [
        ({"a"}, {"a": 10.0, "b": 20.0}, None, 10.0),
        ({"a", "b"}, {"a": 10.0, "b": 20.0}, 5.0, 20.0),  # most generous group
        ({"a", "c"}, {"a": 10.0, "c": None}, 5.0, None),  # unlimited wins
        ({"x"}, {"a": 10.0}, 5.0, 5.0),  # default for other groups
        (set(), {}, None, None),
    ],
)
def test_max_lease_for(groups, table, default, expected):
    rules = Rules(max_gpu_lease=table, max_gpu_lease_default=default)
    assert rules.max_lease_for(groups) == expected


# snapshot failures: (failures, last failure this long ago, force after, expected)
SNAPSHOT_CASES = [
    (1, 30, None, ("Warn", "snapshot-retry", None)),  # backing off (60 s)
    (1, 60, None, ("ReleaseGpu", "gpu-idle", True)),  # retry with a snapshot
    (3, 200, None, ("Warn", "snapshot-retry", None)),  # 240 s after the third
    (3, 240, None, ("ReleaseGpu", "gpu-idle", True)),
    (20, 3599, None, ("Warn", "snapshot-retry", None)),  # capped at an hour
    (20, 3600, None, ("ReleaseGpu", "gpu-idle", True)),
    (2, 1, 3, ("Warn", "snapshot-retry", None)),
    (3, 1, 3, ("ReleaseGpu", "gpu-idle", False)),  # forced: no snapshot
]


@pytest.mark.parametrize(("failures", "ago", "force", "expected"), SNAPSHOT_CASES)
def test_snapshot_failures_block_until_backoff_or_force(failures, ago, force, expected):
    view = srv("ada", idle(4000), snapshot_failures=failures, last_snapshot_failure=NOW - ago)
    rules = Rules(force_after_snapshot_failures=force)
    (a,) = decide([view], Demand(), NOW, rules)
    kind, rule, snapshot = expected
    assert (type(a).__name__, a.rule) == (kind, rule)
    if snapshot is not None:
        assert a.snapshot is snapshot
    if snapshot is False:
        assert "state is lost" in a.reason


def test_snapshot_backoff_blocks_demand_reclaim_too():
    views = [
        srv("ada", idle(1000), snapshot_failures=1, last_snapshot_failure=NOW - 5),
        srv("bob", idle(600)),
    ]
    got = summary(decide(views, Demand((want("zoe"),)), NOW, RULES))
    assert got == [("Warn", "ada", "snapshot-retry"), ("ReleaseGpu", "bob", "gpu-demand")]


def test_server_listed_twice_is_an_error():
    with pytest.raises(ValueError, match="ada/lab listed twice"):
        decide([srv("ada", server="lab"), srv("ada", server="lab")], Demand(), NOW, RULES)


def test_actions_follow_server_order():
    views = [srv(u, idle(2000)) for u in ("cy", "ada", "bob")]
    assert [a.user for a in decide(views, Demand(), NOW, RULES)] == ["cy", "ada", "bob"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gpu_idle_timeout", -1),
        ("gpu_idle_timeout_under_demand", "5"),
        ("server_idle_timeout", None),
        ("max_gpu_lease_default", -3),
        ("max_gpu_lease", {"students": -1}),
        ("lease_end_action", "kill"),
        ("force_after_snapshot_failures", 0),
        ("snapshot_retry", True),
    ],
)
def test_rules_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        Rules(**{field: value})
