"""Per-lease GPU device access on the local backend, with real system users (created here) and
stand-in device files in a temporary device folder: who can open which `/dev/nvidiaN`."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from traitlets.config import Config

from gpuhub import nvml_fake
from gpuhub.spawner import local
from gpuhub.spawner.device_access import DeviceAccessError, DeviceFiles, device_file_names
from gpuhub.store import Store

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: creates real system users and changes device files' owners",
)

GPUS = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]


@pytest.fixture(scope="module")
def people():
    """Two real system users (no home, no shell), removed afterwards."""
    suffix = uuid.uuid4().hex[:6]
    names = [f"gh-ada-{suffix}", f"gh-bob-{suffix}"]
    for name in names:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True
        )
    yield names
    for name in names:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def device_dir():
    """Stand-ins for /dev/nvidia0..2, closed (root, 0600), in a folder everyone can enter."""
    folder = Path(tempfile.mkdtemp(prefix="gpuhub-dev-", dir="/tmp"))
    folder.chmod(0o755)
    for i in range(len(GPUS)):
        path = folder / f"nvidia{i}"
        path.write_bytes(b"")
        path.chmod(0o600)
    yield folder
    shutil.rmtree(folder)


def can_open(user: str, path: Path) -> bool:
    """Whether `user` can open `path` for reading and writing (as CUDA opens a GPU)."""
    run = subprocess.run(
        ["/bin/sh", "-c", 'exec 3<>"$0"', str(path)], user=user, capture_output=True, timeout=30
    )
    return run.returncode == 0


def openable(user: str, folder: Path) -> list[str]:
    return [p.name for p in sorted(folder.iterdir()) if can_open(user, p)]


def test_a_device_file_is_given_to_its_holder_only_and_taken_back(people, device_dir):
    ada, bob = people
    files = DeviceFiles(device_dir)
    assert openable(ada, device_dir) == [] and openable(bob, device_dir) == []
    files.grant(["nvidia1"], int(subprocess.check_output(["id", "-u", ada])))
    assert openable(ada, device_dir) == ["nvidia1"]
    assert openable(bob, device_dir) == []
    files.close(["nvidia1"])
    assert openable(ada, device_dir) == []
    assert files.holder("nvidia1") is None


def test_a_device_file_replaced_by_a_link_is_refused(people, device_dir, tmp_path):
    ada, _ = people
    victim = device_dir / "victim"
    victim.write_text("root's")
    victim.chmod(0o600)
    (device_dir / "nvidia2").unlink()
    (device_dir / "nvidia2").symlink_to(victim)
    files = DeviceFiles(device_dir)
    with pytest.raises(DeviceAccessError, match="nvidia2: not a device file"):
        files.grant(["nvidia2"], int(subprocess.check_output(["id", "-u", ada])))
    assert victim.stat().st_uid == 0 and not can_open(ada, victim)
    with pytest.raises(DeviceAccessError, match="not a file name"):
        files.grant(["../victim"], 0)


def test_device_files_by_mapping_minor_or_index():
    from gpuhub.nvml import GpuDevice

    devices = [
        GpuDevice(0, "GPU-a", "A100", 1),
        GpuDevice(1, "GPU-b", "A100", 1),
        GpuDevice(2, "GPU-c", "A100", 1),
        GpuDevice(3, "MIG-d", "1g.10gb", 1, True, parent_uuid="GPU-c"),
    ]
    names = device_file_names(devices, {"GPU-a": "gpu-a", "1": "nvidia7"}, {"GPU-c": 5})
    assert names == {"GPU-a": "gpu-a", "GPU-b": "nvidia7", "GPU-c": "nvidia5"}


class StubUser(SimpleNamespace):
    """What the spawner reads of JupyterHub's user: name, groups, other servers."""


def spawner_for(name: str, store_url: str, device_dir: Path) -> local.LocalGPUSpawner:
    user = StubUser(name=name, groups=[], spawners={}, url=f"/user/{name}/", db=None)
    config = Config()
    config.GpuhubConfig.store_url = store_url
    spawner = local.LocalGPUSpawner(user=user, hub=SimpleNamespace(), config=config)
    spawner.device_dir = str(device_dir)
    spawner.kernelspec_dir = str(device_dir.parent / f"kernels-{name}")
    spawner.quotas = {"default": {"max_gpus": 1}}
    return spawner


def test_servers_get_the_device_files_of_their_leases_only(people, device_dir, tmp_path):
    ada, bob = people
    scenario = tmp_path / "gpus.json"
    gpus = [{"uuid": u, "name": "NVIDIA A100 (simulated)", "memory_total": 1} for u in GPUS]
    nvml_fake.write_scenario(scenario, {"driver_version": "560.35.03", "gpus": gpus})
    os.environ["GPUHUB_FAKE_NVML"] = str(scenario)
    local._inventory_cache.clear()
    try:
        store_url = f"sqlite:///{tmp_path / 'store.sqlite'}"
        first = spawner_for(ada, store_url, device_dir)
        second = spawner_for(bob, store_url, device_dir)
        asyncio.run(first.apply_gpuhub_options({"gpus": 1}))
        asyncio.run(second.apply_gpuhub_options({"gpus": 1}))
        store = Store.at(store_url)
        [ada_gpu] = [lease.device for lease in store.leases(ada)]
        [bob_gpu] = [lease.device for lease in store.leases(bob)]
        ada_file = f"nvidia{GPUS.index(ada_gpu)}"
        bob_file = f"nvidia{GPUS.index(bob_gpu)}"
        # each opens their own GPU, not the other's, not the free one, whatever
        # CUDA_VISIBLE_DEVICES says
        assert openable(ada, device_dir) == [ada_file]
        assert openable(bob, device_dir) == [bob_file]
        first.free_leases()  # the server stops, or its GPU is released
        assert openable(ada, device_dir) == []
        assert openable(bob, device_dir) == [bob_file]
        # a lease freed at a hub restart (its server gone) closes its file too
        second.leases_freed(store.free_leases(bob, ""))
        assert openable(bob, device_dir) == []
        # a device file that cannot be given: the spawn fails and holds no GPU
        (device_dir / "nvidia0").unlink()
        (device_dir / "nvidia1").unlink()
        (device_dir / "nvidia2").unlink()
        with pytest.raises(Exception, match="the GPU cannot be given to your server: no device"):
            asyncio.run(first.apply_gpuhub_options({"gpus": 1}))
        assert store.leases(ada) == []
    finally:
        del os.environ["GPUHUB_FAKE_NVML"]
        local._inventory_cache.clear()
