"""The gpuhub service's costs for 100 / 1,000 / 5,000 users with ready servers that report to it,
against a real JupyterHub (subprocess, configurable-http-proxy, SQLite), next to one pass of
jupyterhub-idle-culler on the same hub.

The servers are cheap: every user's server is one shared fake single-user server, a small tornado
process started by this script that answers the hub's readiness checks. The hub's spawner
(`SharedFakeSpawner`, in the generated hub config) returns that process's address from `start()`,
so JupyterHub adds a proxy route per user and treats each server as ready, without 5,000
processes. Each server gets its own token from the hub, with gpuhub's `server_token_scopes`
(`access:services!service=gpuhub` included); the spawner writes it to a file for the report load
generator. The users are spawned through the hub's REST API with `{"gpus": 1, "gpu_type": "gpu"}`.

The gpuhub service runs in this process (`--dry-run`, its default concurrency, its web server with
the pages installed, a SQLite store); the reports come from a separate load-generator process that
posts, for every server and with that server's own token, a status document in the extension's
shape to `<service>/services/gpuhub/api/v1/servers/report?server=&wait=0` over real HTTP (the
service's own port, not through the proxy): the real `ReportHandler`, its authentication with the
hub (`GET /hub/api/user`, cached) and `gpuhub.core.protocol`'s parser.

Measured, per size:
- reports, cold: every server reports once, and the service shows every token to the hub (the
  board is filled this way: the cycle reads only what came in over HTTP); reports per second, the
  service's CPU per report, and the hub's CPU per token check (the hub's CPU over the pass, its
  own background work included, divided by the checks counted);
- reports, warm: every server reports `--warm-rounds` more times, every token from the cache (no
  hub check, counted): reports per second and the service's CPU per report. From both, the share
  of a core 5,000 servers reporting every 30 s (the default hold) take: one report in ten cold
  (the cache keeps an answer 300 s, `report_auth_cache`);
- trusted sampler: one `GpuhubService.sample_activity()` pass with a synthetic activity source
  standing in for NVML / dcgm-exporter (one reading per server's GPU; the source's own I/O is not
  measured, the service's target list and `ActivityTracker` are), median over the passes that
  fill an hour of history (a reading every 30 s, half the GPUs idle throughout, half busy); it
  runs every `activity_interval` (10 s), six times per 60 s cycle;
- gpuhub list: `HubClient.ready_users()` alone (the paginated `GET /users?state=ready`);
- gpuhub cycle: `GpuhubService.run_cycle()` (list, take every server's report and trusted
  readings, read the store, decide; nothing carried out), wall and CPU time of this process;
- idle-culler pass: `jupyterhub_idle_culler.cull_idle(...)` with a timeout no server reaches (it
  lists the users the same way and looks at each server's `last_activity`).
List, cycle and idle-culler pass are medians of `--repeat` runs, taken in turn.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpuhub.testing import free_port_block  # noqa: E402

HOLD_S = 30.0  # the servers' default report hold (GpuhubExtension.report_hold)
AUTH_CACHE_S = 300.0  # the service's default report_auth_cache
CYCLE_S = 60.0  # the service's default interval
ACTIVITY_INTERVAL_S = 10.0  # the service's default activity_interval
PREFIX = "/services/gpuhub/"

HUB_CONFIG = """
import os
from jupyterhub.spawner import Spawner
from gpuhub.service.scopes import server_token_scopes, service_role

