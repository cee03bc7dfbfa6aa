"""Fixtures for GPUKubeSpawner tests: spawners built without a cluster, a store per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from k8s_emulator import KubeEmulator
from k8s_emulator.hub import GPU_TAINT, KubeHub, emulator_path
from traitlets.config import Config

from gpuhub import paths

KUBE_CATALOG = paths.config_dir() / "catalog-kubernetes.yaml"


def fake_user(name: str = "ada", groups: tuple[str, ...] = ()) -> SimpleNamespace:
    return SimpleNamespace(
        name=name,
        id=1,
        url=f"/user/{name}/",
        groups=[SimpleNamespace(name=g) for g in groups],
        spawners={},
    )


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gpuhub.sqlite'}"


@pytest.fixture
def no_kube_config() -> Iterator[None]:
    """KubeSpawner without a cluster: its client configuration is never loaded."""
    with mock.patch("kubespawner.spawner.load_config"):
        yield


@pytest.fixture
def make_spawner(no_kube_config: None, store_url: str):  # type: ignore[no-untyped-def]
    """`make_spawner(user="ada", server="", **traits)`: a GPUKubeSpawner that builds manifests
    (call it inside a running event loop, i.e. from an async test)."""
    from gpuhub.spawner.kube import GPUKubeSpawner

    def make(user: str = "ada", server: str = "", **traits: Any) -> GPUKubeSpawner:
        config = Config()
        config.GpuhubConfig.catalog_file = traits.pop("catalog_file", str(KUBE_CATALOG))
        config.GpuhubConfig.store_url = traits.pop("store_url", store_url)
        traits.setdefault("watch_gpu_capacity", False)
        orm_spawner = SimpleNamespace(name=server, user_options=None, server=None, state=None)
        return GPUKubeSpawner(
            _mock=True, user=fake_user(user), orm_spawner=orm_spawner, config=config, **traits
        )

    return make


# -- a real JupyterHub against the emulated cluster -----------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory, run_marker: str) -> Iterator[KubeEmulator]:
    """An emulated cluster: two A100 nodes (2 + 1 GPUs, tainted), a time-sliced T4 node, a MIG
    node and a CPU node; its kubelet runs real single-user servers."""
    em = KubeEmulator(
        tmp_path_factory.mktemp("cluster"),
        run_containers=True,
        container_env={"PATH": emulator_path()},
    ).start()
    em.add_node(
        "a100-0",
        {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        {"nvidia.com/gpu": 2},
        [GPU_TAINT],
    )
    em.add_node(
        "a100-1",
        {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        {"nvidia.com/gpu": 1},
        [GPU_TAINT],
    )
    em.add_node(
        "t4-0",
        {"nvidia.com/gpu.product": "Tesla-T4-SHARED"},
        {"nvidia.com/gpu.shared": 4},
        [GPU_TAINT],
    )
    em.add_node(
        "mig-0",
        {"nvidia.com/mig.strategy": "mixed"},
        {"nvidia.com/mig-1g.10gb": 7, "nvidia.com/mig-3g.40gb": 2},
        [GPU_TAINT],
    )
    em.add_node("cpu-0")
    yield em
    em.stop()


@pytest.fixture(scope="module")
def kube_hub(
    tmp_path_factory: pytest.TempPathFactory, run_marker: str, emulator: KubeEmulator
) -> Iterator[KubeHub]:
    hub = KubeHub(tmp_path_factory.mktemp("kubehub"), run_marker, emulator=emulator).start()
    yield hub
    hub.stop_all_servers()
    hub.stop()
