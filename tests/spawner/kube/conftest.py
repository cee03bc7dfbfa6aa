"""Fixtures for GPUKubeSpawner tests: spawners built without a cluster, a store per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from k8s_emulator import KubeEmulator
from k8s_emulator.hub import KubeHub
from k8s_envtest.backends import add_standard_nodes, start_cluster
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
    """An emulated cluster with the standard nodes; its kubelet runs real single-user servers."""
    em = start_cluster("emulated", tmp_path_factory.mktemp("cluster"))
    add_standard_nodes(em)
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
