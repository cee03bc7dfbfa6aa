"""Running a real gpuhub JupyterHub in tests: start it as a subprocess with the demo
configuration, talk to its REST API, log in like a browser, and end every process a test run
started (hub, proxy, single-user servers, kernels, code-server), found by an environment marker."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from . import paths

RUN_MARKER = "GPUHUB_TEST_RUN"


#: Test hubs take their ports below the kernel's ephemeral port range (32768 and up on Linux),
#: where single-user servers and kernels get theirs, so a port chosen here cannot be taken by one
#: of them before the hub binds it.
TEST_PORT_RANGE = (20000, 32000)


#: Options of every single-user server a test hub starts (GPUHUB_DEMO_SERVER_ARGS).
TEST_SERVER_ARGS = "--GpuhubExtension.sample_interval=1 --GpuhubExtension.report_retry_max=2"


def free_port_block(size: int = 100) -> int:
    """A base port such that base, base+1, base+81 and base+82 are free (the demo's port layout:
    proxy, proxy API, hub, gpuhub service)."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(TEST_PORT_RANGE[0], TEST_PORT_RANGE[1] - size)
        ok = True
        for offset in (0, 1, 81, 82):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + offset))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


def free_port() -> int:
    """A free port on 127.0.0.1, chosen by the kernel."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_marked(marker: str) -> list[int]:
    """PIDs of the processes whose environment carries `GPUHUB_TEST_RUN=marker`."""
    needle = f"{RUN_MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def kill_marked(marker: str, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL, every process of a test run."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = processes_marked(marker)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + timeout
        while time.time() < deadline and processes_marked(marker):
            time.sleep(0.2)


class ServerProcess:
    """The lifecycle of a server a test starts (the hub, a single-user server): a subprocess in
    a session of its own with its output in a log file, up once a probe answers, stopped with
    SIGTERM, then SIGKILL for its whole process group."""

    process: subprocess.Popen | None
    log_path: Path | None

    def launch(
        self,
        command: list[str],
        *,
        env: dict[str, str],
        cwd: Path,
        log_path: Path,
        probe: Callable[[], bool],
        what: str,
        timeout: float = 60,
        interval: float = 0.3,
    ) -> None:
        """Start `command` and wait until `probe()` is true (a request that fails counts as
        not yet); `RuntimeError` if the process exits first, `TimeoutError` after `timeout`."""
        self.log_path = log_path
        log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if probe():
                    return
            except requests.RequestException:
                pass
            time.sleep(interval)
        raise TimeoutError(f"{what} did not come up in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@dataclass
class Hub(ServerProcess):
    """A gpuhub JupyterHub subprocess on 127.0.0.1."""

    state_dir: Path
    marker: str
    env_overrides: dict[str, str] = field(default_factory=dict)
    port: int = 0
    password: str = "gpuhub-test-password"
    admin_token: str = field(default_factory=lambda: uuid.uuid4().hex)
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/hub/api"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHUB_")}
        env.update(
            {
                "GPUHUB_STATE_DIR": str(self.state_dir),
                "GPUHUB_DEMO_PORT": str(self.port),
                "GPUHUB_DEMO_PASSWORD": self.password,
                "GPUHUB_DEMO_ADMIN_TOKEN": self.admin_token,
                "GPUHUB_DEMO_GPUS": "4",
                "GPUHUB_KEEP_SERVERS": "1",
                # The gpuhub service would act on the test's servers: tests that want it say so.
                "GPUHUB_DEMO_SERVICE": "off",
                # Test servers read their GPUs every second (not every 5 s) and, while the
                # service is not there yet (tests start it after the servers), try again every
                # 2 s at most (not every 60 s), so states and reports arrive without long waits.
                "GPUHUB_DEMO_SERVER_ARGS": TEST_SERVER_ARGS,
                RUN_MARKER: self.marker,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env_overrides)
        return env

    def start(self, timeout: float = 60) -> Hub:
        if not self.port:
            self.port = free_port_block()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = paths.config_dir() / "jupyterhub_config.py"
        jupyterhub = Path(sys.executable).with_name("jupyterhub")
        self.launch(
            [str(jupyterhub), "-f", str(config)],
            env=self.environment(),
            cwd=self.state_dir,
            log_path=self.state_dir / f"hub-{int(time.time() * 1000)}.log",
            probe=lambda: requests.get(f"{self.api}/", timeout=2).ok,
            what="the hub",
            timeout=timeout,
        )
        return self

    def stop(self, timeout: float = 30) -> None:
        """Stop the hub and its proxy (servers keep running: GPUHUB_KEEP_SERVERS=1)."""
        super().stop(timeout)

    # -- REST API ------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"token {self.admin_token}", **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 60)
        return requests.request(method, f"{self.api}{path}", headers=headers, **kwargs)

    def user(self, name: str) -> dict[str, Any]:
        r = self.request("GET", f"/users/{name}")
        r.raise_for_status()
        return r.json()

    def ensure_user(self, name: str) -> None:
        if self.request("GET", f"/users/{name}").status_code == 404:
            self.request("POST", f"/users/{name}").raise_for_status()

    def spawn(self, name: str, user_options: Any, server: str = "") -> requests.Response:
        self.ensure_user(name)
        return self.request(
            "POST",
            f"/users/{name}/servers/{server}",
            data=json.dumps({"user_options": user_options}),
        )

    def wait_ready(self, name: str, server: str = "", timeout: float = 180) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            model = self.user(name)["servers"].get(server)
            if model and model["ready"]:
                return model
            if model is None or (not model["pending"] and not model["ready"]):
                raise RuntimeError(
                    f"{name}/{server} is not starting: {model}\n{self.log()[-3000:]}"
                )
            time.sleep(0.5)
        raise TimeoutError(f"{name}/{server} not ready in {timeout} s:\n{self.log()[-3000:]}")

    def stop_server(self, name: str, server: str = "", timeout: float = 60) -> None:
        r = self.request("DELETE", f"/users/{name}/servers/{server}")
        if r.status_code not in (202, 204, 404):
            r.raise_for_status()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if server not in self.user(name)["servers"]:
                return
            time.sleep(0.3)
        raise TimeoutError(f"{name}/{server} did not stop")

    def stop_all_servers(self) -> None:
        """Stop every running server, all at once (each stop is waited for)."""
        r = self.request("GET", "/users", params={"state": "active"})
        if not r.ok:
            return
        servers = [
            (user["name"], server) for user in r.json() for server in user.get("servers", {})
        ]

        def stop(key: tuple[str, str]) -> None:
            with contextlib.suppress(Exception):  # best effort: kill_marked ends the rest
                self.stop_server(*key)

        if servers:
            with concurrent.futures.ThreadPoolExecutor(min(8, len(servers))) as pool:
                list(pool.map(stop, servers))

    def login(self, name: str, password: str | None = None) -> requests.Session:
        """A browser-like session logged in as `name` (groups come from the name's prefix)."""
        session = requests.Session()
        session.get(f"{self.url}/hub/login", timeout=30)
        xsrf = session.cookies.get("_xsrf", "")
        r = session.post(
            f"{self.url}/hub/login",
            data={"username": name, "password": password or self.password, "_xsrf": xsrf},
            timeout=30,
        )
        r.raise_for_status()
        if "jupyterhub-session-id" not in session.cookies and not any(
            c.name.startswith("jupyterhub-hub-login") for c in session.cookies
        ):
            raise RuntimeError(f"login of {name} failed: {r.status_code} {r.url}")
        return session


@dataclass
class CellResult:
    """What a cell did: the reply's status, its stdout, its value, and its error if it raised."""

    status: str | None = None
    stdout: str = ""
    result: str | None = None
    error: str | None = None
    traceback: list[str] = field(default_factory=list)


async def execute_cell(
    server_url: str,
    token: str,
    kernel_id: str,
    code: str,
    *,
    wait: bool = True,
    timeout: float = 120,
) -> CellResult:
    """Run `code` in a running kernel of the server at `server_url` (ending in `/`), as a browser
    does over the kernel's websocket. `wait=False` returns as soon as the kernel is busy with it."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    ws_url = (
        server_url.replace("http", "ws", 1)
        + f"api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}"
    )
    conn = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {token}"}))
    msg_id = uuid.uuid4().hex
    conn.write_message(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "username": "test",
                    "session": uuid.uuid4().hex,
                    "version": "5.3",
                    "date": "",
                },
                "parent_header": {},
                "metadata": {},
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": True,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    out = CellResult()
    got_reply = got_idle = False
    deadline = time.monotonic() + timeout
    try:
        while not (got_reply and got_idle):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"cell did not finish in {timeout} s: {code[:200]}")
            raw = await asyncio.wait_for(conn.read_message(), left)
            if raw is None:
                raise RuntimeError("the kernel websocket closed")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "busy" and not wait:
                return out
            if kind == "stream" and content["name"] == "stdout":
                out.stdout += content["text"]
            elif kind == "execute_result":
                out.result = content["data"].get("text/plain")
            elif kind == "error":
                out.error = f"{content['ename']}: {content['evalue']}"
                out.traceback = content["traceback"]
            elif kind == "status" and content["execution_state"] == "idle":
                got_idle = True
            elif kind == "execute_reply":
                out.status = content["status"]
                got_reply = True
    finally:
        conn.close()
    return out


def execute(
    server_url: str,
    token: str,
    kernel_id: str,
    code: str,
    *,
    wait: bool = True,
    timeout: float = 120,
) -> str:
    """`execute_cell` from synchronous code: the cell's stdout; raises if the cell raised.

    Runs in a thread of its own, so it also works where an event loop is running (Playwright's
    synchronous API keeps one in the test's thread)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        cell = pool.submit(
            asyncio.run,
            execute_cell(server_url, token, kernel_id, code, wait=wait, timeout=timeout),
        ).result()
    if cell.error:
        raise RuntimeError("\n".join(cell.traceback) or cell.error)
    return cell.stdout


def run_in_kernel(server_url: str, token: str, code: str, timeout: float = 120) -> str:
    """Start a kernel of the server's default kernelspec, run `code`, return its stdout."""
    headers = {"Authorization": f"token {token}"}
    r = requests.post(f"{server_url}api/kernels", headers=headers, json={}, timeout=60)
    r.raise_for_status()
    kernel_id = r.json()["id"]
    try:
        return execute(server_url, token, kernel_id, code, timeout=timeout)
    finally:
        requests.delete(f"{server_url}api/kernels/{kernel_id}", headers=headers, timeout=30)


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" in f.read()
    except FileNotFoundError:
        return True


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30,
    interval: float = 0.3,
    what: str = "",
    log: Callable[[], str] | None = None,
) -> Any:
    """The one polling helper of the tests: call `predicate` every `interval` seconds until it
    returns something true, and return that. `TimeoutError` after `timeout` seconds, saying what
    was awaited, the last value, and the end of `log()` (a server's log) when given."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    message = f"timed out after {timeout:g} s waiting for {what or predicate} (last: {last!r})"
    if log is not None:
        message += "\n" + log()[-3000:]
    raise TimeoutError(message)
