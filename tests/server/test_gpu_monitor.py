"""GpuMonitor on the fake NVML with real processes: which GPUs are the server's, who holds them
(kernels vs. anything else, found through /proc), and what a sampling tick costs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuhub import nvml, nvml_fake
from gpuhub.core import idle
from gpuhub.server import monitor as mon
from gpuhub.server import procs


@pytest.fixture
def fake_nvml(monkeypatch, scenario):
    monkeypatch.setattr(nvml, "_initialised", {})
    monkeypatch.setitem(nvml_fake._state, "initialised", 0)

    def write(gpus, **extra):
        path = scenario(gpus, **extra)
        monkeypatch.setenv(nvml.FAKE_ENV, str(path))
        return path

    return write


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"CUDA_VISIBLE_DEVICES": "GPU-1, GPU-2"}, ["GPU-1", "GPU-2"]),
        ({"GPUHUB_GPUS": "GPU-3", "CUDA_VISIBLE_DEVICES": "GPU-1"}, ["GPU-3"]),
        ({"GPUHUB_GPUS": ""}, []),  # a CPU-only server: no GPU at all
    ],
)
def test_which_gpus_are_the_servers(env, expected):
    assert mon.wanted_gpus(env) == expected


def test_selector_tokens():
    whole = nvml.GpuDevice(0, "GPU-aaaaaaaa-1111", "A100", 1)
    other = nvml.GpuDevice(1, "GPU-bbbbbbbb-2222", "A100", 1)
    mig = nvml.GpuDevice(2, "MIG-cccc", "1g", 1, True, parent_uuid="GPU-dddd")
    assert mon.selector(None) is None
    pick = mon.selector(["GPU-aaaaaaaa", "GPU-dddd"])  # a UUID prefix; a MIG GPU's UUID
    assert [pick(d) for d in (whole, other, mig)] == [True, False, True]
    pick = mon.selector(["1"])  # an index
    assert [pick(d) for d in (whole, other, mig)] == [False, True, False]
    assert not mon.selector(["GPU-a"])(whole)  # too short a prefix to be unique


def make_monitor(env, **kw):
    rule = idle.IdleRule(min_busy_s=60, window_s=600)
    return mon.GpuMonitor(rule, interval=0.2, scan_interval=0, env=env, **kw)


def test_states_and_unavailable_gpus(fake_nvml, gpu):
    fake_nvml(
        [
            gpu("GPU-busy", util=90, mem_util=30, memory_used=5 * 1024**3),
            gpu("GPU-idle"),
            gpu("GPU-parent", mig=[{"uuid": "MIG-x", "name": "1g.10gb", "memory_total": 10}]),
            gpu("GPU-not-mine", util=99),
        ]
    )
    monitor = make_monitor({"GPUHUB_GPUS": "GPU-busy,GPU-idle,MIG-x,GPU-gone"})
    for _ in range(3):
        monitor.tick()
        time.sleep(0.2)
    status = monitor.status(time.time(), kernels=[])
    gpus = {g["uuid"]: g for g in status["gpus"]}
    assert set(gpus) == {"GPU-busy", "GPU-idle", "MIG-x", "GPU-gone"}
    assert gpus["GPU-busy"]["state"] == "busy"
    assert gpus["GPU-busy"]["memory"] == {"used": 5 * 1024**3, "total": 80 * 1024**3}
    assert gpus["GPU-idle"]["state"] == "idle"
    assert gpus["GPU-idle"]["idle_since"] is not None
    assert gpus["MIG-x"]["state"] == "unknown"
    assert "MIG" in gpus["MIG-x"]["reason"]
    assert gpus["GPU-gone"]["state"] == "unavailable"
    assert "not visible to NVML" in gpus["GPU-gone"]["reason"]
    assert status["busy"] and status["busy_reasons"] == ["GPU GPU-busy is busy (90 % utilisation)"]


def test_no_nvml_means_unavailable(fake_nvml, gpu, monkeypatch, tmp_path):
    monkeypatch.setenv(nvml.FAKE_ENV, str(tmp_path / "no-such-file.json"))
    monitor = make_monitor({"GPUHUB_GPUS": "GPU-1"})
    monitor.tick()
    status = monitor.status(time.time(), kernels=[])
    assert status["nvml"]["available"] is False
    assert "driver library" in status["nvml"]["reason"]
    [entry] = status["gpus"]
    assert (entry["uuid"], entry["state"]) == ("GPU-1", "unavailable")
    assert not status["busy"]


def hold(path: Path) -> subprocess.Popen:
    """A process that keeps `path` open, as a CUDA process keeps /dev/nvidiaN open."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"f = open({str(path)!r}); print('ready', flush=True); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_processes_holding_the_gpus(fake_nvml, gpu, tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    for minor in (0, 1):
        (dev / f"nvidia{minor}").write_text("")
    pattern = rf"^{dev}/nvidia(\d+)$"
    terminal_job = hold(dev / "nvidia0")  # a script started from a terminal
    # a "kernel" (a process the server knows as a kernel) and a child it started
    child = f"f = open({str(dev / 'nvidia1')!r}); print(1, flush=True); input()"
    parent = (
        "import subprocess, sys\n"
        f"c = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE,"
        " stdin=subprocess.PIPE)\n"
        "c.stdout.readline(); print(c.pid, flush=True); input()\n"
    )
    kernel = subprocess.Popen(
        [sys.executable, "-c", parent], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    grandchild = int(kernel.stdout.readline())
    try:
        fake_nvml(
            [
                gpu("GPU-0", processes=[{"pid": terminal_job.pid, "used_memory": 7}]),
                gpu("GPU-1"),
                gpu("GPU-2", processes=[{"pid": 999_999_999, "used_memory": 1}]),  # host PID
            ]
        )
        monitor = make_monitor({}, device_pattern=pattern)
        monitor.tick()
        kernels = [{"id": "kernel-1", "pid": kernel.pid}]
        status = monitor.status(time.time(), kernels)
        [external] = status["external_processes"]
        assert external["pid"] == terminal_job.pid
        assert external["gpus"] == ["GPU-0"]
        assert sorted(external["seen_by"]) == ["device-file", "nvml"]
        assert "input()" in external["cmdline"]
        assert status["kernel_gpus"] == {"kernel-1": ["GPU-1"]}
        assert status["busy"]  # the GPUs are idle, but a job outside the kernels holds one
        assert any(str(terminal_job.pid) in r for r in status["busy_reasons"])
        gpus = {g["uuid"]: g for g in status["gpus"]}
        assert gpus["GPU-0"]["processes"] == [
            {"pid": terminal_job.pid, "used_memory": 7, "kernel_id": None, "local": True}
        ]
        # a PID NVML reports that is not a local process with a GPU open (another PID
        # namespace): listed, never counted
        assert gpus["GPU-2"]["processes"][0]["local"] is False
        assert not monitor.status(time.time(), kernels, count_external=False)["busy"]
    finally:
        for p in (terminal_job, kernel):
            p.kill()
            p.wait()
        os.kill(grandchild, signal.SIGKILL)
        deadline = time.time() + 10
        while grandchild in procs.device_holders({1}, pattern) and time.time() < deadline:
            time.sleep(0.05)  # its files are closed once it is dead (even before it is reaped)
    monitor.tick()
    assert monitor.status(time.time(), kernels)["external_processes"] == []


def test_process_helpers(tmp_path):
    info = procs.read_process(procs.os.getpid())
    assert info is not None and info.ppid and "python" in info.cmdline
    assert procs.read_process(999_999_999) is None
    assert procs.owner_among(procs.os.getpid(), {info.ppid: "parent"}) == "parent"
    assert procs.owner_among(procs.os.getpid(), {}) is None
    assert procs.device_holders(set()) == {}


def test_a_sampling_tick_is_cheap(fake_nvml, gpu):
    """Sampling every 5 s must stay under 1 % of a core: a tick (NVML reads of 8 GPUs and a
    /proc scan) must cost well under 50 ms of CPU."""
    fake_nvml([gpu(f"GPU-{i}", util=i * 10, processes=[{"pid": 1}]) for i in range(8)])
    monitor = make_monitor({})
    for _ in range(20):
        monitor.tick()
        monitor.status(time.time(), kernels=[])
    per_tick = monitor.tick_cpu_s / monitor.ticks
    assert per_tick < 0.05 * 0.2, f"{per_tick * 1000:.1f} ms of CPU per tick"
