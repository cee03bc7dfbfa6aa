"""The service's pure parts: hub models, reports and trusted readings to policy views, snapshot
results, notices,
the action history's counts, demand and pool, scopes."""

from __future__ import annotations

import pytest

from gpuhub.core.decide import RULE_MAX_LEASE_WARNING, Demand, Rules, Waiting, decide
from gpuhub.core.idle import BUSY, IDLE, UNKNOWN, Activity
from gpuhub.core.protocol import parse_snapshot_result, parse_status
from gpuhub.service import notices, scopes
from gpuhub.service.actions import (
    Ledger,
    SnapshotAborted,
    SnapshotFailed,
    check_snapshot,
)
from gpuhub.service.demand import Pool, Queued, demand_from, queue_by_type
from gpuhub.service.servers import parse_time, running_servers, view_from
from gpuhub.store import Store

T0 = "2026-01-01T10:00:00.000000Z"
T0_S = parse_time(T0)


def server_model(**kw):
    return {
        "name": "",
        "ready": True,
        "pending": None,
        "url": "/user/ada/",
        "started": T0,
        "last_activity": "2026-01-01T10:05:00Z",
        "user_options": {
            "interface": "jupyterlab",
            "environment": "pytorch",
            "gpus": 1,
            "gpu_type": "gpu",
        },
        **kw,
    }


def status(kernels=(), external=()):
    return parse_status(
        {
            "version": 1,
            "gpus": [{"uuid": "GPU-1", "state": "idle", "idle_since": T0}],
            "kernels": list(kernels),
            "external_processes": list(external),
        }
    )


def idle_since(t):
    return Activity(IDLE, 0.0, t)


def one(model=None, groups=("staff",)):
    users = [{"name": "ada", "groups": list(groups), "servers": {"": model or server_model()}}]
    [server] = running_servers(users)
    return server


def test_running_servers_skips_pending_and_not_ready():
    users = [
        {
            "name": "ada",
            "groups": [],
            "servers": {
                "": server_model(),
                "pending": server_model(ready=False, pending="spawn"),
                "stopping": server_model(ready=True, pending="stop"),
            },
        },
        {"name": "bob", "groups": [], "servers": {}},
        {"name": 7, "servers": {"": server_model()}},
    ]
    assert [s.key for s in running_servers(users)] == [("ada", "")]


def test_view_from_takes_gpu_activity_from_the_trusted_source():
    # the server's own document says idle since T0; the trusted reading decides
    view = view_from(one(), status(), (idle_since(T0_S + 60),))
    assert view.status_readable and view.gpus == 1 and view.gpu_type == "gpu"
    assert view.groups == frozenset({"staff"})
    assert view.gpu_idle_for(T0_S + 600) == pytest.approx(540)
    assert view.started == T0_S and view.lease_start == T0_S
    assert view.last_activity == T0_S + 300
    assert not view.work_in_progress
    busy = view_from(one(), status(), (Activity(BUSY, 1.0, None),))
    assert busy.gpu_busy() and busy.gpu_idle_for(T0_S + 600) is None
    # no trusted reading: unknown, never idle, whatever the server says
    unknown = view_from(one(), status(), ())
    assert unknown.gpu_unknown() and unknown.gpu_idle_for(T0_S + 10**6) is None
    assert view_from(one(), status(), (Activity(UNKNOWN, None, None),)).gpu_unknown()


def test_view_from_work_in_progress_is_the_servers_word():
    executing = view_from(
        one(), status(kernels=[{"id": "k", "execution_state": "busy"}]), (idle_since(T0_S),)
    )
    assert executing.kernels_executing and executing.work_in_progress
    outside = view_from(one(), status(external=[{"pid": 5}]), (idle_since(T0_S),))
    assert outside.outside_gpu_processes
    # fewer trusted readings than GPUs held: unknown
    two = one(server_model(user_options={"gpus": 2, "gpu_type": "gpu"}))
    assert view_from(two, status(), (idle_since(T0_S),)).gpu_unknown()


