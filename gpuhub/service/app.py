"""`python -m gpuhub.service`: the hub service that gives idle GPUs back to the pool.

Every `interval` seconds one cycle: list the ready servers through the hub API, read each one's
`/api/gpuhub/status` through the proxy, read the wait queue, hand plain views to
`policy.decide`, and carry out the actions it returns (`actions.Executor`) in the background, at
most one at a time per server. A web server under the service prefix serves `metrics`
(Prometheus) and `health` (JSON), plus the pages of `gpuhub.service.web` when that package is
installed: its `routes(service)` returns tornado handler tuples (a pattern not starting with `/`
is taken relative to the service prefix) and an optional `settings(service)` adds tornado
application settings.

Run by JupyterHub as a managed service (it sets JUPYTERHUB_API_URL, JUPYTERHUB_API_TOKEN,
JUPYTERHUB_SERVICE_URL and JUPYTERHUB_SERVICE_PREFIX), or by hand with the same variables.
`--generate-config` prints a config file with every setting and its help; `--dry-run` decides and
logs, and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse

from tornado import web
from tornado.httpserver import HTTPServer
from traitlets import Bool, Dict, Float, Int, Unicode, default
from traitlets.config import Application, catch_config_error

from .. import policy
from ..store import Store
from .actions import ActionSettings, Executor, run_key
from .demand import (
    Pool,
    PoolTotals,
    allocated_by_type,
    demand_from,
    local_totals,
    queue_by_type,
    waiting_entries,
)
from .hubapi import HubAPIError, HubClient
from .metrics import Metrics
from .servers import RunningServer, StatusResult, read_status, running_servers, view_from

WEB_MODULE = "gpuhub.service.web"


class MetricsHandler(web.RequestHandler):
    def get(self) -> None:
        service: GpuhubService = self.settings["gpuhub_service"]
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(service.metrics.exposition())


class HealthHandler(web.RequestHandler):
    def get(self) -> None:
        service: GpuhubService = self.settings["gpuhub_service"]
        report = service.health()
        self.set_status(200 if report["ok"] else 503)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(report))


class GpuhubService(Application):
    """The gpuhub hub service: GPU release, state-preserving culling, reclaim under demand."""

    name = "gpuhub-service"
    description = __doc__.split("\n\n")[0] if __doc__ else ""

    aliases = {
        "config": "GpuhubService.config_file",
        "f": "GpuhubService.config_file",
        "api-url": "GpuhubService.hub_api_url",
        "proxy-url": "GpuhubService.proxy_url",
        "store-url": "GpuhubService.store_url",
        "catalog-file": "GpuhubService.catalog_file",
        "interval": "GpuhubService.interval",
        "gpu-idle-timeout": "GpuhubService.gpu_idle_timeout",
        "gpu-idle-timeout-under-demand": "GpuhubService.gpu_idle_timeout_under_demand",
        "server-idle-timeout": "GpuhubService.server_idle_timeout",
        "log-level": "Application.log_level",
    }
    flags = {
        "dry-run": ({"GpuhubService": {"dry_run": True}}, "Decide and log; change nothing."),
        "generate-config": (
            {"GpuhubService": {"generate_config": True}},
            "Print a config file with every setting and its help, and exit.",
        ),
    }

    @default("log_level")
    def _default_log_level(self) -> int:
        return logging.INFO

    @default("log_format")
    def _default_log_format(self) -> str:
        return "[%(levelname)1.1s %(asctime)s.%(msecs).03d %(name)s] %(message)s"

    # -- where things are ------------------------------------------------------------------------

    config_file = Unicode(
        "gpuhub_service_config.py",
        config=True,
        help="Config file to load, if it exists (a traitlets Python config file).",
    )
    generate_config = Bool(
        False, config=True, help="Print a config file with every setting and exit."
    )
    hub_api_url = Unicode(
        config=True,
        help="""The hub's REST API (default: $JUPYTERHUB_API_URL, set by JupyterHub for
        managed services).""",
    )

    @default("hub_api_url")
    def _default_api_url(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")

    api_token = Unicode(
        config=True,
        help="""The service's API token (default: $JUPYTERHUB_API_TOKEN). Its scopes are listed
        in docs/operations.md; nothing more is needed.""",
    )

    @default("api_token")
    def _default_token(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    proxy_url = Unicode(
        config=True,
        help="""Where the proxy serves the single-user servers (the hub's public URL, e.g.
        http://proxy-public on Kubernetes). Each server's status and snapshot endpoints are
        reached there. Default: $JUPYTERHUB_PUBLIC_URL, else the origin of `hub_api_url`.""",
    )

    @default("proxy_url")
    def _default_proxy_url(self) -> str:
        public = os.environ.get("JUPYTERHUB_PUBLIC_URL")
        if public:
            parsed = urlparse(public)
            return f"{parsed.scheme}://{parsed.netloc}"
        parsed = urlparse(self.hub_api_url)
        return f"{parsed.scheme}://{parsed.netloc}"

    hub_public_url = Unicode(
        config=True,
        help="""The hub's address as users see it, for the links in notices (default:
        `proxy_url`).""",
    )

    @default("hub_public_url")
    def _default_public(self) -> str:
        return self.proxy_url

    bind_url = Unicode(
        config=True,
        help="""Where the service's web server listens (default: $JUPYTERHUB_SERVICE_URL, else
        http://127.0.0.1:10101).""",
    )

    @default("bind_url")
    def _default_bind(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:10101")

    service_prefix = Unicode(
        config=True,
        help="""URL prefix of the service's pages and endpoints (default:
        $JUPYTERHUB_SERVICE_PREFIX, else /services/gpuhub/).""",
    )

    @default("service_prefix")
    def _default_prefix(self) -> str:
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/gpuhub/")
        return prefix if prefix.endswith("/") else prefix + "/"

    store_url = Unicode(
        "sqlite:///gpuhub.sqlite",
        config=True,
        help="""SQLAlchemy URL of gpuhub's store: the same as the spawner's `store_url` (leases,
        queue, action history).""",
    )
    catalog_file = Unicode(
        "",
        config=True,
        help="""The environment catalogue (for the GPU types of the local pool). Empty: gpuhub's
        default catalogue.""",
    )
    gpu_totals = Dict(
        value_trait=Int(),
        config=True,
        help="""GPUs in the pool by type, an override for sites where nothing counts them:
        {"gpu": 16, "mig-1g.10gb": 14}. Types left out are counted with NVML on this machine
        (local backend) or taken from the counts GPUKubeSpawner's cluster watch publishes in
        the store (Kubernetes), or reported unknown. Where the watch's counts are fresh, its
        free GPUs still bound a configured type's free GPUs.""",
    )

    # -- the loop --------------------------------------------------------------------------------

    interval = Float(
        60.0,
        config=True,
        help="""Seconds between the starts of two cycles. Each cycle reads every ready server's
        status, so at most `server_concurrency` requests are in flight at once.""",
    )
    dry_run = Bool(
        False,
        config=True,
        help="Decide and log what would be done, and change nothing (no snapshot, no stop).",
    )
    concurrency = Int(
        10, config=True, help="Requests to the hub's REST API in flight at once, at most."
    )
    server_concurrency = Int(
        20,
        config=True,
        help="Requests to single-user servers (status reads) in flight at once, at most.",
    )
    action_concurrency = Int(
        4,
        config=True,
        help="Releases and stops carried out at once, at most (each snapshots, stops, starts).",
    )
    page_size = Int(
        200,
        config=True,
        help="Users per page when listing them (the hub caps it at its `api_page_max_limit`).",
    )
    request_timeout = Float(
        10.0, config=True, help="Seconds a request to the hub's REST API may take."
    )
    connect_timeout = Float(5.0, config=True, help="Seconds to connect to the hub or a server.")
    status_timeout = Float(
        10.0,
        config=True,
        help="""Seconds a server's status may take. A server that does not answer in time is
        never treated as idle.""",
    )
    retries = Int(
        3,
        config=True,
        help="""Retries of a failed read (connection error, timeout, 5xx), with exponential
        backoff from `retry_backoff` seconds. Starts are never retried blindly.""",
    )
    retry_backoff = Float(
        0.5, config=True, help="First retry delay in seconds (doubled each time)."
    )
    snapshot_timeout = Float(
        900.0,
        config=True,
        help="""Seconds a snapshot of a server's kernels may take (large variables take a
        while). A snapshot that times out counts as failed: nothing is released.""",
    )
    stop_timeout = Float(
        120.0, config=True, help="Seconds to wait for a server to stop after asking the hub."
    )
    spawn_timeout = Float(
        300.0,
        config=True,
        help="Seconds to wait for a server restarted without GPU (or with it) to be ready.",
    )
    queue_stale_after = Float(
        60.0,
        config=True,
        help="""A queue entry whose spawn has not been seen waiting for this many seconds does
        not count as demand (its hub restarted, its user left). Keep it equal to the
        spawner's `queue_stale_after`.""",
    )

    # -- rules (gpuhub.policy.Rules; docs/gpu-release.md explains the defaults) ----------------

    gpu_idle_timeout = Float(
        policy.Rules.gpu_idle_timeout,
        config=True,
        help="Release a server's GPUs when all of them have been idle this many seconds.",
    )
    gpu_idle_timeout_under_demand = Float(
        policy.Rules.gpu_idle_timeout_under_demand,
        config=True,
        help="""While someone waits for a GPU of a type, release the longest-idle GPUs of that
        type idle this many seconds (only as many as are wanted).""",
    )
    server_idle_timeout = Float(
        policy.Rules.server_idle_timeout,
        config=True,
        help="""Stop a server (after a snapshot of its kernels) without user activity for this
        many seconds; 0 disables.""",
    )
    max_gpu_lease = Dict(
        config=True,
        help="""Maximum GPU lease per group in seconds ({"students": 14400}; null: unlimited). A
        user in several groups gets the most generous. The only rule that ends running work,
        after a warning.""",
    )
    max_gpu_lease_default = Float(
        None,
        allow_none=True,
        config=True,
        help="Maximum GPU lease in seconds for users in none of `max_gpu_lease`'s groups.",
    )
    max_gpu_lease_warning = Float(
        policy.Rules.max_gpu_lease_warning,
        config=True,
        help="Seconds of warning before a lease ends; it never ends sooner after the warning.",
    )
    lease_end_action = Unicode(
        policy.RELEASE,
        config=True,
        help="What ends a lease: 'release' (restart without GPU) or 'stop'.",
    )
    snapshot_retry = Float(
        policy.Rules.snapshot_retry,
        config=True,
        help="Seconds to wait after a failed snapshot before trying again (doubled each time).",
    )
    snapshot_retry_max = Float(
        policy.Rules.snapshot_retry_max,
        config=True,
        help="The longest wait between two snapshot attempts, in seconds.",
    )
    force_after_snapshot_failures = Int(
        None,
        allow_none=True,
        config=True,
        help="""After this many failed snapshots in a row, release or stop without one (the
        kernels' state is lost, and the notice says so). None (default): never.""",
    )

    # -- notices ---------------------------------------------------------------------------------

    notice_file = Unicode(
        "GPUHUB-NOTICE.md",
        config=True,
        help="""File in the user's home (through the server's contents API) where the user reads
        why their GPU was released, their server stopped, or what they are warned about, in
        JupyterLab's file browser or VS Code's explorer. Empty: no file (the hub pages still
        show the history).""",
    )

    # -- set-up ----------------------------------------------------------------------------------

    @catch_config_error
    def initialize(self, argv: list[str] | None = None) -> None:
        super().initialize(argv)
        if self.generate_config:
            return
        if self.config_file and os.path.exists(self.config_file):
            self.load_config_file(self.config_file)
        self.setup()

    def rules(self) -> policy.Rules:
        return policy.Rules(
            gpu_idle_timeout=self.gpu_idle_timeout,
            gpu_idle_timeout_under_demand=self.gpu_idle_timeout_under_demand,
            server_idle_timeout=self.server_idle_timeout,
            max_gpu_lease=dict(self.max_gpu_lease),
            max_gpu_lease_default=self.max_gpu_lease_default,
            max_gpu_lease_warning=self.max_gpu_lease_warning,
            lease_end_action=self.lease_end_action,
            snapshot_retry=self.snapshot_retry,
            snapshot_retry_max=self.snapshot_retry_max,
            force_after_snapshot_failures=self.force_after_snapshot_failures,
        )

    def setup(self) -> None:
        """Build the client, store, metrics and executor (no I/O yet)."""
        try:
            self.policy_rules = self.rules()
        except ValueError as e:
            self.exit_with(f"gpuhub service: bad setting: {e}")
        if not self.api_token:
            self.exit_with("gpuhub service: no API token (set $JUPYTERHUB_API_TOKEN)")
        self.client = HubClient(
            self.hub_api_url,
            self.api_token,
            self.proxy_url,
            timeout=self.request_timeout,
            connect_timeout=self.connect_timeout,
            retries=self.retries,
            backoff=self.retry_backoff,
            concurrency=self.concurrency,
            server_concurrency=self.server_concurrency,
            page_size=self.page_size,
        )
        self.store = Store.at(self.store_url)
        self.metrics = Metrics()
        self.metrics.dry_run.set(1 if self.dry_run else 0)
        self.executor = Executor(
            self.client,
            self.store,
            self.metrics,
            ActionSettings(
                snapshot_timeout=self.snapshot_timeout,
                stop_timeout=self.stop_timeout,
                spawn_timeout=self.spawn_timeout,
                notice_file=self.notice_file,
                hub_url=self.hub_public_url,
                dry_run=self.dry_run,
            ),
            concurrency=self.action_concurrency,
        )
        self.ledger = self.executor.ledger
        self.cycles = 0
        #: called with (server, status document) for every status a cycle reads (the pages'
        #: utilisation sparklines listen)
        self.status_listeners: list[Any] = []
        self.last_cycle_end: float | None = None
        self.last_error: str | None = None
        self._totals: tuple[float, dict[str, int | None]] | None = None

    def exit_with(self, message: str) -> None:
        self.log.critical(message)
        sys.exit(message)

    # -- one cycle -------------------------------------------------------------------------------

    def pool_totals(self) -> PoolTotals:
        """GPUs per type: counted with NVML on this machine (cached for a minute), the counts the
        hub's cluster watch publishes in the store (with their free GPUs, while fresh), then the
        configured `gpu_totals` over both. Sets the capacity metrics."""
        now = time.monotonic()
        if self._totals is None or now - self._totals[0] > 60:
            counted: dict[str, int | None] = {}
            try:
                from .. import paths

                local = local_totals(self.catalog_file or str(paths.default_catalog_file()))
                counted.update({t: n for t, n in local.items() if n})
            except Exception as e:
                self.log.debug("gpuhub: no local GPU count: %s", e)
            self._totals = (now, counted)
        totals = PoolTotals(self._totals[1])
        try:
            totals.measured(self.store.measured_capacity(), datetime.now(timezone.utc))
        except Exception as e:
            self.log.warning("gpuhub: cannot read the cluster's GPU counts: %s", e)
        totals.configured(self.gpu_totals)
        m = self.metrics
        m.set_by_type(m.gpus_free_measured, totals.measured_free)
        m.set_by_type(m.gpus_unavailable, totals.unavailable)
        m.set_by_type(m.capacity_age, totals.age)
        return totals

    async def run_cycle(self) -> list[policy.Action]:
        """One cycle; returns the decided actions (being carried out in the background)."""
        started = time.monotonic()
        try:
            actions = await self._cycle()
        except Exception as e:
            self.metrics.cycle_errors.inc()
            self.last_error = f"{type(e).__name__}: {e}"
            if isinstance(e, HubAPIError):
                self.log.error("gpuhub: cycle stopped, nothing decided: %s", e)
            else:
                self.log.exception("gpuhub: cycle failed, nothing decided")
            return []
        finally:
            self.metrics.cycles.inc()
        self.metrics.cycle_duration.observe(time.monotonic() - started)
        self.cycles += 1
        self.last_error = None
        self.last_cycle_end = time.time()
        self.metrics.last_cycle.set(self.last_cycle_end)
        return actions

    async def _cycle(self) -> list[policy.Action]:
        self.ledger.refresh()
        if not self.dry_run:
            self.executor.resume_interrupted()
        users = await self.client.ready_users()
        now = time.time()
        running = running_servers(users)
        by_key = {s.key: s for s in running}
        candidates = [s for s in running if not self.executor.busy(s.key)]
        statuses = await asyncio.gather(
            *(read_status(self.client, s, self.status_timeout) for s in candidates)
        )
        lease_starts: dict[tuple[str, str], float] = {}
        leases = self.store.leases()
        for lease in leases:
            t = lease.leased_at.timestamp()
            key = (lease.user, lease.server)
            lease_starts[key] = min(t, lease_starts.get(key, t))
        views = []
        for server, result in zip(candidates, statuses, strict=True):
            if result.status is None:
                self.metrics.status_errors.inc()
                self.log.info("gpuhub: status of %s unreadable: %s", server.label, result.error)
            else:
                for listener in self.status_listeners:
                    listener(server, result.status)
            run = run_key(server)
            failures, last_failure = self.ledger.snapshot_failures(run)
            views.append(
                view_from(
                    server,
                    result.status,
                    lease_start=lease_starts.get(server.key),
                    lease_warned_at=self.ledger.warned_at(run, policy.RULE_MAX_LEASE_WARNING),
                    snapshot_failures=failures,
                    last_snapshot_failure=last_failure,
                )
            )
        entries = self.store.queue() if hasattr(self.store, "queue") else []
        queued = waiting_entries(entries, datetime.now(timezone.utc), self.queue_stale_after)
        pool = Pool(total=self.pool_totals(), allocated=allocated_by_type(leases))
        actions = policy.decide(views, demand_from(queued, pool), now, self.policy_rules)
        if not self.dry_run:
            self.executor.close_abandoned(actions, by_key)
        self.executor.submit(actions, by_key)
        self.ledger.prune(run_key(s) for s in running)
        self.update_metrics(candidates, statuses, pool, queued, now)
        return actions

    def update_metrics(
        self,
        servers: list[RunningServer],
        statuses: list[StatusResult],
        pool: Pool,
        queued: list[Any],
        now: float,
    ) -> None:
        m = self.metrics
        since_last = now - self.last_cycle_end if self.last_cycle_end else self.interval
        idle: dict[str, int] = {}
        unknown: dict[str, int] = {}
        readable = unreadable = 0
        for server, result in zip(servers, statuses, strict=True):
            if result.status is None:
                unreadable += 1
            else:
                readable += 1
            if not server.gpus:
                continue
            gpu_type = server.gpu_type or ""
            if result.status is None:
                unknown[gpu_type] = unknown.get(gpu_type, 0) + server.gpus
                continue
            entries = [g for g in result.status["gpus"] if isinstance(g, Mapping)]
            n_idle = 0
            for g in entries[: server.gpus]:
                if g.get("state") == "idle":
                    n_idle += 1
                    idle_for = g.get("idle_for_s")
                    seconds = since_last
                    if isinstance(idle_for, (int, float)):
                        seconds = min(float(idle_for), since_last)
                    m.gpu_idle_seconds.labels(gpu_type=gpu_type).inc(max(0.0, seconds))
            n_known = sum(1 for g in entries[: server.gpus] if g.get("state") in ("idle", "busy"))
            idle[gpu_type] = idle.get(gpu_type, 0) + n_idle
            unknown[gpu_type] = unknown.get(gpu_type, 0) + server.gpus - n_known
        types = set(pool.types) | set(idle) | set(unknown)
        m.set_by_type(m.gpus_total, {t: n for t, n in pool.total.items() if n is not None})
        m.set_by_type(m.gpus_allocated, {t: pool.allocated.get(t, 0) for t in types})
        m.set_by_type(m.gpus_idle, {t: idle.get(t, 0) for t in types})
        m.set_by_type(m.gpus_unknown, {t: unknown.get(t, 0) for t in types})
        by_type = queue_by_type(queued, now)
        m.set_by_type(
            m.queue_length, {t: by_type.get(t, (0, 0.0))[0] for t in types | set(by_type)}
        )
        m.set_by_type(m.queue_wait, {t: by_type.get(t, (0, 0.0))[1] for t in types | set(by_type)})
        m.servers.labels(status="readable").set(readable)
        m.servers.labels(status="unreadable").set(unreadable)

    def health(self) -> dict[str, Any]:
        now = time.time()
        fresh = (
            self.last_cycle_end is not None and now - self.last_cycle_end < 3 * self.interval + 30
        )
        return {
            "ok": bool(fresh),
            "cycles": self.cycles,
            "last_cycle": self.last_cycle_end,
            "last_error": self.last_error,
            "dry_run": self.dry_run,
            "actions_under_way": sorted(f"{u}/{s}" for u, s in self.executor.tasks),
            "last_decisions": self.executor.planned,
        }

    # -- web -------------------------------------------------------------------------------------

    def web_handlers(self) -> tuple[list[tuple], dict[str, Any]]:
        prefix = self.service_prefix
        handlers: list[tuple] = [
            (rf"{prefix}metrics", MetricsHandler),
            (rf"{prefix}health", HealthHandler),
        ]
        settings: dict[str, Any] = {}
        try:
            module = importlib.import_module(WEB_MODULE)
        except ModuleNotFoundError as e:
            if e.name != WEB_MODULE:
                raise
            return handlers, settings
        for route in module.routes(self):
            pattern = route[0]
            if not pattern.startswith("/"):
                pattern = prefix + pattern
            handlers.append((pattern, *route[1:]))
        if hasattr(module, "settings"):
            settings.update(module.settings(self))
        return handlers, settings

    def make_web_app(self) -> web.Application:
        handlers, settings = self.web_handlers()
        return web.Application(handlers, gpuhub_service=self, **settings)

    # -- running ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self.generate_config:
            print(self.generate_config_file())
            return
        # gpuhub's modules log to "gpuhub.*": through the application's handlers and level
        package_log = logging.getLogger("gpuhub")
        package_log.handlers = list(self.log.handlers)
        package_log.setLevel(self.log_level)
        package_log.propagate = False
        asyncio.run(self.serve())

    async def serve(self) -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        bind = urlparse(self.bind_url)
        server = HTTPServer(self.make_web_app(), xheaders=True)
        server.listen(bind.port or 80, bind.hostname or "127.0.0.1")
        self.log.info(
            "gpuhub service at %s%s: every %g s, GPU idle timeout %g s (%g s when someone "
            "waits), server idle timeout %g s%s",
            self.bind_url.rstrip("/"),
            self.service_prefix,
            self.interval,
            self.gpu_idle_timeout,
            self.gpu_idle_timeout_under_demand,
            self.server_idle_timeout,
            "; DRY RUN: nothing is changed" if self.dry_run else "",
        )
        try:
            while not stopping.is_set():
                started = time.monotonic()
                await self.run_cycle()
                pause = max(0.0, self.interval - (time.monotonic() - started))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), pause)
        finally:
            server.stop()
            if self.executor.tasks:
                self.log.info(
                    "gpuhub: waiting for %d action(s) under way", len(self.executor.tasks)
                )
                try:
                    await asyncio.wait_for(self.executor.wait(), 30)
                except asyncio.TimeoutError:
                    self.log.warning("gpuhub: leaving actions unfinished; the next run ends them")
            self.client.close()


def main(argv: list[str] | None = None) -> None:
    app = GpuhubService.instance()
    app.initialize(argv)
    app.start()
