"""Fixtures for the single-user server extension: a real `jupyter server` subprocess with the
gpuhub extension, simulated GPUs (scenario files for the fake NVML), the `pytorch` catalogue
environment's interpreter as kernel, and a client that runs cells through the kernel websocket
like a browser does.

Tests marked `gpu` need a real NVIDIA driver. Where NVML finds no GPU they are deselected by
`pytest_collection_modifyitems` below, and the run's header says why.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from gpuhub import nvml, nvml_fake
from gpuhub.testing import ServerProcess, execute_cell, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PYTORCH_PYTHON = REPO / ".envs" / "pytorch" / "bin" / "python"
TENSORFLOW_PYTHON = REPO / ".envs" / "tensorflow" / "bin" / "python"


# -- the `gpu` marker ----------------------------------------------------------------------------


def _real_gpu() -> tuple[bool, str]:
    try:
        import pynvml
    except ImportError as e:
        return False, f"nvidia-ml-py is not installed ({e})"
    inventory = nvml.inventory(pynvml)
    if not inventory.available:
        return False, inventory.reason
    if not inventory.devices:
        return False, "NVML finds no GPU"
    return True, f"{len(inventory.devices)} GPU(s), driver {inventory.driver_version}"


_GPU = _real_gpu()


def pytest_report_header(config: pytest.Config) -> str:
    found, why = _GPU
    if found:
        return f"gpuhub server tests: real GPU tests run ({why})"
    return f"gpuhub server tests: `gpu` tests deselected: no GPU here ({why})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the `gpu` tests of this folder on a machine without a GPU."""
    if _GPU[0]:
        return
    mine = [i for i in items if HERE in Path(str(i.path)).parents and i.get_closest_marker("gpu")]
    if not mine:
        return
    config.hook.pytest_deselected(items=mine)
    items[:] = [i for i in items if i not in mine]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"gpuhub: deselected {len(mine)} `gpu` test(s): no GPU here ({_GPU[1]})",
            yellow=True,
        )


# -- scenarios -----------------------------------------------------------------------------------


def gpu(uuid_: str, **values: Any) -> dict[str, Any]:
    return {
        "uuid": uuid_,
        "name": "NVIDIA A100-SXM4-80GB (simulated)",
        "memory_total": 80 * 1024**3,
        "util": 0,
        "mem_util": 0,
        "memory_used": 0,
        "processes": [],
        **values,
    }


@pytest.fixture(name="gpu")
def gpu_fixture():
    """`gpu(uuid, **values)`: one simulated GPU of a scenario."""
    return gpu


@pytest.fixture
def scenario(tmp_path: Path):
    """Write a fake-NVML scenario; returns its path (rewrite it to change the GPUs live)."""
    path = tmp_path / "gpus.json"

    def write(gpus: list[dict[str, Any]], **extra: Any) -> Path:
        nvml_fake.write_scenario(path, {"driver_version": "560.35.03", "gpus": gpus, **extra})
        return path

    return write


# -- a jupyter server ----------------------------------------------------------------------------


def write_kernelspec(folder: Path) -> Path:
    """A Jupyter data folder with the `pytorch` and `tensorflow` environments' interpreters as
    kernels `pytorch` and `tensorflow`."""
    for name, python, display in (
        ("pytorch", PYTORCH_PYTHON, "PyTorch"),
        ("tensorflow", TENSORFLOW_PYTHON, "TensorFlow"),
    ):
        spec = folder / "kernels" / name
        spec.mkdir(parents=True, exist_ok=True)
        (spec / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": display,
                    "language": "python",
                    "env": {"TF_CPP_MIN_LOG_LEVEL": "2"},
                }
            )
        )
    return folder


