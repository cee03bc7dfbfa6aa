"""`python -m gpuhub.service`: the hub service that gives idle GPUs back to the pool.

Every `interval` seconds one cycle: list the ready servers through the hub API, take each one's
latest report (servers report to the service, `gpuhub.core.protocol`; the service never sends a
credential to a server), the trusted GPU readings (`gpuhub.activity`: NVML on the hub host, or
dcgm-exporter through Prometheus) and the wait queue, hand plain views to `core.decide`, and
carry out the actions it returns (`actions.Executor`) in the background, at most one at a time
per server. A web server under the service prefix takes the servers' reports
(`api/v1/servers/report`) and serves `metrics` (Prometheus) and `health` (JSON), plus the pages
of `gpuhub.service.web` when that package is installed: its `routes(service)` returns tornado
handler tuples (a pattern not starting with `/` is taken relative to the service prefix) and an
optional `settings(service)` adds tornado application settings.

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
from traitlets import Bool, Dict, Float, Int, List, TraitError, Unicode, default
from traitlets.config import Application, catch_config_error

from ..activity import ServerTarget
from ..activity.prometheus import PrometheusActivitySource
from ..activity.tracker import TrustedActivity
from ..core import decide, idle, protocol
from ..expiring import ExpiringCache
from ..schema import SchemaError
from ..settings import GpuhubConfig, SharesGpuhubConfig
from ..store import Store
from .accounting import GpuHours
from .actions import ActionSettings, Executor, run_key
from .arbiter import ArbiterHandler
from .cpu_start import CpuStart, CpuStartRules
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
from .keeps import KeepRules, Keeps
from .learning import LearnedRelease
from .metrics import Metrics
from .refusals import RefusalLimiter
from .reports import ReportBoard, ReportHandler, ServerAuthenticator
from .requests import UserRequests
from .servers import RunningServer, parse_time, running_servers, view_from

WEB_MODULE = "gpuhub.service.web"


class MetricsHandler(web.RequestHandler):
    def get(self) -> None:
        service: GpuhubService = self.settings["gpuhub_service"]
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(service.metrics.exposition())


class HealthHandler(web.RequestHandler):
    """Whether the service's cycle runs (for probes): no user, server or decision in it."""

    def get(self) -> None:
        service: GpuhubService = self.settings["gpuhub_service"]
        report = service.health()
        self.set_status(200 if report["ok"] else 503)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(report))