class SharedFakeSpawner(Spawner):
    '''Every server is the one fake process at $BENCH_FAKE_PORT: cheap "ready" servers. Its own
    token (what the extension reports with) goes to $BENCH_TOKENS for the load generator.'''

    async def start(self):
        with open(os.environ["BENCH_TOKENS"], "a") as f:
            f.write(f"{self.user.name}\\t{self.name}\\t{self.api_token}\\n")
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
c.Spawner.server_token_scopes = server_token_scopes("gpuhub")
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.concurrent_spawn_limit = 0
c.JupyterHub.cleanup_servers = True
c.JupyterHub.log_level = "WARN"
c.JupyterHub.services = [
    {"name": "bench-admin", "api_token": os.environ["BENCH_ADMIN_TOKEN"]},
    {"name": "gpuhub", "api_token": os.environ["BENCH_GPUHUB_TOKEN"],
     "url": f"http://127.0.0.1:{port + 82}"},
    {"name": "idle-culler", "api_token": os.environ["BENCH_CULLER_TOKEN"]},
]
c.JupyterHub.load_roles = [
    {"name": "admin", "services": ["bench-admin"]},
    # a server's token holds no more than its user: users may reach the service (as with gpuhub's
    # pages, gpuhub.service.web.hub_config)
    {"name": "user", "scopes": ["self", "access:services!service=gpuhub"]},
    service_role("gpuhub"),
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    },
]
"""


def is_idle(user: str) -> bool:
    """Half the servers' GPUs idle (for an hour), half busy."""
    return sum(map(ord, user)) % 2 == 0


def gpu_uuid(user: str) -> str:
    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, user)}"


def status_document(user: str, now: float) -> dict[str, Any]:
    """A status document in the extension's shape (`gpuhub.server.handlers.StatusHandler`): one
    GPU, two kernels, nothing outside them."""

    def iso(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))

    idle = is_idle(user)
    gpu = gpu_uuid(user)
    return {
        "version": 1,
        "now": iso(now),
        "started": iso(now - 7200),
        "interface": "lab",
        "environment": "pytorch",
        "gpu_type": "gpu",
        "nvml": {
            "available": True,
            "reason": "",
            "driver_version": "550.54.15",
            "simulated": False,
            "sample_interval_s": 5.0,
            "sampled_at": iso(now),
        },
        "rule": {
            "util_threshold": 5.0,
            "mem_util_threshold": 1.0,
            "min_busy_s": 60.0,
            "window_s": 3600.0,
            "max_gap_s": 60.0,
        },
        "gpus": [
            {
                "uuid": gpu,
                "index": 0,
                "name": "NVIDIA A100-SXM4-80GB",
                "mig": False,
                "parent_uuid": None,
                "simulated": False,
                "state": "idle" if idle else "busy",
                "reason": "",
                "idle_since": iso(now - 3600) if idle else None,
                "idle_for_s": 3600.0 if idle else None,
                "utilization": {
                    "gpu": 0.0 if idle else 80.0,
                    "memory": 0.0 if idle else 40.0,
                    "busy_fraction": 0.0 if idle else 1.0,
                    "window_s": 3600.0,
                    "source": "samples",
                },
                "memory": {"used": 2_000_000_000, "total": 85_899_345_920},
                "processes": [
                    {"pid": 4242, "used_memory": 2_000_000_000, "kernel_id": "k1", "local": True}
                ],
                "processes_listed": True,
            }
        ],
        "kernels": [
            {
                "id": kernel,
                "name": "python3",
                "execution_state": "idle",
                "last_activity": iso(now - 3600),
                "connections": 1,
                "notebook": f"work/{kernel}.ipynb",
                "python": True,
                "pid": 4242 if kernel == "k1" else 4343,
                "gpus": [gpu] if kernel == "k1" else [],
                "last_restore": None,
            }
            for kernel in ("k1", "k2")
        ],
        "external_processes": [],
        "busy": not idle,
        "busy_reasons": [] if idle else ["GPU busy"],
        "last_gpu_activity": iso(now - (3600 if idle else 0)),
    }


def fake_server(port: int) -> None:
    """The shared fake single-user server (run in its own process): 200 to the hub's checks."""
    from tornado import ioloop, web

    class Anything(web.RequestHandler):
        def get(self, *args: str) -> None:
            self.finish("{}")

    app = web.Application([(r"/(.*)", Anything)], log_function=lambda handler: None)
    app.listen(port, "127.0.0.1")
    ioloop.IOLoop.current().start()


