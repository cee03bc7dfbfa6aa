"""A real gpuhub JupyterHub (GPUKubeSpawner) whose cluster is the emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from gpuhub.testing import Hub, free_port_block, wait_for

from .emulator import KubeEmulator

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


def emulator_path() -> str:
    """PATH of the emulated containers: this Python's scripts (jupyterhub-singleuser) first."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