class GpuhubService(SharesGpuhubConfig, Application):
    """The gpuhub hub service: GPU release, state-preserving culling, reclaim under demand."""

    name = "gpuhub-service"
    description = __doc__.split("\n\n")[0] if __doc__ else ""

    aliases = {
        "config": "GpuhubService.config_file",
        "f": "GpuhubService.config_file",
        "api-url": "GpuhubService.hub_api_url",
        "hub-public-url": "GpuhubService.hub_public_url",
        "store-url": "GpuhubConfig.store_url",
        "catalog-file": "GpuhubConfig.catalog_file",
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

    classes = [GpuhubConfig, LearnedRelease, PrometheusActivitySource]

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

    hub_public_url = Unicode(
        config=True,
        help="""The hub's address as users see it, for the links in notices (default: the origin
        of $JUPYTERHUB_PUBLIC_URL, else of `hub_api_url`).""",
    )

    @default("hub_public_url")
    def _default_public(self) -> str:
        public = os.environ.get("JUPYTERHUB_PUBLIC_URL")
        parsed = urlparse(public or self.hub_api_url)
        return f"{parsed.scheme}://{parsed.netloc}"

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

    # store_url, catalog_file, queue_stale_after: c.GpuhubConfig (gpuhub.settings), shared with
    # the hub and the pages; the hub hands its values to a managed service in its environment.

    gpu_totals = Dict(
        value_trait=Int(),
        config=True,
        help="""GPUs in the pool by type, an override for sites where nothing counts them:
        {"gpu": 16, "mig-1g.10gb": 14}. Types left out are counted with NVML on this machine
        (local backend) or taken from the counts GPUKubeSpawner's cluster watch publishes in
        the store (Kubernetes), or reported unknown. Where the watch's counts are fresh, its
        free GPUs still bound a configured type's free GPUs.""",
    )

    # -- reports from the servers and trusted GPU activity (docs/security.md) ---------------------

    report_max_age = Float(
        120.0,
        config=True,
        help="""Seconds a server's report counts. A server without a report this recent is
        treated like one that claims work in progress: its GPU is never taken for idle, and
        only the maximum GPU lease ends its lease. Keep it above the servers' report hold
        (`GpuhubExtension.report_hold`, 30 s) plus a margin.""",
    )
    report_hold = Float(
        30.0,
        config=True,
        help="""Seconds the service holds a server's report open, at most, until a command for
        that server comes (so commands reach servers at once without the service ever calling
        them).""",
    )
    require_service_scope = Bool(
        True,
        config=True,
        help="""Take reports only from tokens that hold `access:services!service=<this
        service>` as well as access to the reporting server (grant it to servers with
        `Spawner.server_token_scopes`, docs/security.md).""",
    )
    report_auth_cache = Float(
        300.0,
        config=True,
        help="Seconds the hub's answer about a report token is kept (a hash of it, in memory).",
    )
    report_refusals_per_minute = Int(
        30,
        config=True,
        help="""Tokens the hub may refuse for one source address within a minute before the
        service refuses that address's unknown tokens without asking the hub (429 with
        `Retry-After`) until the minute has passed. Tokens the service already knows are never
        limited. Keeps random tokens from turning every report into a request to the hub.
        0: no limit.""",
    )
    max_reports_per_user = Int(
        16,
        config=True,
        help="""Servers of one user whose reports the service keeps at once (bounds what one user
        can make the service hold; above the hub's named_server_limit_per_user).""",
    )
    command_timeout = Float(
        60.0,
        config=True,
        help="""Seconds a command other than a snapshot (a notice, a snapshot listing for the
        pages) may take from sending to its result.""",
    )
    forced_snapshot_deadline = Float(
        120.0,
        config=True,
        help="""When the maximum GPU lease ends, or an admin releases or stops a server, kernels
        running code are waited for this many seconds before the snapshot; a kernel still
        running then is left out of it (the warning said so) and the action goes ahead.""",
    )
    activity_source = Unicode(
        "nvml",
        config=True,
        help="""Where the GPU utilisation that decides a release comes from, never from the
        users' servers: 'nvml' (the hub host's GPUs, local backend), 'prometheus' (NVIDIA
        dcgm-exporter through Prometheus, Kubernetes; see PrometheusActivitySource) or 'none'
        (no release for idleness; demand and maximum leases still apply).""",
    )
    activity_interval = Float(
        10.0,
        config=True,
        help="Seconds between two readings of the trusted GPU activity source.",
    )
    util_threshold = Float(
        idle.IdleRule.util_threshold,
        config=True,
        help="GPU utilisation percent at or below which a trusted reading is idle.",
    )
    mem_util_threshold = Float(
        idle.IdleRule.mem_util_threshold,
        config=True,
        help="Memory-controller utilisation percent at or below which a reading is idle.",
    )
    min_busy_seconds = Float(
        idle.IdleRule.min_busy_s,
        config=True,
        help="Busy stretches shorter than this (seconds) do not end an idle period.",
    )
    max_gap_seconds = Float(
        idle.IdleRule.max_gap_s,
        config=True,
        help="""A trusted reading holds at most this long; past it the GPU's state is unknown
        (never idle). Keep it above `activity_interval`.""",
    )
    gpu_hours_user_metrics = Bool(
        False,
        config=True,
        help="""Also expose this week's GPU-hours per user (`gpuhub_user_week_seconds`, labels
        user, group, gpu_type, kind). Off by default: one series per user who held a GPU this
        week, and user names in the metrics; the admin page and its CSV export show the same
        per user.""",
    )
    gpu_hours_keep_weeks = Int(
        26,
        config=True,
        help="""Weeks of GPU-hour records (lease intervals and the weeks' busy and idle seconds)
        kept in the store; older ones are forgotten once a week. 0: keep them all.""",
    )
    arbiter_services = List(
        Unicode(),
        ["idle-culler"],
        config=True,
        help="""Hub services whose tokens may ask the service's culler arbiter
        (`api/v1/arbiter`) whether to cull a server (jupyterhub-idle-culler with
        `gpuhub.service.arbiter.cull_arbiter_hook`).""",
    )
    max_body_size = Int(
        4 * 1024 * 1024,
        config=True,
        help="""Bytes of a request body the service's web server takes at most (reports are
        capped lower, before they are read).""",
    )

    # -- the loop --------------------------------------------------------------------------------

    interval = Float(
        60.0,
        config=True,
        help="""Seconds between the starts of two cycles (list the ready servers, decide, act).""",
    )
    dry_run = Bool(
        False,
        config=True,
        help="Decide and log what would be done, and change nothing (no snapshot, no stop).",
    )
    concurrency = Int(
        10, config=True, help="Requests to the hub's REST API in flight at once, at most."
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

    # -- rules (gpuhub.core.decide.Rules; docs/gpu-release.md explains the defaults) -------------

    gpu_idle_timeout = Float(
        decide.Rules.gpu_idle_timeout,
        config=True,
        help="Release a server's GPUs when all of them have been idle this many seconds.",
    )
    gpu_idle_timeout_under_demand = Float(
        decide.Rules.gpu_idle_timeout_under_demand,
        config=True,
        help="""While someone waits for a GPU of a type, release the longest-idle GPUs of that
        type idle this many seconds (only as many as are wanted).""",
    )
    server_idle_timeout = Float(
        decide.Rules.server_idle_timeout,
        config=True,
        help="""Stop a server (after a snapshot of its kernels) without user activity for this
        many seconds; 0 disables.""",
    )
    release_policy = Unicode(
        "flat",
        config=True,
        help="""When idle GPUs go back: "flat" (after `gpu_idle_timeout`) or "learned" (after
        each server's own limit, learned from its, its user's and the site's pauses; settings
        in `LearnedRelease`, see docs/gpu-release.md).""",
    )
    max_gpu_lease = Dict(
        config=True,
        help="""Maximum GPU lease per group in seconds ({"students": 14400}; null: unlimited). A
        user in several groups gets the most generous. The only rule that ends running work,
        after a warning.""",
    )
    max_gpu_lease_default = Float(
        24 * 3600.0,
        allow_none=True,
        config=True,
        help="""Maximum GPU lease in seconds for users in none of `max_gpu_lease`'s groups
        (default 24 h; None: unlimited). It bounds what a server that claims work in progress
        forever, or does not report at all, can hold.""",
    )
    max_gpu_lease_warning = Float(
        decide.Rules.max_gpu_lease_warning,
        config=True,
        help="Seconds of warning before a lease ends; it never ends sooner after the warning.",
    )
    lease_end_action = Unicode(
        decide.RELEASE,
        config=True,
        help="What ends a lease: 'release' (restart without GPU) or 'stop'.",
    )
    snapshot_retry = Float(
        decide.Rules.snapshot_retry,
        config=True,
        help="Seconds to wait after a failed snapshot before trying again (doubled each time).",
    )
    snapshot_retry_max = Float(
        decide.Rules.snapshot_retry_max,
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

    # -- keeping a GPU (docs/keep.md) -------------------------------------------------------------

    max_keep = Dict(
        value_trait=Float(),
        config=True,
        help="""Longest keep per group in seconds ({"students": 3600, "staff": 14400}; 0: that
        group may not keep): how long a user may postpone the idle release of their GPU with
        "Keep it" in JupyterLab. A user in several groups gets the most generous. Keeps never
        postpone the maximum GPU lease.""",
    )
    max_keep_default = Float(
        4 * 3600.0,
        config=True,
        help="Longest keep in seconds for users in none of `max_keep`'s groups (0: no keeps).",
    )
    keep_refused_after_wait = Float(
        900.0,
        config=True,
        help="""No keep while someone has waited longer than this many seconds for a GPU of the
        server's type; a keep in force stops protecting the GPU then too.""",
    )
    release_notice_before = Float(
        600.0,
        config=True,
        help="""Seconds before a foreseen release (idle limit, maximum lease) that JupyterLab
        warns the user, with "Keep it" and "Give it back now".""",
    )

    # -- servers started without a GPU while they wait for one (gpuhub.service.cpu_start) ------

    cpu_switch_notice = Float(
        120.0,
        min=0.0,
        config=True,
        help="""Seconds between telling a user who started on CPU (`when_no_gpu: start-on-cpu`)
        that their turn for a GPU has come and switching their server to it (snapshot, restart
        with the GPU, variables restored). Meanwhile the GPU is kept for them, and they may
        switch now or say "not now".""",
    )
    not_now_delay = Float(
        1800.0,
        min=0.0,
        config=True,
        help="""Seconds a "not now" keeps a request of a server running on CPU out of the line:
        the free GPU goes to the next in line; the request keeps its place and is offered a GPU
        again after this delay.""",
    )
    not_now_limit = Int(
        3,
        min=0,
        config=True,
        help="""The "not now"s in a row after which a request of a server running on CPU goes
        to the back of the line (and starts counting again), so that a user who keeps saying
        "not now" neither keeps GPUs idle nor holds the others back. 0: never.""",
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

    def rules(self) -> decide.Rules:
        return decide.Rules(
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
            self.gpuhub_config.check()
        except (ValueError, TraitError) as e:
            self.exit_with(f"gpuhub service: bad setting: {e}")
        if not self.api_token:
            self.exit_with("gpuhub service: no API token (set $JUPYTERHUB_API_TOKEN)")
        self.client = HubClient(
            self.hub_api_url,
            self.api_token,
            timeout=self.request_timeout,
            connect_timeout=self.connect_timeout,
            retries=self.retries,
            backoff=self.retry_backoff,
            concurrency=self.concurrency,
            page_size=self.page_size,
        )
        self.board = ReportBoard(max_per_user=self.max_reports_per_user)
        self.server_auth = ServerAuthenticator(
            self.hub_api_url,
            self.service_name,
            require_service_scope=self.require_service_scope,
            ttl=self.report_auth_cache,
            timeout=self.request_timeout,
            refusals=RefusalLimiter(max_refusals=self.report_refusals_per_minute, window=60.0),
        )
        self.idle_rule = idle.IdleRule(
            util_threshold=self.util_threshold,
            mem_util_threshold=self.mem_util_threshold,
            min_busy_s=self.min_busy_seconds,
            max_gap_s=self.max_gap_seconds,
        )
        self.tracker = TrustedActivity(self.idle_rule)
        self.activity = self.make_activity_source()
        self.targets: list[ServerTarget] = []
        self.silent: set[tuple[str, str]] = set()  # servers without a recent report
        self.started_at = time.monotonic()
        try:
            self.store = Store.at(self.store_url)
        except SchemaError as e:
            self.exit_with(f"gpuhub service: the store cannot be used: {e}")
        if self.release_policy not in ("flat", "learned"):
            self.exit_with(f"gpuhub service: bad setting: release_policy: {self.release_policy!r}")
        try:
            self.learning = LearnedRelease(self.store, parent=self)
        except ValueError as e:
            self.exit_with(f"gpuhub service: bad setting: LearnedRelease.{e}")
        self.metrics = Metrics(per_user_gpu_hours=self.gpu_hours_user_metrics)
        self.metrics.dry_run.set(1 if self.dry_run else 0)
        self.gpu_hours = GpuHours(
            self.store,
            self.tracker,
            self.metrics,
            per_user_metrics=self.gpu_hours_user_metrics,
            keep_weeks=self.gpu_hours_keep_weeks,
            write=not self.dry_run,
        )
        self.executor = Executor(
            self.client,
            self.board,
            self.store,
            self.metrics,
            ActionSettings(
                snapshot_timeout=self.snapshot_timeout,
                stop_timeout=self.stop_timeout,
                spawn_timeout=self.spawn_timeout,
                notice_file=self.notice_file,
                hub_url=self.hub_public_url,
                dry_run=self.dry_run,
                command_timeout=self.command_timeout,
                forced_snapshot_deadline=self.forced_snapshot_deadline,
                report_max_age=self.report_max_age,
            ),
            concurrency=self.action_concurrency,
        )
        self.ledger = self.executor.ledger
        try:
            self.keeps = Keeps(
                self.ledger,
                KeepRules(
                    max_keep=dict(self.max_keep),
                    max_keep_default=self.max_keep_default,
                    refuse_after_wait=self.keep_refused_after_wait,
                ),
            )
        except ValueError as e:
            self.exit_with(f"gpuhub service: bad setting: {e}")
        self.user_requests = UserRequests(self)
        from .web.config import GpuhubPages

        self.cpu_start = CpuStart(
            self,
            CpuStartRules(
                switch_notice=self.cpu_switch_notice,
                not_now_delay=self.not_now_delay,
                not_now_limit=self.not_now_limit,
                typical_hold=GpuhubPages(parent=self).typical_gpu_hold,
            ),
        )
        #: the running servers of the last cycle, and the longest wait per GPU type (None: any)
        self.running: dict[tuple[str, str], RunningServer] = {}
        self.longest_wait: dict[str | None, float] = {}
        self.cycles = 0
        #: called with (server, status document) for every server with a recent report, the
        #: GPUs' state and utilisation from the trusted source (the pages' sparklines listen)
        self.status_listeners: list[Any] = []
        self.last_cycle_end: float | None = None
        self.last_error: str | None = None
        #: GPUs per type counted with NVML on this machine, for a minute
        self._local_totals: ExpiringCache[None, dict[str, int | None]] = ExpiringCache(60)

    @property
    def service_name(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_NAME", "gpuhub")

    def make_activity_source(self) -> Any:
        if self.activity_source == "nvml":
            from ..activity.nvml_source import NvmlActivitySource

            return NvmlActivitySource(interval=self.activity_interval)
        if self.activity_source == "prometheus":  # Kubernetes
            return PrometheusActivitySource(parent=self)
        if self.activity_source == "none":
            return None
        self.exit_with(
            f"gpuhub service: activity_source: must be 'nvml', 'prometheus' or 'none', "
            f"not {self.activity_source!r}"
        )
        return None

    def exit_with(self, message: str) -> None:
        self.log.critical(message)
        sys.exit(message)

    # -- one cycle -------------------------------------------------------------------------------

    def pool_totals(self) -> PoolTotals:
        """GPUs per type: counted with NVML on this machine (cached for a minute), the counts the
        hub's cluster watch publishes in the store (with their free GPUs, while fresh), then the
        configured `gpu_totals` over both. Sets the capacity metrics."""

        def count() -> dict[str, int | None]:
            counted: dict[str, int | None] = {}
            try:
                from .. import paths

                local = local_totals(self.catalog_file or str(paths.default_catalog_file()))
                counted.update({t: n for t, n in local.items() if n})
            except Exception as e:
                self.log.debug("gpuhub: no local GPU count: %s", e)
            return counted

        totals = PoolTotals(self._local_totals.get_or_load(None, count))
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

    async def run_cycle(self) -> list[decide.Action]:
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

    async def _cycle(self) -> list[decide.Action]:
        self.ledger.refresh()
        if not self.dry_run:
            self.executor.resume_interrupted()
        running, leases = await self.refresh_targets()
        now = time.time()
        by_key = {s.key: s for s in running}
        self.board.prune(by_key)
        devices = {t.key: t.devices for t in self.targets}
        self.count_gpu_hours()  # before the readings of servers gone are forgotten
        self.tracker.forget_others(devices)
        self.running = by_key
        entries = self.store.queue() if hasattr(self.store, "queue") else []
        queued = waiting_entries(entries, datetime.now(timezone.utc), self.queue_stale_after)
        self.longest_wait = longest_waits(queued, now)
        candidates = [s for s in running if not self.executor.busy(s.key)]
        lease_starts: dict[tuple[str, str], float] = {}
        for lease in leases:
            t = lease.leased_at.timestamp()
            key = (lease.user, lease.server)
            lease_starts[key] = min(t, lease_starts.get(key, t))
        views = []
        silent: set[tuple[str, str]] = set()
        for server in candidates:
            report = self.report_of(server)
            if report is None:
                self.metrics.status_errors.inc()
                if server.gpus and server.key not in self.silent:
                    self.log.info(
                        "gpuhub: %s has not reported for %g s: its GPU is kept, at most until "
                        "the maximum GPU lease",
                        server.label,
                        self.report_max_age,
                    )
                silent.add(server.key)
            activity = self.gpu_activity(server, devices.get(server.key), now)
            if report is not None:
                document = self.display_status(server, report, now)
                for listener in self.status_listeners:
                    listener(server, document)
            run = run_key(server)
            failures, last_failure = self.ledger.snapshot_failures(run)
            views.append(
                view_from(
                    server,
                    report,
                    activity,
                    lease_start=lease_starts.get(server.key),
                    lease_warned_at=self.ledger.warned_at(run, decide.RULE_MAX_LEASE_WARNING),
                    snapshot_failures=failures,
                    last_snapshot_failure=last_failure,
                    kept_until=self.kept_until(server, now),
                )
            )
        self.silent = silent
        pool = Pool(total=self.pool_totals(), allocated=allocated_by_type(leases))
        limits = None
        if self.release_policy == "learned":
            limits = self.learning.update(views, now, self.policy_rules.gpu_idle_timeout)
        actions = decide.decide(views, demand_from(queued, pool), now, self.policy_rules, limits)
        if not self.dry_run:
            self.cpu_start.cycle(by_key, pool.free())
        if not self.dry_run:
            undecided = [v.key for v in views if not v.status_readable or v.gpu_unknown()]
            if time.monotonic() - self.started_at < self.warm_up():
                undecided = list(by_key)  # the trusted readings do not reach back far enough yet
            self.executor.close_abandoned(actions, by_key, undecided)
        self.executor.submit(actions, by_key)
        self.ledger.prune(run_key(s) for s in running)
        self.user_requests.update_notices(views, running, now, limits)
        self.update_metrics(views, pool, queued, now)
        return actions

    def count_gpu_hours(self) -> None:
        """The trusted busy and idle seconds since the last cycle into the store (a failure is
        logged: the next cycle counts them)."""
        try:
            self.gpu_hours.update(datetime.now(timezone.utc))
        except Exception:
            self.log.exception("gpuhub: counting the GPU-hours failed; the next cycle tries again")

    def kept_until(self, server: RunningServer, now: float) -> float | None:
        """The end of `server`'s keep, unless someone has waited too long for its GPU type."""
        if self.longest_wait_for(server.gpu_type) > self.keep_refused_after_wait:
            return None
        return self.keeps.until(server, now)

    def longest_wait_for(self, gpu_type: str | None) -> float:
        """The longest wait, in seconds, of the queued requests a GPU of `gpu_type` would serve."""
        return max(self.longest_wait.get(gpu_type, 0.0), self.longest_wait.get(None, 0.0))

    # -- what the servers report, what the trusted source reads ------------------------------------

    def report_of(self, server: RunningServer) -> protocol.ServerStatus | None:
        """The server's report from its current run, if recent enough."""
        started = parse_time(server.started)
        found = self.board.latest(server.key, self.report_max_age, not_before=started)
        return found.status if found is not None else None

    def warm_up(self) -> float:
        """Seconds after its start in which the service's trusted readings cannot show a GPU idle
        for the shortest idle timeout yet: interrupted actions are not closed meanwhile."""
        shortest = min(self.gpu_idle_timeout, self.gpu_idle_timeout_under_demand)
        return shortest + 2 * self.activity_interval

    async def refresh_targets(self) -> tuple[list[RunningServer], list[Any]]:
        """The ready servers and the leases; the trusted source reads the GPUs of these."""
        running = running_servers(await self.client.ready_users())
        leases = self.store.leases()
        self.targets = self.make_targets(running, leases)
        return running, leases

    def make_targets(self, running: list[RunningServer], leases: list[Any]) -> list[ServerTarget]:
        """The servers holding GPUs, with their leased devices (local backend) and pods."""
        devices: dict[tuple[str, str], list[str]] = {}
        for lease in leases:
            if lease.device:
                devices.setdefault((lease.user, lease.server), []).append(lease.device)
        pods: dict[tuple[str, str], tuple[str, str]] = {}
        server_pods = getattr(self.store, "server_pods", None)
        if callable(server_pods):
            for p in server_pods():
                pods[(p.user, p.server)] = (p.namespace, p.pod)
        out = []
        for server in running:
            if not server.gpus:
                continue
            namespace, pod = pods.get(server.key, (None, None))
            out.append(
                ServerTarget(
                    server.user,
                    server.server,
                    gpus=server.gpus,
                    devices=tuple(sorted(devices.get(server.key, ()))),
                    namespace=namespace,
                    pod=pod,
                    since=parse_time(server.started),
                )
            )
        return out

    def gpu_activity(
        self, server: RunningServer, devices: tuple[str, ...] | None, now: float
    ) -> tuple[idle.Activity, ...]:
        """One trusted `Activity` per GPU the server holds: its leased devices where the store
        knows them, else the devices the source reported for it; a device without readings is
        unknown."""
        if not server.gpus:
            return ()
        readings = {d.device: d.activity for d in self.tracker.device_activity(server.key, now)}
        unknown = idle.Activity(idle.UNKNOWN, None, None)
        if devices:
            return tuple(readings.get(d, unknown) for d in devices)
        return tuple(readings.values())

    def display_status(
        self, server: RunningServer, report: protocol.ServerStatus, now: float
    ) -> dict[str, Any]:
        """The report as the pages show it: each GPU's state and utilisation from the trusted
        source where it has readings of that GPU (the server's own view otherwise, marked so)."""
        document = protocol.status_document(report)
        trusted = {d.device: d for d in self.tracker.device_activity(server.key, now)}
        for gpu in document["gpus"]:
            reading = trusted.get(gpu["uuid"])
            if reading is None:
                gpu["source_of_state"] = "server"
                continue
            act = reading.activity
            gpu["state"] = act.state
            gpu["idle_since"] = protocol.iso(act.idle_since) if act.idle_since else None
            gpu["idle_for_s"] = act.idle_for(now) if act.state == idle.IDLE else None
            gpu["utilization"] = {
                **gpu["utilization"],
                "gpu": reading.utilization,
                "busy_fraction": act.busy_fraction,
            }
            gpu["source_of_state"] = "trusted"
        return document

    def page_status(
        self, user: str, server: str, model: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """What the pages show of a server: its recent report with the trusted GPU states."""
        running = RunningServer(user, server, frozenset(), model)
        report = self.report_of(running)
        if report is None:
            return None
        return self.display_status(running, report, time.time())

    async def sample_activity(self) -> None:
        """One reading of the trusted source for the current targets."""
        if self.activity is None or not self.targets:
            return
        try:
            readings = await self.activity.sample(list(self.targets))
        except Exception:
            self.log.exception("gpuhub: reading the GPU activity source failed")
            return
        for key, samples in readings.items():
            self.tracker.add(key, samples)

    def update_metrics(
        self, views: list[decide.ServerView], pool: Pool, queued: list[Any], now: float
    ) -> None:
        m = self.metrics
        since_last = now - self.last_cycle_end if self.last_cycle_end else self.interval
        idle_by_type: dict[str, int] = {}
        unknown: dict[str, int] = {}
        readable = sum(1 for v in views if v.status_readable)
        for view in views:
            if not view.gpus:
                continue
            gpu_type = view.gpu_type or ""
            activity = list(view.gpu_activity[: view.gpus])
            n_idle = 0
            for a in activity:
                if a.state == idle.IDLE:
                    n_idle += 1
                    seconds = min(a.idle_for(now), since_last)
                    m.gpu_idle_seconds.labels(gpu_type=gpu_type).inc(max(0.0, seconds))
            n_known = sum(1 for a in activity if a.state in (idle.IDLE, idle.BUSY))
            idle_by_type[gpu_type] = idle_by_type.get(gpu_type, 0) + n_idle
            unknown[gpu_type] = unknown.get(gpu_type, 0) + view.gpus - n_known
        types = set(pool.types) | set(idle_by_type) | set(unknown)
        m.set_by_type(m.gpus_total, {t: n for t, n in pool.total.items() if n is not None})
        m.set_by_type(m.gpus_allocated, {t: pool.allocated.get(t, 0) for t in types})
        m.set_by_type(m.gpus_idle, {t: idle_by_type.get(t, 0) for t in types})
        m.set_by_type(m.gpus_unknown, {t: unknown.get(t, 0) for t in types})
        by_type = queue_by_type(queued, now)
        m.set_by_type(
            m.queue_length, {t: by_type.get(t, (0, 0.0))[0] for t in types | set(by_type)}
        )
        m.set_by_type(m.queue_wait, {t: by_type.get(t, (0, 0.0))[1] for t in types | set(by_type)})
        m.servers.labels(status="readable").set(readable)
        m.servers.labels(status="unreadable").set(len(views) - readable)

    def health(self) -> dict[str, Any]:
        now = time.time()
        fresh = (
            self.last_cycle_end is not None and now - self.last_cycle_end < 3 * self.interval + 30
        )
        return {
            "ok": bool(fresh),
            "cycles": self.cycles,
            "last_cycle": self.last_cycle_end,
            "last_error": "the last cycle failed (see the service's log)"
            if self.last_error
            else None,
            "dry_run": self.dry_run,
            "actions_under_way": len(self.executor.tasks),
        }

    # -- web -------------------------------------------------------------------------------------

    def web_handlers(self) -> tuple[list[tuple], dict[str, Any]]:
        prefix = self.service_prefix
        handlers: list[tuple] = [
            (rf"{prefix}metrics", MetricsHandler),
            (rf"{prefix}health", HealthHandler),
            (
                rf"{prefix}{protocol.REPORT_PATH}",
                ReportHandler,
                {
                    "board": self.board,
                    "auth": self.server_auth,
                    "max_hold": self.report_hold,
                    "requests": self.user_requests,
                },
            ),
            (rf"{prefix}{protocol.ARBITER_PATH}", ArbiterHandler),
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

    def listen(self) -> HTTPServer:
        """Start the web server at `bind_url` on the running event loop."""
        bind = urlparse(self.bind_url)
        server = HTTPServer(self.make_web_app(), xheaders=True, max_body_size=self.max_body_size)
        server.listen(bind.port or 80, bind.hostname or "127.0.0.1")
        return server

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
        server = HTTPServer(self.make_web_app(), xheaders=True, max_body_size=self.max_body_size)
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
        with contextlib.suppress(Exception):  # the first readings for the first cycle
            await self.refresh_targets()
        sampler = asyncio.create_task(self.sample_forever(stopping))
        try:
            while not stopping.is_set():
                started = time.monotonic()
                await self.run_cycle()
                pause = max(0.0, self.interval - (time.monotonic() - started))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), pause)
        finally:
            server.stop()
            self.board.close()
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            if self.executor.tasks:
                self.log.info(
                    "gpuhub: waiting for %d action(s) under way", len(self.executor.tasks)
                )
                try:
                    await asyncio.wait_for(self.executor.wait(), 30)
                except asyncio.TimeoutError:
                    self.log.warning("gpuhub: leaving actions unfinished; the next run ends them")
            self.client.close()
            self.server_auth.close()
            if self.activity is not None:
                self.activity.close()

    async def sample_forever(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            started = time.monotonic()
            await self.sample_activity()
            pause = max(0.5, self.activity_interval - (time.monotonic() - started))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), pause)


def longest_waits(queued: list[Any], now: float) -> dict[str | None, float]:
    """The longest wait in seconds per wanted GPU type (None: requests for any type)."""
    out: dict[str | None, float] = {}
    for q in queued:
        key = q.gpu_type or None
        out[key] = max(out.get(key, 0.0), max(0.0, now - q.since))
    return out


def main(argv: list[str] | None = None) -> None:
    app = GpuhubService.instance()
    app.initialize(argv)
    app.start()
