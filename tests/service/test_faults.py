"""When things fail, nothing is released or stopped: hub API errors and timeouts, a server that
stops reporting, a snapshot the server does not carry out, a snapshot that fails for real."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from gpuhub.core.decide import RULE_SNAPSHOT_RETRY, ReleaseGpu, Warn

from .helpers import Fault, FaultProxy, cycle, metric

pytestmark = pytest.mark.slow


def holds_gpu(sh, name: str) -> bool:
    model = sh.model(name)
    return (
        model is not None
        and model["user_options"]["gpus"] == 1
        and len(model["state"]["gpus"]) == 1
        and sh.leases(name) == model["state"]["gpus"]
    )


@pytest.fixture(scope="module")
def idle_server(service_hub):
    service_hub.start("fault-fay", gpus=1)
    service_hub.wait_gpu_state("fault-fay", "idle", idle_for=1)
    yield "fault-fay"
    service_hub.hub.stop_server("fault-fay")


@pytest.fixture
def hub_api_proxy(service_hub):
    proxy = FaultProxy(service_hub.hub.url).start()
    yield proxy
    proxy.stop()


def test_hub_api_5xx_changes_nothing(service_hub, idle_server, hub_api_proxy):
    sh, proxy = service_hub, hub_api_proxy
    proxy.faults = [Fault("GET", r"/hub/api/users$", status=500)]
    service = sh.service(gpu_idle_timeout=1, hub_api_url=proxy.url + "/hub/api", retries=2)
    proxy.faults[0].hits = 0  # (the new service's first look at the hub failed too)
    assert cycle(service) == []
    assert metric(service, "gpuhub_cycle_errors_total") == 1
    assert "500" in service.last_error
    assert proxy.faults[0].hits == 3, "a failed read is retried"
    assert holds_gpu(sh, idle_server)
    assert sh.store.actions(idle_server) == []


def test_hub_api_timeout_changes_nothing(service_hub, idle_server, hub_api_proxy):
    sh, proxy = service_hub, hub_api_proxy
    proxy.faults = [Fault("GET", r"/hub/api/users$", delay=5)]
    service = sh.service(
        gpu_idle_timeout=1, hub_api_url=proxy.url + "/hub/api", request_timeout=1, retries=1
    )
    assert cycle(service) == []
    assert metric(service, "gpuhub_cycle_errors_total") == 1
    assert "599" in service.last_error
    assert holds_gpu(sh, idle_server)
    assert sh.store.actions(idle_server) == []


def test_hub_api_failing_the_stop_releases_nothing(service_hub, idle_server, hub_api_proxy):
    sh, proxy = service_hub, hub_api_proxy
    proxy.faults = [Fault("DELETE", rf"/hub/api/users/{idle_server}/servers/", status=503)]
    service = sh.service(gpu_idle_timeout=1, hub_api_url=proxy.url + "/hub/api")
    actions = cycle(service)
    assert [type(a) for a in actions] == [ReleaseGpu]
    assert proxy.faults[0].hits == 2, "a stop is retried once (retries=1)"
    assert holds_gpu(sh, idle_server)
    [row] = sh.store.actions(idle_server)
    assert row.status == "failed" and row.error.startswith("stop:")
    assert metric(service, "gpuhub_action_failures_total", kind="release", step="stop") == 1
    # recorded as failed, not as a failed snapshot: the next cycle may try again at once
    assert (
        service.ledger.snapshot_failures((idle_server, "", sh.model(idle_server)["started"]))[0]
        == 0
    )
    sh.store.update_action(row.id, status="abandoned")  # leave a clean history for the others


def test_a_server_that_stops_reporting_is_never_idle(service_hub, idle_server):
    sh = service_hub
    pid = sh.hub.user(idle_server)["servers"][""]["state"]["pid"]
    service = sh.service(gpu_idle_timeout=1, report_max_age=3, retries=0)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(4)
        actions = cycle(service)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [a for a in actions if a.user == idle_server] == []
    assert metric(service, "gpuhub_servers", status="unreadable") == 1
    # the trusted source still sees the GPU idle; only the server's silence keeps it
    assert metric(service, "gpuhub_gpus_idle", gpu_type="gpu") == 1
    assert holds_gpu(sh, idle_server)


def test_a_snapshot_the_server_does_not_carry_out_releases_nothing(service_hub, idle_server):
    sh = service_hub
    pid = sh.hub.user(idle_server)["servers"][""]["state"]["pid"]
    service = sh.service(gpu_idle_timeout=1, snapshot_timeout=3)
    os.kill(pid, signal.SIGSTOP)  # reported a moment ago, then hangs
    try:
        actions = cycle(service)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [type(a) for a in actions] == [ReleaseGpu]
    assert holds_gpu(sh, idle_server)
    [row] = sh.store.actions(idle_server, statuses=["snapshot-failed"])
    assert "did not carry out the snapshot" in row.error
    assert metric(service, "gpuhub_snapshot_failures_total") == 1
    sh.store.update_action(row.id, status="abandoned")


def test_failing_snapshot_releases_nothing_then_retries(service_hub):
    sh = service_hub
    sh.hub.stop_server("fault-fay")
    sh.start("snap-sam", gpus=1)
    kernel = sh.open_notebook("snap-sam", "analysis.ipynb")
    sh.run("snap-sam", kernel, "table = {'rows': 3}")
    sh.wait_gpu_state("snap-sam", "idle", idle_for=1)
    # the snapshot folder cannot be created: the kernel's snapshot fails for real
    snapshots = sh.hub.state_dir / "home" / "snap-sam" / ".gpuhub" / "snapshots"
    shutil.rmtree(snapshots, ignore_errors=True)
    snapshots.parent.mkdir(parents=True, exist_ok=True)
    snapshots.write_text("a file where the folder should be")

    service = sh.service(gpu_idle_timeout=1, snapshot_retry=3600)
    actions = cycle(service)
    assert [type(a) for a in actions] == [ReleaseGpu]
    assert holds_gpu(sh, "snap-sam")
    [row] = sh.store.actions("snap-sam")
    assert row.status == "snapshot-failed" and "Not a directory" in row.error
    assert metric(service, "gpuhub_snapshot_failures_total") == 1
    assert sh.run("snap-sam", kernel, "print(table['rows'])").strip().endswith("3")
    sh.wait_idle_reported(service, "snap-sam")  # that cell is no work in progress

    # backing off: the next cycle only says so, once
    actions = cycle(service)
    assert [(type(a), a.rule) for a in actions] == [(Warn, RULE_SNAPSHOT_RETRY)]
    assert holds_gpu(sh, "snap-sam")
    assert [r.status for r in sh.store.actions("snap-sam")] == ["done", "snapshot-failed"]

    # once the folder can be written and the backoff is over, the release goes through
    snapshots.unlink()
    service = sh.service(gpu_idle_timeout=1, snapshot_retry=0)
    actions = cycle(service)
    assert [type(a) for a in actions] == [ReleaseGpu]
    assert "snapshot attempt 2" in actions[0].reason
    assert sh.model("snap-sam")["user_options"]["gpus"] == 0
    release = sh.store.actions("snap-sam", kinds=["release"], statuses=["done"])
    assert len(release) == 1 and release[0].snapshots[0]["status"] == "saved"
    sh.hub.stop_server("snap-sam")