def report_load(service_url: str, tokens_file: str, rounds: int, concurrency: int) -> None:
    """The load generator (run in its own process): every server posts its report `rounds`
    times, with its own token, as the extension does (a new connection per report, tornado's
    client). Prints one JSON object: seconds, reports, failures by status."""
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    from gpuhub.core import protocol

    servers = [line.split("\t") for line in Path(tokens_file).read_text().splitlines() if line]
    now = time.time()
    requests_ = [
        HTTPRequest(
            protocol.report_url(service_url, name, 0),
            method="POST",
            body=json.dumps(
                {"version": protocol.VERSION, "status": status_document(user, now), "results": []}
            ),
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
            request_timeout=120,
            connect_timeout=60,
        )
        for user, name, token in servers
    ]

    async def go() -> dict[str, Any]:
        client = AsyncHTTPClient(force_instance=True, max_clients=concurrency)
        slots = asyncio.Semaphore(concurrency)
        failures: dict[str, int] = {}

        async def post(request: HTTPRequest) -> None:
            async with slots:
                r = await client.fetch(request, raise_error=False)
                if r.code != 200:
                    key = f"{r.code} {(r.body or b'')[:120].decode('utf-8', 'replace')}"
                    failures[key] = failures.get(key, 0) + 1

        started = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(post(r) for r in requests_))
        seconds = time.perf_counter() - started
        client.close()
        return {"seconds": seconds, "reports": rounds * len(requests_), "failures": failures}

    print(json.dumps(asyncio.run(go())))


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its waited-for children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


class SyntheticSource:
    """Stands in for the trusted source (NVML on the hub host, dcgm-exporter through Prometheus):
    one reading per server's GPU at `self.at`, half idle, half busy. Its own I/O is not what is
    measured; the service's side of a sampling pass is."""

    def __init__(self) -> None:
        self.at = time.time()

    async def sample(self, targets: Sequence[Any]) -> dict[tuple[str, str], list[Any]]:
        from gpuhub.activity import GpuSample

        out = {}
        for t in targets:
            idle = is_idle(t.user)
            util, mem = (0.0, 0.0) if idle else (80.0, 40.0)
            out[t.key] = [GpuSample(gpu_uuid(t.user), util, 2_000_000_000, self.at, mem)]
        return out

    def close(self) -> None:
        return


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port_block()
        self.fake_port = free_port_block(1)
        self.admin = uuid.uuid4().hex
        self.gpuhub_token = uuid.uuid4().hex
        self.culler_token = uuid.uuid4().hex
        self.tokens_file = workdir / "server-tokens.tsv"
        self.processes: list[subprocess.Popen] = []
        self.users = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/hub/api"

    @property
    def service_bind(self) -> str:
        return f"http://127.0.0.1:{self.port + 82}"

    @property
    def hub_pid(self) -> int:
        return self.processes[1].pid

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
            "BENCH_TOKENS": str(self.tokens_file),
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

    async def reports(self, service: Any, rounds: int, concurrency: int) -> dict[str, Any]:
        """Run the load generator with `rounds` reports per server; the CPU the service (this
        process) and the hub spent meanwhile, and how many tokens the service asked the hub
        about. The hub's CPU includes its own background work (polling the spawners, the
        proxy's activity), so it is taken per hub check of the cold pass only."""
        auth = service.server_auth
        checks = auth.hub_checks
        hub_cpu, own_cpu = process_cpu(self.hub_pid), time.process_time()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--report-load",
            self.service_bind + PREFIX,
            str(self.tokens_file),
            str(rounds),
            str(concurrency),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        own_cpu, hub_cpu = time.process_time() - own_cpu, process_cpu(self.hub_pid) - hub_cpu
        if proc.returncode != 0:
            raise RuntimeError(f"the report load generator failed ({proc.returncode})")
        result = json.loads(out)
        if result["failures"]:
            raise RuntimeError(f"reports refused: {result['failures']}")
        n = result["reports"]
        checks = auth.hub_checks - checks
        return {
            "reports": n,
            "hub_checks": checks,
            "per_s": n / result["seconds"],
            "service_cpu_us": own_cpu / n * 1e6,
            "hub_cpu_per_check_us": hub_cpu / checks * 1e6 if checks else None,
        }


