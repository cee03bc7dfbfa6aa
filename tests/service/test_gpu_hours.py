"""The service's GPU-hours: trusted readings counted into the store cycle by cycle, nothing
counted twice after a restart, what the service did not see left unknown; the metrics by group
and GPU type, per user only when asked for."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from gpuhub.activity import GpuSample
from gpuhub.activity.tracker import TrustedActivity
from gpuhub.core import idle
from gpuhub.core.accounting import week_start
from gpuhub.service.accounting import GpuHours
from gpuhub.service.metrics import Metrics
from gpuhub.store import LeaseIntervalRow, Store

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)  # a Wednesday


def readings(start: float, seconds: int, busy_for: int) -> list[GpuSample]:
    """One reading every 10 s: busy (90 %) for `busy_for` seconds, then idle (0 %)."""
    return [
        GpuSample("GPU-a", 90.0 if t < busy_for else 0.0, 1, start + t, 0.0)
        for t in range(0, seconds + 1, 10)
    ]


def test_cycles_count_busy_and_idle_once_and_a_restart_leaves_a_gap_unknown(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    store = Store(url)
    store.lease_devices("ada", "", "a100", ["GPU-a"], 1, group="students")
    start = NOW - timedelta(seconds=600)
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.update(LeaseIntervalRow).values(started_at=start))
    engine.dispose()
    tracker = TrustedActivity(idle.IdleRule())
    tracker.add(("ada", ""), readings(start.timestamp(), 600, busy_for=300))
    metrics = Metrics()
    hours = GpuHours(store, tracker, metrics)
    hours.update(NOW)
    hours.update(NOW + timedelta(seconds=60))  # the last reading holds for max_gap_s: idle
    [usage] = store.week_usage(week_start(NOW), NOW + timedelta(seconds=60))
    assert (usage.user, usage.group, usage.gpu_type) == ("ada", "students", "a100")
    assert (usage.held, usage.busy, usage.idle, usage.unknown) == (660.0, 300.0, 360.0, 0.0)
    text = metrics.exposition().decode()
    assert 'gpuhub_week_held_seconds{gpu_type="a100",group="students"} 660.0' in text
    assert 'gpuhub_week_busy_seconds{gpu_type="a100",group="students"} 300.0' in text
    assert 'gpuhub_week_idle_seconds{gpu_type="a100",group="students"} 360.0' in text
    assert 'gpuhub_accounted_busy_seconds_total{gpu_type="a100",group="students"} 300.0' in text
    assert 'gpuhub_accounted_held_seconds_total{gpu_type="a100",group="students"} 60.0' in text
    assert 'user="' not in text, "no user names in the metrics unless asked for"

    # the service restarts: its readings are gone, the store remembers what was counted
    restarted = GpuHours(
        Store(url), TrustedActivity(idle.IdleRule()), Metrics(True), per_user_metrics=True
    )
    restarted.update(NOW + timedelta(seconds=120))
    restarted.update(NOW + timedelta(seconds=120))  # the same cycle twice: nothing more
    [usage] = store.week_usage(week_start(NOW), NOW + timedelta(seconds=120))
    assert (usage.held, usage.busy, usage.idle, usage.unknown) == (720.0, 300.0, 360.0, 60.0)
    text = restarted.metrics.exposition().decode()
    assert (
        'gpuhub_user_week_seconds{gpu_type="a100",group="students",kind="idle",user="ada"} 360.0'
        in text
    )


def test_readings_of_another_server_never_count(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    store.lease_devices("ada", "", "a100", ["GPU-a"], 1)
    tracker = TrustedActivity(idle.IdleRule())
    now = datetime.now(timezone.utc)
    # bob's server is busy on a device named like ada's: it is not ada's
    tracker.add(("bob", ""), readings(now.timestamp() - 100, 100, busy_for=100))
    GpuHours(store, tracker, Metrics()).update(now)
    [usage] = store.week_usage(week_start(now), now)
    assert usage.busy == 0.0 and usage.idle == 0.0 and usage.unknown == usage.held
