"""Fixtures for GPUKubeSpawner tests: spawners built without a cluster, a store per test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import requests
from k8s_emulator import KubeEmulator

from gpuhub import paths
from gpuhub.testing import Hub, free_port_block, wait_for

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
        traits.setdefault("catalog_file", str(KUBE_CATALOG))
        traits.setdefault("store_url", store_url)
        traits.setdefault("watch_gpu_capacity", False)
        orm_spawner = SimpleNamespace(name=server, user_options=None, server=None, state=None)
        return GPUKubeSpawner(_mock=True, user=fake_user(user), orm_spawner=orm_spawner, **traits)

    return make


# -- a real JupyterHub against the emulated cluster -----------------------------------------------

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@dataclass
class KubeHub(Hub):
    """A JupyterHub subprocess with GPUKubeSpawner, its cluster emulated by `emulator`."""

    emulator: KubeEmulator | None = None
    spawner_config: dict[str, Any] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        env = super().environment()
        assert self.emulator is not None
        env["KUBECONFIG"] = str(self.emulator.kubeconfig(self.state_dir / "kubeconfig"))
        env["GPUHUB_TEST_CONFIG"] = json.dumps(self.spawner_config)
        env.pop("KUBERNETES_SERVICE_HOST", None)
        return env

    def start(self, timeout: float = 60) -> KubeHub:
        if not self.port:
            self.port = free_port_block()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.state_dir / f"hub-{int(time.time() * 1000)}.log"
        jupyterhub = Path(sys.executable).with_name("jupyterhub")
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [str(jupyterhub), "-f", str(HUB_CONFIG)],
                cwd=self.state_dir,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(
            lambda: self._up(),
            timeout,
            what=f"the hub to answer:\n{self.log()[-3000:]}",
        )
        return self

    def _up(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the hub exited with {self.process.returncode}:\n{self.log()}")
        try:
            return requests.get(f"{self.api}/", timeout=2).ok
        except requests.RequestException:
            return False

    def progress(self, name: str, server: str = "", timeout: float = 120) -> list[dict[str, Any]]:
        """The spawn's progress events until it is ready or failed."""
        events = []
        with self.request(
            "GET", f"/users/{name}/servers/{server}/progress", stream=True, timeout=timeout
        ) as r:
            r.raise_for_status()
            for line in r.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    event = json.loads(line[5:])
                    events.append(event)
                    if event.get("ready") or event.get("failed"):
                        break
        return events

    def server_request(
        self, method: str, name: str, path: str, server: str = "", **kwargs: Any
    ) -> requests.Response:
        """A request to the user's own server, through the proxy (really reaching it)."""
        headers = {"Authorization": f"token {self.admin_token}", **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 30)
        prefix = f"/user/{name}/{server}/" if server else f"/user/{name}/"
        return requests.request(method, f"{self.url}{prefix}{path}", headers=headers, **kwargs)


HUB_CONFIG = Path(__file__).with_name("jupyterhub_config.py")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory, run_marker: str) -> Iterator[KubeEmulator]:
    """An emulated cluster: two A100 nodes (2 + 1 GPUs, tainted), a time-sliced T4 node, a MIG
    node and a CPU node; its kubelet runs real single-user servers."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    em = KubeEmulator(
        tmp_path_factory.mktemp("cluster"), run_containers=True, container_env={"PATH": path}
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
