"""One loop cycle of the gpuhub service for 100 / 1,000 / 5,000 users with ready servers, against a
real JupyterHub (subprocess, configurable-http-proxy, SQLite), next to one pass of
jupyterhub-idle-culler on the same hub.

The servers are cheap: every user's server is one shared fake single-user server, a small tornado
process started by this script. The hub's spawner (`SharedFakeSpawner`, in the generated hub
config) returns that process's address from `start()`, so JupyterHub adds a proxy route per user
and treats each server as ready, without 5,000 processes. The fake answers every
`/user/<name>/api/gpuhub/status` with a status document in the extension's shape (half the GPUs
idle for an hour, half busy), and anything else with 200. The users are spawned through the hub's
REST API with `{"gpus": 1, "gpu_type": "gpu"}` as user options.

Measured, per size (median of `--repeat` runs):
- gpuhub list: `HubClient.ready_users()` alone (the paginated `GET /users?state=ready`);
- gpuhub cycle: `GpuhubService.run_cycle()` with `--dry-run` (list, read every server's status
  through the proxy, read the store, decide; nothing carried out);
- idle-culler pass: `jupyterhub_idle_culler.cull_idle(...)` with a timeout no server reaches (it
  lists the users the same way and looks at each server's `last_activity`; it does not contact
  the servers).

    .venv/bin/python benchmarks/service_cycle.py                    # 100, 1000, 5000 users
    .venv/bin/python benchmarks/service_cycle.py --sizes 20 --repeat 1   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpuhub.testing import free_port_block  # noqa: E402

HUB_CONFIG = """
import os
from jupyterhub.spawner import Spawner
from gpuhub.service.scopes import service_role

class SharedFakeSpawner(Spawner):
    '''Every server is the one fake process at $BENCH_FAKE_PORT: cheap "ready" servers.'''

    async def start(self):
        return ("127.0.0.1", int(os.environ["BENCH_FAKE_PORT"]))

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None