def count_hub_checks(auth: Any) -> None:
    """Count the report tokens `auth` (the service's `ServerAuthenticator`) shows the hub."""
    ask = auth._ask_hub
    auth.hub_checks = 0

    async def counted(token: str) -> Any:
        auth.hub_checks += 1
        return await ask(token)

    auth._ask_hub = counted


def make_service(bench: Bench, store_url: str) -> Any:
    from traitlets.config import Config

    from gpuhub.service.app import GpuhubService

    c = Config()
    c.GpuhubService.hub_api_url = bench.api
    c.GpuhubService.api_token = bench.gpuhub_token
    c.GpuhubService.bind_url = bench.service_bind
    c.GpuhubService.service_prefix = PREFIX
    c.GpuhubConfig.store_url = store_url
    c.GpuhubService.dry_run = True
    c.GpuhubService.request_timeout = 120.0
    c.GpuhubService.activity_source = "none"  # replaced by SyntheticSource below
    c.GpuhubService.report_max_age = 3600.0  # the reports of the cold pass count for the run
    c.GpuhubService.gpu_totals = {"gpu": 100000}
    service = GpuhubService(config=c)
    service.setup()
    service.activity = SyntheticSource()
    count_hub_checks(service.server_auth)
    return service


async def measure(
    bench: Bench,
    service: Any,
    repeat: int,
    warm_rounds: int,
    concurrency: int,
    profile: str | None = None,
) -> dict:
    from jupyterhub_idle_culler import cull_idle

    n = bench.users
    result: dict[str, Any] = {"users": n}
    # reports: the board filled through the report endpoint, first with every token checked by
    # the hub, then from the cache
    service.server_auth._cache.clear()  # cold: no token known yet (the smaller sizes' were)
    cold = await bench.reports(service, 1, concurrency)
    warm = await bench.reports(service, warm_rounds, concurrency)
    assert cold["hub_checks"] == n, cold
    assert warm["hub_checks"] == 0, warm
    assert len(service.board.reports) == n, (len(service.board.reports), n)
    result["report_cold"] = cold
    result["report_warm"] = warm
    # a server reports every HOLD_S; its token is checked with the hub again every AUTH_CACHE_S
    cold_share = HOLD_S / AUTH_CACHE_S
    service_cpu = (
        (1 - cold_share) * warm["service_cpu_us"] + cold_share * cold["service_cpu_us"]
    ) / 1e6
    hub_cpu = cold_share * cold["hub_cpu_per_check_us"] / 1e6
    result["reports_core_share_5000"] = 5000 / HOLD_S * service_cpu
    result["reports_core_share_5000_hub"] = 5000 / HOLD_S * hub_cpu

    # the trusted sampler: an hour of readings, one every 30 s, each pass measured
    await service.refresh_targets()
    assert len(service.targets) == n, (len(service.targets), n)
    end = time.time()
    passes = []
    for at in range(int(end - 3900), int(end), 30):
        service.activity.at = float(at)
        t = time.process_time()
        await service.sample_activity()
        passes.append(time.process_time() - t)

    lists, cycles, cycle_cpu, culls = [], [], [], []
    decided = 0
    for _ in range(repeat):
        service.activity.at = time.time()  # a fresh reading before each cycle, as every 10 s
        t = time.process_time()
        await service.sample_activity()
        passes.append(time.process_time() - t)

        t = time.perf_counter()
        users = await service.client.ready_users()
        lists.append(time.perf_counter() - t)
        assert len(users) == n, (len(users), n)

        t, cpu = time.perf_counter(), time.process_time()
        actions = await service.run_cycle()
        cycles.append(time.perf_counter() - t)
        cycle_cpu.append(time.process_time() - cpu)
        assert service.last_error is None, service.last_error
        decided = len(actions)
        readable = service.metrics.registry.get_sample_value(
            "gpuhub_servers", {"status": "readable"}
        )
        assert readable == n, (readable, n)

        t = time.perf_counter()
        await cull_idle(
            url=bench.api,
            api_token=bench.culler_token,
            inactive_limit=10**9,
            logger=logging.getLogger("idle-culler"),
            concurrency=10,
        )
        culls.append(time.perf_counter() - t)
    if profile:  # one more cycle under cProfile (not in the figures)
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        await service.run_cycle()
        profiler.disable()
        profiler.dump_stats(f"{profile}.{n}")
    result["sampler_pass_s"] = statistics.median(passes)
    result["sampler_per_cycle_s"] = result["sampler_pass_s"] * CYCLE_S / ACTIVITY_INTERVAL_S
    result.update(
        gpuhub_list_s=statistics.median(lists),
        gpuhub_cycle_s=statistics.median(cycles),
        gpuhub_cycle_cpu_s=statistics.median(cycle_cpu),
        idle_culler_pass_s=statistics.median(culls),
        decisions=decided,
    )
    result["cycle_ratio"] = result["gpuhub_cycle_s"] / result["idle_culler_pass_s"]
    result["cycle_with_sampler_ratio"] = (
        result["gpuhub_cycle_s"] + result["sampler_per_cycle_s"]
    ) / result["idle_culler_pass_s"]
    return result


