"""NVML sampling through the fake pynvml: samples vs rates, MIG, process API versions, no
driver, live scenario changes, `gpuhub demo-gpu`, and the real NVML path where a GPU exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pynvml
import pytest

from gpuhub import demo_gpu, nvml, nvml_fake


@pytest.fixture
def fake(monkeypatch, scenario):
    """Point gpuhub.nvml at a scenario; returns the writer. NVML starts uninitialised, as in a
    fresh process."""
    monkeypatch.setattr(nvml, "_initialised", {})
    monkeypatch.setitem(nvml_fake._state, "initialised", 0)

    def write(gpus, **extra):
        path = scenario(gpus, **extra)
        monkeypatch.setenv(nvml.FAKE_ENV, str(path))
        return path

    return write


def poll(sampler: nvml.Sampler, interval: float = 5.0) -> dict[str, nvml.Reading]:
    result = sampler.poll(time.time(), interval)
    assert result.available, result.reason
    return {r.uuid: r for r in result.readings}


def test_samples_are_averaged_since_the_previous_poll(fake, gpu):
    now = time.time()
    # 10 s at 100 %, then 0 % from 5 s ago: the mean over the last 10 s is about 50 %
    fake(
        [
            gpu(
                "GPU-a",
                util=100,
                mem_util=40,
                timeline=[{"at": now - 5, "util": 0, "mem_util": 0}],
                sample_period_s=0.5,
            )
        ]
    )
    sampler = nvml.Sampler()
    reading = poll(sampler, interval=10)["GPU-a"]
    assert reading.source == "samples"
    assert 40 <= reading.util <= 60, reading
    assert 15 <= reading.mem_util <= 25, reading
    time.sleep(1.1)
    # the next poll only sees the samples since the first one: all at 0 %
    assert poll(sampler)["GPU-a"].util == 0


def test_rates_where_samples_are_not_supported(fake, gpu):
    fake([gpu("GPU-a", util=37, mem_util=12, unsupported=["samples"])])
    reading = poll(nvml.Sampler())["GPU-a"]
    assert (reading.source, reading.util, reading.mem_util) == ("rates", 37.0, 12.0)


def test_mig_instances_are_unknown_never_idle(fake, gpu):
    fake(
        [
            gpu(
                "GPU-parent",
                mig=[
                    {"uuid": "MIG-1", "name": "1g.10gb", "memory_total": 10 * 1024**3},
                    {"uuid": "MIG-2", "name": "1g.10gb", "memory_total": 10 * 1024**3},
                ],
            )
        ]
    )
    readings = poll(nvml.Sampler())
    assert set(readings) == {"MIG-1", "MIG-2"}
    for r in readings.values():
        assert r.util is None and r.mem_util is None
        assert r.source == "unsupported"
        assert r.memory_total == 10 * 1024**3


def test_compute_processes_fall_back_to_older_entry_points(fake, gpu):
    procs = [{"pid": 4242, "used_memory": 123}]
    fake(
        [
            gpu("GPU-v3", processes=procs),
            gpu("GPU-v2", processes=procs, unsupported=["processes_v3"]),
            gpu("GPU-none", processes=procs, unsupported=["processes"]),
        ]
    )
    readings = poll(nvml.Sampler())
    expected = (nvml.GpuProcess(4242, 123),)
    assert readings["GPU-v3"].processes == expected
    assert readings["GPU-v2"].processes == expected
    assert readings["GPU-none"].processes is None  # unknown, not "no processes"


def test_the_fake_raises_pynvmls_own_exceptions(fake, gpu):
    fake([gpu("GPU-a", unsupported=["utilization", "processes_v3"])])
    lib = nvml.load_library()
    lib.nvmlInit()
    handle = lib.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        lib.nvmlDeviceGetUtilizationRates(handle)
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        lib.nvmlDeviceGetComputeRunningProcesses_v3(handle)
    with pytest.raises(pynvml.NVMLLibraryMismatchError):
        lib.nvmlDeviceGetComputeRunningProcesses(handle)
    with pytest.raises(pynvml.NVMLError_NotFound):  # no sample newer than "now + 1 min"
        lib.nvmlDeviceGetSamples(
            handle, pynvml.NVML_GPU_UTILIZATION_SAMPLES, int((time.time() + 60) * 1e6)
        )
    kind, samples = lib.nvmlDeviceGetSamples(handle, pynvml.NVML_GPU_UTILIZATION_SAMPLES, 0)
    assert kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    assert isinstance(samples[0], pynvml.c_nvmlSample_t)
    assert len(samples) == nvml_fake.SAMPLE_BUFFER


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("missing-file", "no NVIDIA driver library"),
        ("driver_not_loaded", "driver is not loaded"),
        ("no_permission", "no permission"),
    ],
)
def test_unavailable_says_why(fake, monkeypatch, tmp_path, setup, reason, gpu):
    if setup == "missing-file":
        monkeypatch.setenv(nvml.FAKE_ENV, str(tmp_path / "absent.json"))
    else:
        fake([gpu("GPU-a")], init_error=setup)
    result = nvml.Sampler().poll(time.time(), 5)
    assert not result.available
    assert reason in result.reason
    assert result.readings == ()


def test_scenario_changes_are_seen_and_selection_filters(fake, gpu):
    path = fake([gpu("GPU-a", util=0), gpu("GPU-b", util=0), gpu("GPU-c", util=0)])
    sampler = nvml.Sampler(select=lambda d: d.uuid in ("GPU-a", "GPU-c"))
    assert set(poll(sampler)) == {"GPU-a", "GPU-c"}
    assert demo_gpu.main(["--gpu", "GPU-c", "--util", "90", "--scenario", str(path)]) == 0
    time.sleep(1.1)  # the next NVML sample period
    readings = poll(sampler)
    assert readings["GPU-c"].util == 90
    assert readings["GPU-c"].mem_util == 45  # half of --util by default
    assert readings["GPU-a"].util == 0


def test_demo_gpu_command(fake, capsys, gpu):
    path = fake([gpu("GPU-a", util=0, timeline=[{"at": 0, "util": 3}])])
    cli = [sys.executable, "-m", "gpuhub.cli", "demo-gpu"]
    env_run = {"env": {**os.environ, nvml.FAKE_ENV: str(path)}, "text": True}
    done = subprocess.run(
        [*cli, "--gpu", "0", "--util", "75", "--memory-used", "1024"],
        capture_output=True,
        **env_run,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(path.read_text())["gpus"][0]
    assert (data["util"], data["memory_used"]) == (75, 1024)
    assert "timeline" not in data  # a command given now overrides what was scheduled
    for args, message in [
        (["--gpu", "9", "--util", "5"], "--gpu: no simulated GPU '9'"),
        (["--gpu", "0", "--util", "101"], "must be between 0 and 100"),
        (["--gpu", "0", "--util", "5", "--memory-used", str(10**15)], "--memory-used"),
    ]:
        done = subprocess.run([*cli, *args], capture_output=True, **env_run)
        assert done.returncode == 2
        assert message in done.stderr
        assert "Traceback" not in done.stderr
    assert json.loads(path.read_text())["gpus"][0]["util"] == 75  # unchanged by the errors


@pytest.mark.gpu
def test_real_nvml_sampling():
    """On a machine with an NVIDIA GPU: the same code on the real driver."""
    result = nvml.Sampler(lib=pynvml).poll(time.time(), 5)
    assert result.available, result.reason
    assert result.readings and not result.simulated
    time.sleep(1.5)
    result = nvml.Sampler(lib=pynvml).poll(time.time(), 5)
    for device, reading in zip(result.devices, result.readings, strict=True):
        assert reading.memory_total and reading.memory_total > 0
        assert reading.memory_used is not None and 0 <= reading.memory_used <= reading.memory_total
        if device.is_mig_instance:
            assert reading.util is None  # unknown, never 0
        else:
            assert reading.source in ("samples", "rates"), reading
            assert 0 <= reading.util <= 100
        assert reading.processes is None or all(p.pid > 0 for p in reading.processes)


def test_demo_gpu_finds_the_running_demo_by_itself(tmp_path, gpu):
    """Run from a second terminal, without $GPUHUB_FAKE_NVML: the demo's state folder."""
    state = tmp_path / "demo-state"
    state.mkdir()
    scenario = state / "simulated-gpus.json"
    nvml_fake.write_scenario(scenario, {"gpus": [gpu("GPU-a", util=0)]})
    env = {k: v for k, v in os.environ.items() if k != nvml.FAKE_ENV}
    cli = [sys.executable, "-m", "gpuhub.cli", "demo-gpu", "--gpu", "0", "--util", "80"]
    done = subprocess.run(
        cli, capture_output=True, text=True, env={**env, "GPUHUB_STATE_DIR": str(state)}
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(scenario.read_text())["gpus"][0]["util"] == 80
    # no demo there: a clear message, no traceback
    empty = tmp_path / "no-demo"
    empty.mkdir()
    done = subprocess.run(
        cli, capture_output=True, text=True, env={**env, "GPUHUB_STATE_DIR": str(empty)}
    )
    assert done.returncode == 2 and "start `gpuhub demo` first" in done.stderr
    assert "Traceback" not in done.stderr