class JupyterServer(ServerProcess):
    """`jupyter server` with the gpuhub extension, as a subprocess on 127.0.0.1 (started and
    stopped as the test hub is, `gpuhub.testing.ServerProcess`)."""

    def __init__(self, home: Path, env: dict[str, str], args: list[str]) -> None:
        self.home = home
        self.env = env
        self.args = args
        self.token = uuid.uuid4().hex
        self.port = 0
        self.process = None
        self.log_path = home / f"server-{time.time_ns()}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> JupyterServer:
        self.port = free_port()
        root = self.home / "work"
        root.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "jupyter_server",
            "--no-browser",
            "--allow-root",
            f"--port={self.port}",
            "--ip=127.0.0.1",
            f"--ServerApp.root_dir={root}",
            f"--IdentityProvider.token={self.token}",
            '--ServerApp.jpserver_extensions={"gpuhub.server": True}',
            *self.args,
        ]
        self.launch(
            command,
            env=self.env,
            cwd=root,
            log_path=self.home / f"server-{time.time_ns()}.log",
            probe=lambda: self.get("/api/status").ok,
            what="jupyter server",
            timeout=timeout,
            interval=0.2,
        )
        return self

    # -- REST -----------------------------------------------------------------------------------

    def request(self, method: str, path: str, token: str | None = "", **kw: Any):
        headers = kw.pop("headers", {})
        token = self.token if token == "" else token
        if token is not None:
            headers["Authorization"] = f"token {token}"
        kw.setdefault("timeout", 300)
        return requests.request(method, self.url + path, headers=headers, **kw)

    def get(self, path: str, **kw: Any):
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any):
        data = kw.pop("data", None)
        if data is None and body is not None:
            data = json.dumps(body)
        return self.request("POST", path, data=data if data is not None else "", **kw)

    def status(self) -> dict[str, Any]:
        r = self.get("/api/gpuhub/status")
        assert r.status_code == 200, r.text
        return r.json()

    def gpu_status(self, uuid_: str) -> dict[str, Any]:
        return next(g for g in self.status()["gpus"] if g["uuid"] == uuid_)

    def wait_for(self, predicate, timeout: float = 30, interval: float = 0.3) -> Any:
        """`gpuhub.testing.wait_for` with this server's log in its error."""
        return wait_for(predicate, timeout, interval, log=self.log)

    # -- notebooks and kernels ------------------------------------------------------------------

    def open_notebook(self, path: str, kernel: str = "pytorch") -> str:
        """Create a session for notebook `path` (as opening it in JupyterLab does); kernel id."""
        r = self.post(
            "/api/sessions",
            {"path": path, "name": Path(path).name, "type": "notebook", "kernel": {"name": kernel}},
        )
        assert r.status_code == 201, r.text
        return r.json()["kernel"]["id"]

    def close_all(self) -> None:
        for session in self.get("/api/sessions").json():
            self.request("DELETE", f"/api/sessions/{session['id']}")

    def execute(self, kernel_id: str, code: str, timeout: float = 180) -> dict[str, Any]:
        """Run a cell through the kernel's websocket; {"status", "stdout", "error", "result"}."""
        cell = asyncio.run(
            execute_cell(
                f"http://127.0.0.1:{self.port}/", self.token, kernel_id, code, timeout=timeout
            )
        )
        return {
            "status": cell.status,
            "stdout": cell.stdout,
            "error": cell.error,
            "result": cell.result,
        }

    def run_ok(self, kernel_id: str, code: str, timeout: float = 180) -> dict[str, Any]:
        out = self.execute(kernel_id, code, timeout)
        assert out["status"] == "ok", f"{out}\n{self.log()[-3000:]}"
        return out

    def kernel_pid(self, kernel_id: str) -> int:
        out = self.run_ok(kernel_id, "import os; print(os.getpid())")
        return int(out["stdout"].strip())


def make_server_env(base: Path) -> dict[str, str]:
    """The environment of a server process: its own HOME, the pytorch kernel, no GPU env."""
    home = base / "home"
    home.mkdir(parents=True, exist_ok=True)
    data = write_kernelspec(base / "jupyter-data")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUHUB_", "JUPYTER_"))}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(
        {
            "HOME": str(home),
            "JUPYTER_PATH": str(data),
            "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
            "JUPYTER_RUNTIME_DIR": str(home / ".local" / "share" / "jupyter" / "runtime"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    # keep the test-run marker: the session fixture ends every marked process
    if "GPUHUB_TEST_RUN" in os.environ:
        env["GPUHUB_TEST_RUN"] = os.environ["GPUHUB_TEST_RUN"]
    return env


def new_server(env: dict[str, str], args: list[str] | None = None) -> JupyterServer:
    return JupyterServer(
        Path(env["HOME"]), env, ["--GpuhubExtension.sample_interval=0.5", *(args or [])]
    )


@pytest.fixture
def server_env(tmp_path: Path) -> dict[str, str]:
    return make_server_env(tmp_path)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server with one idle simulated GPU, for tests that only need a running server."""
    base = tmp_path_factory.mktemp("shared-server")
    path = base / "gpus.json"
    nvml_fake.write_scenario(path, {"gpus": [gpu("GPU-0")]})
    server = new_server({**make_server_env(base), "GPUHUB_FAKE_NVML": str(path)}).start()
    yield server
    server.stop()


@pytest.fixture
def jupyter_server(tmp_path: Path, server_env: dict[str, str]):
    """Factory: `jupyter_server(env={...}, args=[...])` -> a started JupyterServer. Every server
    started is stopped at the end of the test."""
    started: list[JupyterServer] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None) -> JupyterServer:
        server = new_server({**server_env, **(env or {})}, args)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
