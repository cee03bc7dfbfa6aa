"""A real jupyter server with gpuhub's extension reports to a real report endpoint (the service's
`ReportHandler`, with a stand-in for the hub's `GET /hub/api/user`) and carries out the commands
it gets: snapshot its kernels, write a notice into its home, list and delete snapshots."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from gpuhub import nvml_fake
from gpuhub.core import protocol
from gpuhub.service.reports import ReportBoard, ReportHandler, ServerAuthenticator

pytestmark = pytest.mark.slow

TOKEN = "server-token-of-ada"


class UserHandler(web.RequestHandler):
    def get(self) -> None:
        if self.request.headers.get("Authorization") != f"token {TOKEN}":
            self.set_status(403)
            self.finish({"message": "no"})
            return
        self.finish(
            {
                "kind": "user",
                "name": "ada",
                "scopes": ["access:servers!server=ada/", "access:services!service=gpuhub"],
            }
        )


class Service:
    """The report endpoint in a thread with its own event loop."""

    def __init__(self) -> None:
        self.board = ReportBoard()
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                self.loop = asyncio.get_running_loop()
                self.stopping = asyncio.Event()
                sockets = bind_sockets(0, "127.0.0.1")
                self.port = sockets[0].getsockname()[1]
                auth = ServerAuthenticator(f"http://127.0.0.1:{self.port}/hub/api", "gpuhub")
                app = web.Application(
                    [
                        (r"/hub/api/user", UserHandler),
                        (
                            r"/services/gpuhub/api/v1/servers/report",
                            ReportHandler,
                            {"board": self.board, "auth": auth, "max_hold": 30},
                        ),
                    ]
                )
                server = HTTPServer(app)
                server.add_sockets(sockets)
                ready.set()
                await self.stopping.wait()
                server.stop()

            asyncio.run(main())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/gpuhub/"

    def request(self, kind: str, args: dict[str, Any], timeout: float = 120) -> Any:
        future = asyncio.run_coroutine_threadsafe(
            self.board.request(("ada", ""), kind, args, timeout), self.loop
        )
        return future.result(timeout + 10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)


@pytest.fixture
def service():
    s = Service()
    yield s
    s.stop()


def reporting_server(jupyter_server, tmp_path, service, gpu):
    """A server with one idle simulated GPU that reports to `service` as ada's default server."""
    path = tmp_path / "gpus.json"
    nvml_fake.write_scenario(path, {"gpus": [gpu("GPU-0")]})
    return jupyter_server(
        env={
            "GPUHUB_FAKE_NVML": str(path),
            "GPUHUB_GPUS": "GPU-0",
            "GPUHUB_SERVICE_URL": service.url,
            "JUPYTERHUB_API_TOKEN": TOKEN,
            "JUPYTERHUB_SERVER_NAME": "",
        }
    )


def test_the_server_reports_and_carries_out_commands(jupyter_server, tmp_path, service, gpu):
    server = reporting_server(jupyter_server, tmp_path, service, gpu)
    server.wait_for(lambda: service.board.latest(("ada", ""), 60) is not None, timeout=30)
    kernel = server.open_notebook("work.ipynb")
    server.run_ok(kernel, "weights = [1, 2, 3]")
    result = service.request(protocol.SNAPSHOT, {"wait": False, "deadline_s": 0})
    assert result.ok, result
    outcome = protocol.parse_snapshot_result(result.data)
    [entry] = outcome.entries
    assert entry.status == "saved" and entry.saved and entry.kernel_id == kernel

    listing = service.request(protocol.SNAPSHOTS_LIST, {})
    [item] = protocol.parse_snapshot_listing(listing.data)
    assert item["snapshot"] == entry.snapshot

    notice = service.request(protocol.NOTICE, {"path": "GPUHUB-NOTICE.md", "text": "# hello"})
    assert notice.ok
    assert (server.home / "work" / "GPUHUB-NOTICE.md").read_text() == "# hello"
    # a notice never lands outside the server's root
    outside = service.request(protocol.NOTICE, {"path": "../escape.md", "text": "x"})
    assert not outside.ok and not (server.home / "escape.md").exists()

    gone = service.request(protocol.SNAPSHOTS_DELETE, {"key": item["key"], "name": "nope"})
    assert not gone.ok and gone.data["status"] in (400, 404)
    deleted = service.request(
        protocol.SNAPSHOTS_DELETE, {"key": item["key"], "name": item["snapshot"]}
    )
    assert deleted.ok
    assert protocol.parse_snapshot_listing(service.request(protocol.SNAPSHOTS_LIST, {}).data) == []


def test_a_running_cell_is_reported_at_once(jupyter_server, tmp_path, service, gpu):
    server = reporting_server(jupyter_server, tmp_path, service, gpu)
    kernel = server.open_notebook("work.ipynb")
    server.wait_for(lambda: service.board.latest(("ada", ""), 60) is not None, timeout=30)

    def executing() -> bool:
        report = service.board.latest(("ada", ""), 60)
        return report is not None and report.status.kernels_executing

    assert not executing()
    asyncio_thread = threading.Thread(
        target=lambda: server.execute(kernel, "import time; time.sleep(8)", timeout=30)
    )
    asyncio_thread.start()
    # the answer is held for 30 s, the change shows within a sampling interval or two
    server.wait_for(executing, timeout=6)
    asyncio_thread.join()