port = int(os.environ["BENCH_PORT"])
c.JupyterHub.bind_url = f"http://127.0.0.1:{port}"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{port + 81}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{port + 1}"
c.JupyterHub.db_url = "sqlite:///jupyterhub.sqlite"
c.JupyterHub.spawner_class = SharedFakeSpawner
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.concurrent_spawn_limit = 0
c.JupyterHub.cleanup_servers = True
c.JupyterHub.log_level = "WARN"
c.JupyterHub.services = [
    {"name": "bench-admin", "api_token": os.environ["BENCH_ADMIN_TOKEN"]},
    {"name": "gpuhub", "api_token": os.environ["BENCH_GPUHUB_TOKEN"]},
    {"name": "idle-culler", "api_token": os.environ["BENCH_CULLER_TOKEN"]},
]
c.JupyterHub.load_roles = [
    {"name": "admin", "services": ["bench-admin"]},
    service_role("gpuhub"),
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    },
]
"""


def fake_server(port: int) -> None:
    """The shared fake single-user server (run in its own process)."""
    from tornado import ioloop, web

    hour_ago = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 3600))

    def status(user: str) -> dict:
        idle = sum(map(ord, user)) % 2 == 0
        return {
            "version": 1,
            "gpus": [
                {
                    "uuid": f"GPU-{user}",
                    "state": "idle" if idle else "busy",
                    "idle_since": hour_ago if idle else None,
                    "idle_for_s": 3600.0 if idle else None,
                    "utilization": {"gpu": 0.0 if idle else 80.0, "busy_fraction": 0.0},
                }
            ],
            "kernels": [],
            "external_processes": [],
            "busy": not idle,
        }

    class Status(web.RequestHandler):
        def get(self, user: str) -> None:
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(status(user)))

    class Anything(web.RequestHandler):
        def get(self, *args: str) -> None:
            self.finish("{}")

    app = web.Application(
        [(r"/user/([^/]+)/api/gpuhub/status", Status), (r"/(.*)", Anything)],
        log_function=lambda handler: None,
    )
    app.listen(port, "127.0.0.1")
    ioloop.IOLoop.current().start()


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port_block()
        self.fake_port = free_port_block(1)
        self.admin = uuid.uuid4().hex
        self.gpuhub_token = uuid.uuid4().hex
        self.culler_token = uuid.uuid4().hex
        self.processes: list[subprocess.Popen] = []
        self.users = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/hub/api"

    def start(self) -> None:
        (self.workdir / "jupyterhub_config.py").write_text(HUB_CONFIG)
        env = {
            **os.environ,
            "PATH": os.pathsep.join(
                [
                    str(Path(sys.executable).parent),
                    str(ROOT / "node_modules" / ".bin"),
                    os.environ.get("PATH", ""),
                ]
            ),
            "BENCH_PORT": str(self.port),
            "BENCH_FAKE_PORT": str(self.fake_port),
            "BENCH_ADMIN_TOKEN": self.admin,
            "BENCH_GPUHUB_TOKEN": self.gpuhub_token,
            "BENCH_CULLER_TOKEN": self.culler_token,
        }
        self.processes.append(
            subprocess.Popen(
                [sys.executable, __file__, "--fake-server", str(self.fake_port)],
                start_new_session=True,
            )
        )
        log = open(self.workdir / "hub.log", "w")  # noqa: SIM115
        self.processes.append(
            subprocess.Popen(
                [str(Path(sys.executable).with_name("jupyterhub")), "-f", "jupyterhub_config.py"],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(f"{self.api}/", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError("the hub did not start:\n" + (self.workdir / "hub.log").read_text())

    def stop(self) -> None:
        for p in reversed(self.processes):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)

    async def grow(self, total: int, concurrency: int = 20) -> float:
        """Create and spawn users up to `total`; returns seconds taken."""
        from tornado.httpclient import AsyncHTTPClient, HTTPRequest

        started = time.perf_counter()
        names = [f"user-{i:05d}" for i in range(self.users, total)]
        client = AsyncHTTPClient(force_instance=True, max_clients=concurrency)
        headers = {"Authorization": f"token {self.admin}"}
        for i in range(0, len(names), 500):
            await client.fetch(
                HTTPRequest(
                    f"{self.api}/users",
                    method="POST",
                    headers=headers,
                    body=json.dumps({"usernames": names[i : i + 500]}),
                    request_timeout=300,
                )
            )
        slots = asyncio.Semaphore(concurrency)

        async def spawn(name: str) -> None:
            async with slots:
                r = await client.fetch(
                    HTTPRequest(
                        f"{self.api}/users/{name}/server",
                        method="POST",
                        headers=headers,
                        body=json.dumps({"user_options": {"gpus": 1, "gpu_type": "gpu"}}),
                        request_timeout=300,
                    ),
                    raise_error=False,
                )
                if r.code not in (201, 202):
                    raise RuntimeError(f"spawn of {name}: {r.code} {r.body[:200]!r}")

        await asyncio.gather(*(spawn(n) for n in names))
        while True:  # until every server is ready
            r = await client.fetch(
                HTTPRequest(
                    f"{self.api}/users?state=ready&limit=1",
                    headers={**headers, "Accept": "application/jupyterhub-pagination+json"},
                )
            )
            if json.loads(r.body)["_pagination"]["total"] >= total:
                break
            await asyncio.sleep(0.5)
        client.close()
        self.users = total
        return time.perf_counter() - started


async def measure(bench: Bench, repeat: int, store_url: str) -> dict:
    from jupyterhub_idle_culler import cull_idle
    from traitlets.config import Config

    from gpuhub.service.app import GpuhubService

    c = Config()
    c.GpuhubService.hub_api_url = bench.api
    c.GpuhubService.api_token = bench.gpuhub_token
    c.GpuhubService.proxy_url = bench.url
    c.GpuhubConfig.store_url = store_url
    c.GpuhubService.dry_run = True
    c.GpuhubService.request_timeout = 120.0
    c.GpuhubService.status_timeout = 60.0
    c.GpuhubService.gpu_totals = {"gpu": bench.users}
    service = GpuhubService(config=c)
    service.setup()

    lists, cycles, culls = [], [], []
    decided = 0
    for _ in range(repeat):
        t = time.perf_counter()
        users = await service.client.ready_users()
        lists.append(time.perf_counter() - t)
        assert len(users) == bench.users, (len(users), bench.users)

        t = time.perf_counter()
        actions = await service.run_cycle()
        cycles.append(time.perf_counter() - t)
        assert service.last_error is None, service.last_error
        decided = len(actions)
        readable = service.metrics.registry.get_sample_value(
            "gpuhub_servers", {"status": "readable"}
        )
        assert readable == bench.users, (readable, bench.users)

        t = time.perf_counter()
        await cull_idle(
            url=bench.api,
            api_token=bench.culler_token,
            inactive_limit=10**9,
            logger=logging.getLogger("idle-culler"),
            concurrency=10,
        )
        culls.append(time.perf_counter() - t)
    service.client.close()
    return {
        "users": bench.users,
        "gpuhub_list_s": statistics.median(lists),
        "gpuhub_cycle_s": statistics.median(cycles),
        "idle_culler_pass_s": statistics.median(culls),
        "decisions": decided,
    }


async def run(sizes: list[int], repeat: int, workdir: Path) -> list[dict]:
    bench = Bench(workdir)
    bench.start()
    results = []
    try:
        for size in sizes:
            grow_s = await bench.grow(size)
            print(f"# {size} users with ready servers ({grow_s:.0f} s to spawn)", file=sys.stderr)
            result = await measure(bench, repeat, f"sqlite:///{workdir / 'gpuhub.sqlite'}")
            result["spawn_s"] = grow_s
            results.append(result)
            print(json.dumps(result), file=sys.stderr)
    finally:
        bench.stop()
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| users with ready servers | gpuhub: list users | gpuhub: full cycle (list + status of "
        "every server + decide) | idle-culler: one pass |",
        "|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['users']:,} | {r['gpuhub_list_s']:.2f} s | {r['gpuhub_cycle_s']:.2f} s | "
            f"{r['idle_culler_pass_s']:.2f} s |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--fake-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_server:
        fake_server(args.fake_server)
        return 0
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="gpuhub-bench-"))
    try:
        results = asyncio.run(run(sorted(args.sizes), args.repeat, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}"
        )
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
