"""Helpers for the service tests: an in-process gpuhub service against a real hub, running code
in a server's kernels, simulated GPU activity, and an HTTP proxy that injects faults."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httpserver import HTTPServer
from traitlets.config import Config

from gpuhub import demo_gpu, nvml_fake
from gpuhub.service.app import GpuhubService
from gpuhub.settings import SHARED
from gpuhub.store import Store
from gpuhub.testing import Hub, execute, wait_for

FAST = {
    "request_timeout": 5.0,
    "connect_timeout": 3.0,
    "retries": 1,
    "retry_backoff": 0.1,
    "snapshot_timeout": 60.0,
    "stop_timeout": 60.0,
    "spawn_timeout": 120.0,
    "interval": 2.0,
    "snapshot_retry": 3600.0,
    "activity_interval": 0.5,
    "max_gap_seconds": 10.0,
    "command_timeout": 30.0,
}


class LiveService:
    """A gpuhub service whose web server (the servers' reports, the pages) and trusted-activity
    sampler run in a thread of their own, at the address the hub routes /services/gpuhub/ to;
    the tests drive its cycles (`cycle`)."""

    def __init__(self, service: GpuhubService) -> None:
        self.service = service
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                self.loop = asyncio.get_running_loop()
                self.stopping = asyncio.Event()
                server = service.listen()
                sampler = asyncio.create_task(service.sample_forever(self.stopping))
                ready.set()
                await self.stopping.wait()
                server.stop()
                service.board.close()
                sampler.cancel()
                await service.executor.wait()

            asyncio.run(main())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def call(self, make: Any, timeout: float = 600) -> Any:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(30)


@dataclass
class ServiceHub:
    """A hub whose gpuhub service the tests run themselves, with the service's token."""

    hub: Hub
    token: str
    service_port: int = 0
    live: LiveService | None = None

    @property
    def store(self) -> Store:
        return Store.at(self.store_url)

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.hub.state_dir / 'gpuhub.sqlite'}"

    @property
    def scenario(self) -> Path:
        return self.hub.state_dir / "simulated-gpus.json"

    def service(self, *, live: bool = True, **settings: Any) -> GpuhubService:
        """A service with the test's settings. `live`: serving at the hub's service address
        (servers report to it) until the next one, or `stop_service`."""
        c = Config()
        values = {
            "hub_api_url": self.hub.api,
            "api_token": self.token,
            "hub_public_url": self.hub.url,
            "store_url": self.store_url,
            "bind_url": f"http://127.0.0.1:{self.service_port}",
            "service_prefix": "/services/gpuhub/",
            **FAST,
            **settings,
        }
        for name, value in values.items():
            setattr(c.GpuhubConfig if name in SHARED else c.GpuhubService, name, value)
        service = GpuhubService(config=c)
        service.setup()
        if live:
            self.stop_service()
            self.live = LiveService(service)
            service.live = self.live  # type: ignore[attr-defined]
            self.prime(service)
        return service

    def prime(self, service: GpuhubService) -> None:
        """Let a new service hear from every running server, and read the GPUs long enough for
        its shortest GPU idle timeout (at most 5 s) to be reachable."""
        live = service.live  # type: ignore[attr-defined]
        try:
            running, _leases = live.call(service.refresh_targets)
        except Exception:  # a test that makes the hub's API fail
            return
        for server in running:
            self.wait_reported(service, server.user, server.server)
        time.sleep(min(5.0, service.gpu_idle_timeout, service.gpu_idle_timeout_under_demand) + 1.5)

    def stop_service(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def wait_reported(self, service: GpuhubService, name: str, server: str = "") -> None:
        """Wait until the server's current run has reported to `service`."""

        def reported() -> bool:
            model = self.model(name, server)
            if model is None:
                return False
            from gpuhub.service.servers import RunningServer

            return service.report_of(RunningServer(name, server, frozenset(), model)) is not None

        wait_for(reported, timeout=60, interval=0.2, what=f"{name}/{server} to report")

    def wait_idle_reported(self, service: GpuhubService, name: str, server: str = "") -> None:
        """Wait until `service`'s latest report of the server shows no kernel executing (a cell
        that just ran may be reported busy until the server's next reading)."""
        from gpuhub.service.servers import RunningServer

        def idle() -> bool:
            model = self.model(name, server)
            if model is None:
                return False
            report = service.report_of(RunningServer(name, server, frozenset(), model))
            return report is not None and not report.kernels_executing

        wait_for(idle, timeout=60, interval=0.2, what=f"{name}/{server}'s kernels idle, reported")

    # -- servers ---------------------------------------------------------------------------------

    def start(self, name: str, gpus: int = 1, server: str = "", **options: Any) -> dict[str, Any]:
        r = self.hub.spawn(name, {"gpus": gpus, **options}, server=server)
        assert r.status_code in (201, 202), r.text
        return self.hub.wait_ready(name, server)

    def model(self, name: str, server: str = "") -> dict[str, Any] | None:
        return self.hub.user(name)["servers"].get(server)

    def url(self, name: str, server: str = "") -> str:
        model = self.model(name, server)
        assert model is not None, f"{name}/{server} is not running"
        return f"{self.hub.url}{model['url']}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.hub.admin_token}"}

    def status(self, name: str, server: str = "") -> dict[str, Any]:
        r = requests.get(
            self.url(name, server) + "api/gpuhub/status", headers=self.headers(), timeout=30
        )
        r.raise_for_status()
        return r.json()

    def devices(self, name: str, server: str = "") -> list[str]:
        return list(self.model(name, server)["state"]["gpus"])

    def leases(self, name: str) -> list[str]:
        return [lease.device for lease in self.store.leases(name)]

    def wait_gpu_state(self, name: str, state: str, idle_for: float = 0.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.status(name)
            gpus = status["gpus"]
            if not gpus or any(g["state"] != state for g in gpus):
                return None
            if state == "idle" and any((g["idle_for_s"] or 0) < idle_for for g in gpus):
                return None
            return status

        return wait_for(check, timeout=60, interval=0.5, what=f"{name}'s GPU {state}")

    def set_util(self, device: str, util: float) -> None:
        scenario = json.loads(self.scenario.read_text())
        index = demo_gpu.find_gpu(scenario, device)
        nvml_fake.write_scenario(self.scenario, demo_gpu.apply(scenario, index, util))

    def open_notebook(self, name: str, path: str, server: str = "") -> str:
        """Open `path` as a notebook (a session with a kernel); returns the kernel id."""
        r = requests.post(
            self.url(name, server) + "api/sessions",
            headers=self.headers(),
            json={"path": path, "name": path, "type": "notebook", "kernel": {"name": "python3"}},
            timeout=60,
        )
        r.raise_for_status()
        kernel_id = r.json()["kernel"]["id"]
        wait_for(
            lambda: self._kernel_state(name, server, kernel_id) == "idle",
            timeout=120,
            what="the kernel to start",
        )
        return kernel_id

    def _kernel_state(self, name: str, server: str, kernel_id: str) -> str | None:
        r = requests.get(
            self.url(name, server) + f"api/kernels/{kernel_id}", headers=self.headers(), timeout=30
        )
        return r.json().get("execution_state") if r.ok else None

    def run(self, name: str, kernel_id: str, code: str, server: str = "", wait: bool = True) -> str:
        return execute(self.url(name, server), self.hub.admin_token, kernel_id, code, wait=wait)

    def read_file(self, name: str, path: str, server: str = "") -> str | None:
        r = requests.get(
            self.url(name, server) + f"api/contents/{path}",
            headers=self.headers(),
            params={"type": "file", "format": "text"},
            timeout=30,
        )
        return r.json()["content"] if r.ok else None

    def stop_everything(self) -> None:
        self.hub.stop_all_servers()


def last_line(output: str) -> str:
    """The last line a cell printed (an automatic restore prints its own line first)."""
    lines = output.strip().splitlines()
    return lines[-1] if lines else ""


def cycle(service: GpuhubService) -> list[Any]:
    """One service cycle, and every action it started, to the end (in the service's own event
    loop when it is live, where the servers' reports arrive)."""

    async def go() -> list[Any]:
        await service.sample_activity()
        actions = await service.run_cycle()
        await service.executor.wait()
        return actions

    live = getattr(service, "live", None)
    if live is not None:
        return live.call(go)
    return asyncio.run(go())


def metric(service: GpuhubService, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


# -- an HTTP proxy that injects faults ------------------------------------------------------------


@dataclass
class Fault:
    method: str  # "*" for any
    path: str  # regular expression searched in the path
    status: int | None = None  # answer this instead of forwarding
    delay: float = 0.0  # seconds before answering
    forward_first: bool = False  # forward the request, then delay the answer
    times: int | None = None  # how many requests it applies to (None: all)
    body: str | None = None  # regular expression the request body must contain
    hits: int = 0

    def matches(self, method: str, path: str, body: bytes = b"") -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.body is not None and re.search(self.body, body.decode("utf-8", "replace")) is None:
            return False
        return self.method in ("*", method) and re.search(self.path, path) is not None


class _Forward(web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")

    async def _handle(self) -> None:
        proxy: FaultProxy = self.settings["proxy"]
        method, path = self.request.method, self.request.path
        proxy.seen.append((method, self.request.uri))
        body = self.request.body or b""
        fault = next((f for f in proxy.faults if f.matches(method, path, body)), None)
        if fault is not None:
            fault.hits += 1
            if not fault.forward_first:
                await asyncio.sleep(fault.delay)
                if fault.status is not None:
                    self.set_status(fault.status)
                    self.finish(json.dumps({"status": fault.status, "message": "injected fault"}))
                    return
        client = AsyncHTTPClient()
        response = await client.fetch(
            HTTPRequest(
                proxy.target + self.request.uri,
                method=method,
                headers={k: v for k, v in self.request.headers.get_all() if k.lower() != "host"},
                body=self.request.body if method in ("POST", "PUT", "PATCH", "DELETE") else None,
                allow_nonstandard_methods=True,
                follow_redirects=False,
                request_timeout=600,
                decompress_response=False,
            ),
            raise_error=False,
        )
        if fault is not None and fault.forward_first:
            await asyncio.sleep(fault.delay)
        self.set_status(response.code if response.code != 599 else 502)
        for k, v in response.headers.get_all():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.add_header(k, v)
        self.finish(response.body or b"")

    get = post = put = patch = delete = head = options = _handle  # type: ignore[assignment]


@dataclass
class FaultProxy:
    """Forwards every request to `target` except those a `Fault` catches (at `port`, else at a
    free one)."""

    target: str
    faults: list[Fault] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                app = web.Application([(r".*", _Forward)], proxy=self)
                server = HTTPServer(app)
                sockets = __import__("tornado.netutil").netutil.bind_sockets(self.port, "127.0.0.1")
                self.port = sockets[0].getsockname()[1]
                server.add_sockets(sockets)
                ready.set()
                await self._stop.wait()
                server.stop()
                # a stopped proxy closes its connections (kept-alive ones too), as a process
                # that ends does
                await server.close_all_connections()

            asyncio.run(main())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


__all__ = ["FAST", "Fault", "FaultProxy", "ServiceHub", "cycle", "execute", "metric", "time"]