def test_a_server_without_a_report_is_never_idle_and_only_the_lease_ends():
    view = view_from(one(), None, (idle_since(T0_S),), lease_start=T0_S)
    assert not view.status_readable and view.gpu_idle_for(T0_S + 10**6) is None
    rules = Rules(gpu_idle_timeout=1, server_idle_timeout=1)
    assert decide([view], Demand(), T0_S + 10**6, rules) == []
    leased = Rules(gpu_idle_timeout=1, max_gpu_lease_default=3600, max_gpu_lease_warning=60)
    [warn] = decide([view], Demand(), T0_S + 3600, leased)
    assert warn.rule == RULE_MAX_LEASE_WARNING


def test_cpu_only_server_has_no_gpu():
    server = one(server_model(user_options={"gpus": 0, "gpu_type": "gpu"}))
    assert server.gpus == 0 and server.gpu_type is None
    bogus = one(server_model(user_options={"gpus": True}))
    assert bogus.gpus == 0


def snap(ok, *entries):
    return parse_snapshot_result({"ok": ok, "snapshots": list(entries)})


def test_check_snapshot():
    saved = {"kernel_id": "k", "status": "saved", "snapshot": "s", "saved": 2}
    assert check_snapshot(snap(True, saved)) == [
        {"kernel_id": "k", "status": "saved", "snapshot": "s", "saved": 2}
    ]
    assert check_snapshot(snap(True)) == []
    unsupported = {"kernel_id": "r", "status": "unsupported", "error": "not a Python kernel"}
    assert check_snapshot(snap(True, saved, unsupported))[1]["error"]
    with pytest.raises(SnapshotFailed, match="disk full"):
        check_snapshot(
            snap(False, saved, {"kernel_id": "x", "status": "failed", "error": "disk full"})
        )
    busy = {"kernel_id": "x", "status": "busy"}
    with pytest.raises(SnapshotAborted):
        check_snapshot(snap(False, busy))
    # a forced action (maximum lease, an admin) leaves a running kernel out and goes ahead
    assert check_snapshot(snap(False, saved, busy), busy_ok=True)[1]["status"] == "busy"
    with pytest.raises(SnapshotFailed):
        check_snapshot(snap(False, saved))


def test_notices_say_what_why_and_how_back():
    snaps = [
        {
            "kernel_id": "k",
            "notebook": "work/train.ipynb",
            "status": "saved",
            "snapshot": "20260101T100000.000000Z",
            "saved": 3,
            "skipped": 1,
        }
    ]
    text = notices.render(
        "release",
        "1 GPU idle for 31 min (limit 30 min)",
        at=T0_S,
        gpus=1,
        snapshots=snaps,
        hub_url="https://hub.example.org",
    )
    assert text.startswith("# Your GPU was given back to the pool")
    assert "idle for 31 min" in text and "work/train.ipynb" in text
    assert "20260101T100000.000000Z" in text and "3 variables, 1 skipped" in text
    assert "https://hub.example.org/hub/home" in text and "2026-01-01 10:00 UTC" in text
    stop = notices.render("stop", "no user activity for 2.0 h", at=T0_S, snapshots=[])
    assert "stopped this server" in stop and "No kernel was running" in stop
    warn = notices.render("warn", "the GPU lease reaches its maximum", at=T0_S)
    assert "The GPU lease reaches its maximum." in warn and "Nothing was changed" in warn
    back = notices.render(
        "give-back", "ada asked for the GPU back", at=T0_S, gpus=1, snapshots=snaps
    )
    assert back.startswith("# Your server has its GPU again")
    assert "restarted this server with its GPU: ada asked" in back and "without" not in back