async def run(
    sizes: list[int],
    repeat: int,
    warm_rounds: int,
    concurrency: int,
    workdir: Path,
    profile: str | None = None,
) -> list[dict]:
    bench = Bench(workdir)
    bench.start()
    results = []
    service = None
    server = None
    try:
        service = make_service(bench, f"sqlite:///{workdir / 'gpuhub.sqlite'}")
        server = service.listen()
        for size in sizes:
            grow_s = await bench.grow(size)
            print(f"# {size} users with ready servers ({grow_s:.0f} s to spawn)", file=sys.stderr)
            result = await measure(bench, service, repeat, warm_rounds, concurrency, profile)
            result["spawn_s"] = grow_s
            results.append(result)
            print(json.dumps(result), file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
        if service is not None:
            service.board.close()
            service.client.close()
            service.server_auth.close()
        bench.stop()
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| servers | gpuhub: list | gpuhub: cycle (list + reports + trusted readings + decide) "
        "| trusted sampler per cycle (6 passes) | idle-culler: one pass | cycle / pass "
        "| (cycle + sampler) / pass |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['users']:,} | {r['gpuhub_list_s']:.2f} s | {r['gpuhub_cycle_s']:.2f} s "
            f"(CPU {r['gpuhub_cycle_cpu_s']:.2f} s) | {r['sampler_per_cycle_s']:.3f} s "
            f"| {r['idle_culler_pass_s']:.2f} s | {r['cycle_ratio']:.2f}x "
            f"| {r['cycle_with_sampler_ratio']:.2f}x |"
        )
    lines += [
        "",
        "| servers | reports/s, cold (each token checked by the hub) | service CPU per report "
        "| hub CPU per check | reports/s, warm (tokens cached) | service CPU per report "
        "| 5,000 servers reporting every 30 s: share of a core, service (+ hub) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c, w = r["report_cold"], r["report_warm"]
        lines.append(
            f"| {r['users']:,} | {c['per_s']:,.0f} | {c['service_cpu_us']:,.0f} µs "
            f"| {c['hub_cpu_per_check_us']:,.0f} µs | {w['per_s']:,.0f} "
            f"| {w['service_cpu_us']:,.0f} µs | {r['reports_core_share_5000']:.1%} "
            f"(+ {r['reports_core_share_5000_hub']:.1%}) |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--warm-rounds", type=int, default=2, help="reports per server from the auth cache"
    )
    parser.add_argument(
        "--concurrency", type=int, default=50, help="reports the load generator sends at once"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--profile",
        metavar="PREFIX",
        help="after the measured cycles, run one more under cProfile into PREFIX.<servers>",
    )
    parser.add_argument("--fake-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report-load", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_server:
        fake_server(args.fake_server)
        return 0
    if args.report_load:
        url, tokens, rounds, concurrency = args.report_load
        report_load(url, tokens, int(rounds), int(concurrency))
        return 0
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="gpuhub-bench-"))
    try:
        results = asyncio.run(
            run(
                sorted(args.sizes),
                args.repeat,
                args.warm_rounds,
                args.concurrency,
                workdir,
                args.profile,
            )
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
        )
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
