"""The service's Prometheus metrics (served at `<service prefix>/metrics`).

One registry per service instance (not prometheus-client's global one), so several services can
live in one process (the tests do that). Labels never carry user names (except
`gpuhub_user_week_seconds`, off unless `GpuhubService.gpu_hours_user_metrics` is set): the
cardinality stays bounded by GPU types, groups and rule names, and the metrics can be scraped
without exposing who does what. docs/operations.md lists every metric; the Grafana dashboard
and the alert rules shipped in config/ use only these (a test checks it).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SNAPSHOT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
CYCLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, per_user_gpu_hours: bool = False) -> None:
        self.registry = r = CollectorRegistry()
        self.gpus_total = Gauge(
            "gpuhub_gpus_total", "GPUs in the pool, by type.", ["gpu_type"], registry=r
        )
        self.gpus_free_measured = Gauge(
            "gpuhub_gpus_free_measured",
            "Free GPUs as the hub's cluster watch counted them (other workloads' pods included,"
            " cordoned and not ready nodes left out), by type; only while its counts are fresh.",
            ["gpu_type"],
            registry=r,
        )
        self.gpus_unavailable = Gauge(
            "gpuhub_gpus_unavailable",
            "GPUs on cordoned or not ready nodes (not in the pool for now), by type.",
            ["gpu_type"],
            registry=r,
        )
        self.capacity_age = Gauge(
            "gpuhub_capacity_age_seconds",
            "Age of the cluster's GPU counts the service used, by type.",
            ["gpu_type"],
            registry=r,
        )
        self.gpus_allocated = Gauge(
            "gpuhub_gpus_allocated",
            "GPUs leased to servers, by type.",
            ["gpu_type"],
            registry=r,
        )
        self.gpus_idle = Gauge(
            "gpuhub_gpus_idle",
            "Leased GPUs that their server reports idle, by type.",
            ["gpu_type"],
            registry=r,
        )
        self.gpus_unknown = Gauge(
            "gpuhub_gpus_unknown",
            "Leased GPUs whose activity is not known (status unreadable, MIG, no NVML), by type.",
            ["gpu_type"],
            registry=r,
        )
        self.gpu_idle_seconds = Counter(
            "gpuhub_gpu_idle_seconds",
            "Allocated-but-idle GPU-seconds: GPUs leased while idle, times the seconds they were.",
            ["gpu_type"],
            registry=r,
        )
        # GPU-hours (gpuhub.service.accounting): held from the store's lease intervals, busy and
        # idle from the trusted activity source only; unknown = held - busy - idle
        by_group = ["group", "gpu_type"]
        self.held_gpu_seconds = Counter(
            "gpuhub_accounted_held_seconds",
            "GPU-seconds held (leased), by the group they count for and GPU type.",
            by_group,
            registry=r,
        )
        self.busy_gpu_seconds = Counter(
            "gpuhub_accounted_busy_seconds",
            "GPU-seconds the trusted activity source read busy, by group and GPU type.",
            by_group,
            registry=r,
        )
        self.idle_gpu_seconds_trusted = Counter(
            "gpuhub_accounted_idle_seconds",
            "GPU-seconds the trusted activity source read idle, by group and GPU type (held "
            "seconds with no reading count as neither busy nor idle).",
            by_group,
            registry=r,
        )
        self.week_held = Gauge(
            "gpuhub_week_held_seconds",
            "GPU-seconds held this week (from Monday 00:00 UTC), by group and GPU type.",
            by_group,
            registry=r,
        )
        self.week_busy = Gauge(
            "gpuhub_week_busy_seconds",
            "GPU-seconds read busy this week, by group and GPU type.",
            by_group,
            registry=r,
        )
        self.week_idle = Gauge(
            "gpuhub_week_idle_seconds",
            "GPU-seconds read idle this week, by group and GPU type.",
            by_group,
            registry=r,
        )
        self.user_week = Gauge(
            "gpuhub_user_week_seconds",
            "GPU-seconds this week per user, group, GPU type and kind (held, busy, idle); only "
            "with GpuhubService.gpu_hours_user_metrics (one series per user).",
            ["user", "group", "gpu_type", "kind"],
            registry=r if per_user_gpu_hours else None,
        )
        self.releases = Counter(
            "gpuhub_releases",
            "GPU releases (server restarted without GPU), by rule and GPU type.",
            ["rule", "gpu_type"],
            registry=r,
        )
        self.stops = Counter(
            "gpuhub_stops", "Servers stopped by the service, by rule.", ["rule"], registry=r
        )
        self.notices = Counter(
            "gpuhub_notices",
            "Warnings sent to users (work in progress kept, lease ending, snapshot retry).",
            ["rule"],
            registry=r,
        )
        self.action_failures = Counter(
            "gpuhub_action_failures",
            "Releases and stops that failed, by kind and by the step that failed.",
            ["kind", "step"],
            registry=r,
        )
        self.snapshot_duration = Histogram(
            "gpuhub_snapshot_duration_seconds",
            "Time to snapshot a server's kernels before a release or a stop.",
            buckets=SNAPSHOT_BUCKETS,
            registry=r,
        )
        self.snapshot_failures = Counter(
            "gpuhub_snapshot_failures",
            "Snapshots that failed (nothing was released or stopped).",
            registry=r,
        )
        self.queue_length = Gauge(
            "gpuhub_queue_length", "Spawns waiting for a GPU, by type.", ["gpu_type"], registry=r
        )
        self.queue_wait = Gauge(
            "gpuhub_queue_wait_seconds",
            "How long the longest-waiting spawn has waited for a GPU, by type.",
            ["gpu_type"],
            registry=r,
        )
        self.servers = Gauge(
            "gpuhub_servers",
            "Ready servers seen in the last cycle, by whether their status could be read.",
            ["status"],
            registry=r,
        )
        self.status_errors = Counter(
            "gpuhub_status_read_errors",
            "Server status reads that failed (such servers are never treated as idle).",
            registry=r,
        )
        self.cycle_duration = Histogram(
            "gpuhub_cycle_duration_seconds",
            "Time of one loop cycle: list servers, read their status, decide (not the actions).",
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self.cycles = Counter("gpuhub_cycles", "Loop cycles run.", registry=r)
        self.cycle_errors = Counter(
            "gpuhub_cycle_errors",
            "Loop cycles that ended in an error (the hub API failed, say).",
            registry=r,
        )
        self.last_cycle = Gauge(
            "gpuhub_last_cycle_timestamp_seconds",
            "When the last successful loop cycle ended (unix time).",
            registry=r,
        )
        self.dry_run = Gauge(
            "gpuhub_dry_run", "1 when the service only logs what it would do.", registry=r
        )

    def set_by_type(self, gauge: Gauge, values: dict[str, float]) -> None:
        gauge.clear()
        for gpu_type, value in values.items():
            gauge.labels(gpu_type=gpu_type).set(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def names(self) -> set[str]:
        """Every sample name this registry can expose (with `_total`, `_bucket`, ...)."""
        out = set()
        for collector in self.registry.collect():
            out.add(collector.name)
            for sample in collector.samples:
                out.add(sample.name)
            if collector.type == "counter":
                out |= {f"{collector.name}_total", f"{collector.name}_created"}
            if collector.type == "histogram":
                out |= {f"{collector.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        return out