def test_ledger_counts_consecutive_snapshot_failures_per_run(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    ledger = Ledger(store)
    run = ("ada", "", T0)

    def add(status, kind="release", rule="gpu-idle", started=T0):
        store.record_action(
            "ada", "", kind, rule, "why", actor="t", status=status, server_started=started
        )

    add("snapshot-failed")
    add("done", started="an earlier run")
    add("aborted")
    add("snapshot-failed")
    add("done", kind="warn", rule=RULE_MAX_LEASE_WARNING)
    ledger.refresh()
    count, last = ledger.snapshot_failures(run)
    assert count == 2 and last is not None
    assert ledger.warned_at(run, RULE_MAX_LEASE_WARNING) is not None
    assert ledger.warned_at(("ada", "", "an earlier run"), RULE_MAX_LEASE_WARNING) is None
    add("snapshotted")
    ledger.refresh()
    assert ledger.snapshot_failures(run) == (0, None)
    assert ledger.open_for(run, "release").status == "snapshotted"
    ledger.prune([])
    assert [r.status for r in ledger.open_rows()] == ["snapshotted"]
    assert ledger.for_run(("ada", "", "an earlier run")) == []


def test_pool_demand_and_queue():
    pool = Pool(total={"gpu": 4, "mig": None}, allocated={"gpu": 3, "mig": 2})
    assert pool.free() == {"gpu": 1}
    assert pool.types == ["gpu", "mig"]
    queued = [Queued("ada", "", "gpu", 1, 100.0), Queued("bob", "big", "gpu", 2, 150.0)]
    demand = demand_from(queued, pool)
    assert demand.waiting == (
        Waiting("ada", 100.0, 1, "gpu"),
        Waiting("bob/big", 150.0, 2, "gpu"),
    )
    assert demand.free_gpus == {"gpu": 1}
    assert queue_by_type(queued, 200.0) == {"gpu": (2, 100.0)}


def test_scopes_by_jupyterhub_version():
    six = scopes.scopes("6.1.0")
    assert "start:servers" in six and "delete:servers" in six and "servers" not in six
    five = scopes.scopes("5.3.0")
    assert "servers" in five and "start:servers" not in five
    assert "admin:server_state" not in six and "admin:users" not in six
    # the service never reaches a user's server: servers report to it
    assert not any(s.startswith("access:servers") for s in six + five)
    assert "access:services!service=gpuhub" in scopes.server_token_scopes("gpuhub")
    role = scopes.service_role("gpuhub", "6.1.0")
    assert role["services"] == ["gpuhub"] and role["scopes"] == six


def test_interrupted_actions_are_taken_up_or_closed(tmp_path):
    from gpuhub.core.decide import ReleaseGpu, StopServer
    from gpuhub.service.actions import ActionSettings, Executor
    from gpuhub.service.hubapi import HubClient
    from gpuhub.service.metrics import Metrics
    from gpuhub.service.reports import ReportBoard

    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    client = HubClient("http://127.0.0.1:9/hub/api", "t")
    executor = Executor(client, ReportBoard(), store, Metrics(), ActionSettings())

    def interrupted(user):
        return store.record_action(
            user,
            "",
            "release",
            "gpu-idle",
            "why",
            actor="t",
            status="snapshotting",
            server_started=T0,
        )

    kept, other_kind, gone = interrupted("ada"), interrupted("bob"), interrupted("cy")
    executor.ledger.refresh()
    servers = {
        ("ada", ""): one(),
        ("bob", ""): running_servers(
            [{"name": "bob", "groups": [], "servers": {"": server_model()}}]
        )[0],
    }
    executor.close_abandoned(
        [
            ReleaseGpu("ada", "", "gpu-idle", "still idle"),
            StopServer("bob", "", "server-idle", "x"),
        ],
        servers,
    )
    statuses = {r.user: r.status for r in store.actions()}
    assert statuses == {"ada": "snapshotting", "bob": "abandoned", "cy": "abandoned"}
    assert {kept.id, other_kind.id, gone.id} == {r.id for r in store.actions()}
