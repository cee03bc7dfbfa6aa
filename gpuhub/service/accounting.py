"""GPU-hours in the service: each cycle, the trusted busy and idle seconds of every leased GPU
are counted into the store, and the week's GPU-hours set as metrics.

The arithmetic is `gpuhub.core.accounting`; held GPU-seconds come from the store's lease
intervals (written by whoever takes and frees the GPUs), busy and idle ones only from the
trusted activity source (`TrustedActivity`), never from what a user's server reports. Each
interval's `activity_until` moves on in the transaction that adds its seconds, so a restarted
service goes on where it stopped: what it did not see meanwhile stays unknown.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime

from ..activity.tracker import TrustedActivity
from ..core.accounting import (
    WEEK,
    ActivityCredit,
    LeaseInterval,
    credit_activity,
    device_segments,
    totals,
    week_start,
)
from ..store import Store
from .metrics import Metrics

log = logging.getLogger("gpuhub.service")


class GpuHours:
    """Counts GPU-hours each cycle (`update`) and keeps their metrics."""

    def __init__(
        self,
        store: Store,
        tracker: TrustedActivity,
        metrics: Metrics,
        *,
        per_user_metrics: bool = False,
        keep_weeks: int = 26,
        write: bool = True,
    ) -> None:
        self.store = store
        self.tracker = tracker
        self.metrics = metrics
        self.per_user_metrics = per_user_metrics
        self.keep_weeks = keep_weeks
        self.write = write
        self.last: datetime | None = None
        self.pruned_week: datetime | None = None

    def credits(
        self, intervals: list[LeaseInterval], now: datetime
    ) -> list[tuple[LeaseInterval, ActivityCredit]]:
        """What to add for each interval, from the tracker's stretches of its server's GPUs."""
        by_server: dict[tuple[str, str], list[LeaseInterval]] = defaultdict(list)
        for interval in intervals:
            by_server[(interval.user, interval.server)].append(interval)
        out = []
        for key, server_intervals in by_server.items():
            readings = self.tracker.segments(key, now.timestamp())
            segments = device_segments(server_intervals, readings)
            for interval in server_intervals:
                credit = credit_activity(interval, segments.get(interval.id, ()), now)
                if credit is not None:
                    out.append((interval, credit))
        return out

    def update(self, now: datetime) -> None:
        """Count the trusted seconds since the last cycle, then refresh the metrics."""
        intervals = self.store.intervals_to_credit()
        m = self.metrics
        if self.last is not None:
            for interval in intervals:
                held = interval.held_seconds(self.last, now, now)
                if held > 0:
                    m.held_gpu_seconds.labels(group=interval.group, gpu_type=interval.gpu_type).inc(
                        held
                    )
        self.last = now
        if self.write:
            credits = self.credits(intervals, now)
            applied = self.store.credit_activity(credits)
            if applied == len(credits):
                for interval, credit in credits:
                    labels = {"group": interval.group, "gpu_type": interval.gpu_type}
                    m.busy_gpu_seconds.labels(**labels).inc(credit.busy)
                    m.idle_gpu_seconds_trusted.labels(**labels).inc(credit.idle)
        self.set_week_gauges(now)
        self.prune(now)

    def set_week_gauges(self, now: datetime) -> None:
        m = self.metrics
        usage = self.store.week_usage(week_start(now), now)
        for gauge in (m.week_held, m.week_busy, m.week_idle):
            gauge.clear()
        for (group, gpu_type), u in totals(usage).items():
            m.week_held.labels(group=group, gpu_type=gpu_type).set(u.held)
            m.week_busy.labels(group=group, gpu_type=gpu_type).set(u.busy)
            m.week_idle.labels(group=group, gpu_type=gpu_type).set(u.idle)
        if self.per_user_metrics:
            m.user_week.clear()
            for u in usage:
                for kind, value in (("held", u.held), ("busy", u.busy), ("idle", u.idle)):
                    m.user_week.labels(
                        user=u.user, group=u.group, gpu_type=u.gpu_type, kind=kind
                    ).set(value)

    def prune(self, now: datetime) -> None:
        """Once a week: forget the weeks older than `keep_weeks` (0: keep them all)."""
        week = week_start(now)
        if not self.write or self.keep_weeks <= 0 or self.pruned_week == week:
            return
        gone = self.store.prune_accounting(week - self.keep_weeks * WEEK)
        self.pruned_week = week
        if gone:
            log.info("gpuhub: forgot %d GPU-hour record(s), %d weeks old", gone, self.keep_weeks)
