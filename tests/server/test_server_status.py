"""`GET /api/gpuhub/status` of a real jupyter server with simulated GPUs: busy, idle, unknown
(MIG), unavailable; GPU activity as server activity; authentication; bad input."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from gpuhub.core import protocol

pytestmark = pytest.mark.slow


def demo_gpu(scenario: Path, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gpuhub.cli", "demo-gpu", "--scenario", str(scenario), *args],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_busy_idle_unknown_and_unavailable(jupyter_server, scenario, gpu):
    path = scenario(
        [
            gpu(
                "GPU-busy",
                util=85,
                mem_util=40,
                memory_used=3 * 1024**3,
                sample_period_s=0.1,
            ),
            gpu("GPU-idle"),
            gpu("GPU-mig-parent", mig=[{"uuid": "MIG-one", "name": "1g.10gb", "memory_total": 9}]),
            gpu("GPU-someone-else", util=100),
        ]
    )
    server = jupyter_server(
        env={
            "GPUHUB_FAKE_NVML": str(path),
            "GPUHUB_GPUS": "GPU-busy,GPU-idle,MIG-one,GPU-vanished",
            "GPUHUB_INTERFACE": "lab",
            "GPUHUB_ENVIRONMENT": "pytorch",
        }
    )
    status = server.wait_for(lambda: (s := server.status())["nvml"]["sampled_at"] and s)
    # what the extension produces is what the service's one parser accepts, unchanged
    parsed = protocol.parse_status(status)
    assert protocol.parse_status(protocol.status_document(parsed)) == parsed
    assert status["interface"] == "lab" and status["environment"] == "pytorch"
    assert status["nvml"]["available"] and status["nvml"]["simulated"]
    gpus = {g["uuid"]: g for g in status["gpus"]}
    assert set(gpus) == {"GPU-busy", "GPU-idle", "MIG-one", "GPU-vanished"}

    busy = gpus["GPU-busy"]
    assert busy["state"] == "busy" and busy["idle_since"] is None
    assert busy["utilization"]["gpu"] == 85 and busy["utilization"]["source"] == "samples"
    assert busy["memory"] == {"used": 3 * 1024**3, "total": 80 * 1024**3}

    idle_gpu = gpus["GPU-idle"]
    assert idle_gpu["state"] == "idle"
    assert datetime.fromisoformat(idle_gpu["idle_since"]).timestamp() <= time.time()
    assert idle_gpu["utilization"]["busy_fraction"] == 0

    mig = gpus["MIG-one"]
    assert mig["state"] == "unknown" and mig["mig"] and mig["parent_uuid"] == "GPU-mig-parent"
    assert mig["utilization"]["gpu"] is None and "MIG" in mig["reason"]

    assert gpus["GPU-vanished"]["state"] == "unavailable"
    assert status["busy"] and "GPU GPU-busy is busy" in status["busy_reasons"][0]

    # the demo makes a simulated GPU idle, and busy again, in the running server
    demo_gpu(path, "--gpu", "GPU-busy", "--util", "0")
    server.wait_for(lambda: server.gpu_status("GPU-busy")["state"] == "idle", timeout=20)
    assert not server.status()["busy"]
    demo_gpu(path, "--gpu", "GPU-idle", "--util", "60", "--memory-used", "1000")
    g = server.wait_for(
        lambda: (g := server.gpu_status("GPU-idle"))["state"] == "busy" and g, timeout=20
    )
    assert g["memory"]["used"] == 1000 and 0 < g["utilization"]["busy_fraction"] < 1


@pytest.mark.parametrize(
    ("setup", "reason"),
    [("no-library", "no NVIDIA driver library"), ("driver_not_loaded", "driver is not loaded")],
)
def test_unavailable_nvml(jupyter_server, scenario, gpu, tmp_path, setup, reason):
    if setup == "no-library":
        path = tmp_path / "there-is-no-driver.json"
    else:
        path = scenario([gpu("GPU-1")], init_error=setup)
    server = jupyter_server(env={"GPUHUB_FAKE_NVML": str(path), "GPUHUB_GPUS": "GPU-1"})
    status = server.wait_for(lambda: (s := server.status())["nvml"]["sampled_at"] and s)
    assert status["nvml"]["available"] is False
    assert reason in status["nvml"]["reason"]
    [entry] = status["gpus"]
    assert entry["uuid"] == "GPU-1" and entry["state"] == "unavailable"
    assert reason in entry["reason"]
    assert status["busy"] is False


def last_activity(server) -> float:
    return datetime.fromisoformat(server.get("/api/status").json()["last_activity"]).timestamp()


def test_gpu_activity_keeps_the_server_active(jupyter_server, scenario, gpu, tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "nvidia0").write_text("")
    path = scenario([gpu("GPU-0")])
    server = jupyter_server(
        env={"GPUHUB_FAKE_NVML": str(path), "GPUHUB_GPUS": "GPU-0"},
        args=[
            f"--GpuhubExtension.device_file_pattern=^{dev}/nvidia(\\d+)$",
            "--GpuhubExtension.process_scan_interval=0.5",
        ],
    )
    server.wait_for(lambda: server.status()["nvml"]["sampled_at"])
    # idle GPU: polling the gpuhub endpoints (as the hub does) is not activity
    before = last_activity(server)
    for _ in range(6):
        server.status()
        server.get("/api/gpuhub/snapshots")
        time.sleep(0.25)
    assert last_activity(server) == before

    # a busy GPU is
    demo_gpu(path, "--gpu", "0", "--util", "70")
    server.wait_for(lambda: last_activity(server) > before + 0.5, timeout=20)
    assert server.status()["last_gpu_activity"] is not None

    # back to idle: activity stops moving
    demo_gpu(path, "--gpu", "0", "--util", "0")
    server.wait_for(lambda: not server.status()["busy"], timeout=20)
    time.sleep(1)
    settled = last_activity(server)
    time.sleep(1.5)
    assert last_activity(server) == settled

    # a training script started from a terminal, holding the GPU while it loads data
    job = subprocess.Popen(
        [sys.executable, "-c", f"f = open({str(dev / 'nvidia0')!r}); import time; time.sleep(120)"]
    )
    try:
        status = server.wait_for(
            lambda: (s := server.status())["external_processes"] and s, timeout=20
        )
        [external] = status["external_processes"]
        assert external["pid"] == job.pid and external["gpus"] == ["GPU-0"]
        assert status["busy"] and status["gpus"][0]["state"] == "idle"
        server.wait_for(lambda: last_activity(server) > settled + 0.5, timeout=20)
    finally:
        job.kill()
        job.wait()


ENDPOINTS = [
    ("GET", "/api/gpuhub/status"),
    ("GET", "/api/gpuhub/snapshots"),
    ("POST", "/api/gpuhub/snapshot"),
    ("POST", "/api/gpuhub/restore"),
]


def test_unauthenticated_requests_are_refused(shared_server):
    server = shared_server
    for method, path in ENDPOINTS:
        for token in (None, "not-the-token"):
            r = server.request(method, path, token=token, data="{}" if method == "POST" else None)
            assert r.status_code in (401, 403), (method, path, token, r.status_code)
            assert "GPU-0" not in r.text
        # with the token: through (restore without kernels is a 400 naming the field)
        r = server.request(method, path, data="{}" if method == "POST" else None)
        assert r.status_code in (200, 400), r.text


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/api/gpuhub/snapshot", "{not json", 400, "body: not valid JSON"),
        ("/api/gpuhub/snapshot", "[1, 2]", 400, "body: must be a JSON object"),
        ("/api/gpuhub/snapshot", '{"kernels": "abc"}', 400, "kernels: wrong type"),
        ("/api/gpuhub/snapshot", '{"kernels": [5]}', 400, "kernels[0]: must be a kernel id"),
        ("/api/gpuhub/snapshot", '{"kernels": ["nope"]}', 404, "kernels[0]: no kernel 'nope'"),
        ("/api/gpuhub/snapshot", '{"wait": "yes"}', 400, "wait: wrong type"),
        ("/api/gpuhub/snapshot", '{"bogus": 1}', 400, "bogus: unknown field"),
        ("/api/gpuhub/restore", "{}", 400, "kernel_id: required when the server runs 0 kernels"),
        ("/api/gpuhub/restore", '{"kernel_id": "nope"}', 404, "kernel_id: no kernel 'nope'"),
        ("/api/gpuhub/restore", '{"kernel_id": 3}', 400, "kernel_id: wrong type"),
    ],
)
def test_bad_input_names_the_field(shared_server, path, body, status, message):
    r = shared_server.post(path, data=body)
    assert r.status_code == status, r.text
    assert message in r.json()["message"]
    assert "Traceback" not in r.text


def test_bad_snapshot_names_and_keys(shared_server):
    server = shared_server
    kernel = server.open_notebook("x.ipynb", kernel="pytorch")
    for body, message in [
        ({"kernel_id": kernel, "snapshot": "../../etc"}, "snapshot: not a snapshot name"),
        ({"kernel_id": kernel, "key": "../other"}, "key: not a snapshot key"),
        ({"kernel_id": kernel, "key": ".hidden"}, "key: not a snapshot key"),
    ]:
        r = server.post("/api/gpuhub/restore", body)
        assert r.status_code == 400 and message in r.json()["message"], r.text
    server.close_all()


@pytest.mark.gpu
def test_status_from_the_real_driver(jupyter_server):
    """Where NVML finds a GPU: the server reads it through the real driver (no fake)."""
    server = jupyter_server()
    status = server.wait_for(lambda: (s := server.status())["nvml"]["sampled_at"] and s)
    assert status["nvml"]["available"] and not status["nvml"]["simulated"]
    assert status["gpus"], status
    for g in status["gpus"]:
        assert g["memory"]["total"] > 0
        if g["mig"]:
            assert g["state"] == "unknown"
        else:
            assert g["state"] in ("busy", "idle"), g
            assert g["utilization"]["source"] in ("samples", "rates")
