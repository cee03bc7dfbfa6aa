from __future__ import annotations

import pytest

from gpuhub import nvml, nvml_fake


@pytest.fixture
def scenario(tmp_path, monkeypatch):
    path = tmp_path / "gpus.json"
    monkeypatch.setenv(nvml.FAKE_ENV, str(path))
    # A fresh process's view: NVML not yet initialised, no scenario read.
    monkeypatch.setattr(nvml, "_initialised", {})
    monkeypatch.setitem(nvml_fake._state, "initialised", 0)
    monkeypatch.setitem(nvml_fake._state, "scenario", None)
    return path


def test_simulated_gpus_are_listed_and_marked(scenario):
    nvml_fake.write_scenario(scenario, nvml_fake.simulated_gpus(3))
    inventory = nvml.inventory()
    assert inventory.available and inventory.simulated
    assert [d.uuid for d in inventory.devices] == [
        f"GPU-00000000-0000-4000-8000-{i:012d}" for i in range(3)
    ]
    assert all(d.simulated and "(simulated)" in d.name for d in inventory.devices)


def test_mig_instances_are_devices(scenario):
    data = nvml_fake.simulated_gpus(1)
    data["gpus"][0]["mig"] = [
        {"uuid": "MIG-a", "name": "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "memory_total": 10 << 30},
        {"uuid": "MIG-b", "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "memory_total": 40 << 30},
    ]
    nvml_fake.write_scenario(scenario, data)
    devices = nvml.inventory().devices
    assert [d.uuid for d in devices] == ["MIG-a", "MIG-b"]
    assert all(d.parent_uuid == data["gpus"][0]["uuid"] for d in devices)


def test_missing_library_is_a_clear_reason_not_a_crash(scenario):
    # No scenario file: the fake behaves like a machine without libnvidia-ml.so.
    inventory = nvml.inventory()
    assert not inventory.available and inventory.devices == ()
    assert "no NVIDIA driver library" in inventory.reason


def test_real_pynvml_without_driver_is_unavailable(monkeypatch):
    monkeypatch.delenv(nvml.FAKE_ENV, raising=False)
    inventory = nvml.inventory()
    if inventory.available:  # a machine with a GPU: the real path worked
        assert inventory.devices
    else:
        assert inventory.reason
