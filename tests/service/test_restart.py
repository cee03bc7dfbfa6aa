"""The service killed in the middle of its actions and started again acts once, not twice: the
action history says how far each action got, and the next run finishes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from gpuhub.testing import free_port_block, wait_for

from .helpers import Fault, FaultProxy

pytestmark = pytest.mark.slow


def run_service(sh, log_path, *, api_url: str, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "JUPYTERHUB_API_TOKEN": sh.token,
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
        "JUPYTERHUB_SERVICE_PREFIX": "/services/gpuhub/",
    }
    command = [
        sys.executable,
        "-m",
        "gpuhub.service",
        f"--api-url={api_url}",
        f"--hub-public-url={sh.hub.url}",
        f"--store-url={sh.store_url}",
        "--gpu-idle-timeout=1",
        "--interval=1",
        "--GpuhubService.retries=0",
        "--GpuhubService.snapshot_timeout=120",
    ]
    return subprocess.Popen(
        command, env=env, stdout=open(log_path, "a"), stderr=subprocess.STDOUT, cwd=sh.hub.state_dir
    )


def snapshots_of(sh, user: str) -> list[str]:
    root = sh.hub.state_dir / "home" / user / ".gpuhub" / "snapshots"
    return sorted(p.name for p in root.glob("*/*") if p.is_dir() and not p.name.startswith(".tmp"))


def test_service_killed_mid_action_acts_once(service_hub, tmp_path):
    sh = service_hub
    # rita's release is killed after the hub stopped her server, before the restart without GPU;
    # rolf's after his kernels' snapshot was taken, before anything else
    for name in ("restart-rita", "restart-rolf"):
        sh.start(name, gpus=1)
        kernel = sh.open_notebook(name, "model.ipynb")
        sh.run(name, kernel, "loss = 0.25")
    for name in ("restart-rita", "restart-rolf"):
        sh.wait_gpu_state(name, "idle", idle_for=1)

    sh.stop_service()  # the service runs as a process of its own here
    hub_api = FaultProxy(sh.hub.url).start()
    # the servers report through the hub's proxy to the service's address: a proxy there drops
    # the reports that carry rolf's snapshot result (they name his GPU, then the results)
    port = free_port_block(1)
    servers = FaultProxy(f"http://127.0.0.1:{port}", port=sh.service_port).start()
    rolf_gpu = sh.devices("restart-rolf")[0]
    snapshot_rolf = Fault(
        "POST", r"/servers/report", status=503, body=rf'{rolf_gpu}[\s\S]*"results": \[\{{'
    )
    stop_rita = Fault("DELETE", r"/users/restart-rita/servers/", delay=60, forward_first=True)
    # (and should rolf's snapshot answer come early after all, his stop fails: never two steps)
    hub_api.faults = [stop_rita, Fault("DELETE", r"/users/restart-rolf/", status=500)]
    servers.faults = [snapshot_rolf]
    log = tmp_path / "service.log"
    first = run_service(sh, log, api_url=hub_api.url + "/hub/api", port=port)
    try:

        def rows(name):
            return sh.store.actions(name, kinds=["release"])

        wait_for(
            lambda: (
                stop_rita.hits == 1
                and [r.status for r in rows("restart-rita")] == ["stopping"]
                and sh.model("restart-rita") is None
            ),
            120,
            what=f"rita's server stopped by the service:\n{log.read_text()}",
        )
        wait_for(
            lambda: (
                snapshot_rolf.hits >= 1
                and [r.status for r in rows("restart-rolf")] == ["snapshotting"]
                and len(snapshots_of(sh, "restart-rolf")) == 1
            ),
            120,
            what=f"rolf's snapshot taken:\n{log.read_text()}",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        hub_api.stop()
        servers.stop()

    second = run_service(sh, log, api_url=sh.hub.api, port=sh.service_port)
    try:
        for name in ("restart-rita", "restart-rolf"):
            wait_for(
                lambda name=name: [r.status for r in rows(name)] == ["done"],
                180,
                what=f"{name}'s release finished:\n{log.read_text()}",
            )
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)

    text = log.read_text()
    assert "finishing the interrupted release of restart-rita" in text
    assert "taking up the interrupted release of restart-rolf" in text
    for name in ("restart-rita", "restart-rolf"):
        model = sh.model(name)
        assert model["ready"] and model["user_options"]["gpus"] == 0, name
        assert sh.leases(name) == []
        [release] = rows(name)
        assert release.snapshots and release.snapshots[0]["status"] == "saved"
        starts = sh.hub.log().count(f"gpuhub: {name} starts pytorch in jupyterlab with no GPU")
        assert starts == 1, f"{name}'s server was restarted {starts} times"
        assert sh.hub.log().count(f"gpuhub: {name} starts pytorch in jupyterlab with 1") == 1
    # rita was snapshotted once; rolf's interrupted snapshot was taken again before his release
    assert len(snapshots_of(sh, "restart-rita")) == 1
    assert len(snapshots_of(sh, "restart-rolf")) == 2
    sh.stop_everything()
