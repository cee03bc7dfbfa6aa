"""GPU-hours in the store, on SQLite and PostgreSQL: intervals open and close with the leases in
the same transaction, activity credits are applied once, weeks are kept apart, a restart of
whoever holds the store loses nothing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from gpuhub.core.accounting import UsageKey, credit_activity, week_start
from gpuhub.core.idle import BUSY, IDLE, UNKNOWN, Segment
from gpuhub.store import GpuQuotaReached, LeaseIntervalRow, Store, utcnow

DEVICES = [f"GPU-{i}" for i in range(4)]
MONDAY = datetime(2026, 11, 23, tzinfo=timezone.utc)


def backdate(db_url: str, user: str, started: datetime, ended: datetime | None = None) -> None:
    """Move `user`'s intervals back in time (as if the lease had been taken then)."""
    engine = sa.create_engine(db_url)
    with engine.begin() as c:
        c.execute(
            sa.update(LeaseIntervalRow)
            .where(LeaseIntervalRow.user == user)
            .values(started_at=started, **({"ended_at": ended} if ended else {}))
        )
    engine.dispose()


def test_intervals_follow_the_leases_with_group_and_type(db_url):
    store = Store(db_url)
    before = utcnow()
    store.lease_devices("ada", "", "a100", DEVICES, 2, group="students")
    store.lease_units("bo", "big", "shared", 1, group="")
    [a, b, c] = store.lease_intervals(before - timedelta(hours=1), before + timedelta(days=1))
    assert [(i.user, i.group, i.gpu_type, i.device, i.ended_at) for i in (a, b, c)] == [
        ("ada", "students", "a100", "GPU-0", None),
        ("ada", "students", "a100", "GPU-1", None),
        ("bo", "", "shared", None, None),
    ]
    assert a.started_at == store.leases("ada")[0].leased_at
    store.free_leases("ada", "")
    freed = store.reconcile(set())  # a hub start that finds bo's server gone
    assert [lease.user for lease in freed] == ["bo"]
    ended = store.lease_intervals(before, utcnow() + timedelta(seconds=1))
    assert all(i.ended_at is not None for i in ended) and len(ended) == 3
    # a freed lease id used again opens a new interval; the old ones stay closed
    store.lease_devices("cy", "", "a100", DEVICES, 1, group="staff")
    opened = [i for i in store.lease_intervals(before, utcnow()) if i.ended_at is None]
    assert [(i.user, i.device) for i in opened] == [("cy", "GPU-0")]


def test_a_refused_lease_opens_no_interval(db_url):
    store = Store(db_url)
    store.lease_devices("ada", "a", "gpu", DEVICES, 1, max_user_gpus=1)
    with pytest.raises(GpuQuotaReached):
        store.lease_devices("ada", "b", "gpu", DEVICES, 1, max_user_gpus=1)
    now = utcnow()
    assert len(store.lease_intervals(now - timedelta(hours=1), now + timedelta(hours=1))) == 1


def test_held_seconds_split_at_the_week_boundary(db_url):
    store = Store(db_url)
    store.lease_devices("ada", "", "a100", DEVICES, 1, group="students")
    # held from Sunday 22:00 to Monday 02:00: two hours in each week
    backdate(db_url, "ada", MONDAY - timedelta(hours=2), MONDAY + timedelta(hours=2))
    later = MONDAY + timedelta(days=1)
    last_week = store.week_usage(MONDAY - timedelta(days=7), now=later)
    this_week = store.week_usage(MONDAY, now=later)
    assert [(u.user, u.group, u.gpu_type, u.held) for u in last_week] == [
        ("ada", "students", "a100", 7200.0)
    ]
    assert [u.held for u in this_week] == [7200.0]
    assert store.gpu_seconds_held("ada", MONDAY, later) == 7200.0


def test_activity_is_credited_once_by_week_and_survives_a_new_store_object(db_url):
    store = Store(db_url)
    store.lease_devices("ada", "", "a100", DEVICES, 1, group="students")
    backdate(db_url, "ada", MONDAY - timedelta(hours=1))
    now = MONDAY + timedelta(hours=1)
    t0 = (MONDAY - timedelta(hours=1)).timestamp()
    segments = [
        Segment(t0, t0 + 1800, BUSY),  # Sunday 23:00-23:30 busy
        Segment(t0 + 1800, t0 + 5400, IDLE),  # 23:30-00:30 idle, across the boundary
        Segment(t0 + 5400, t0 + 7200, UNKNOWN),
    ]
    [interval] = store.intervals_to_credit()
    credit = credit_activity(interval, segments, now)
    assert store.credit_activity([(interval, credit)]) == 1
    # the same credit again (a retry, a second service): nothing is added twice
    assert store.credit_activity([(interval, credit)]) == 0
    again = Store(db_url)  # the service restarted: what was counted is in the store
    key = UsageKey("ada", "students", "a100")
    assert again.week_activity(MONDAY - timedelta(days=7)) == {key: (1800.0, 1800.0)}
    assert again.week_activity(MONDAY) == {key: (0.0, 1800.0)}
    [usage] = again.week_usage(MONDAY, now=now)
    assert (usage.held, usage.busy, usage.idle, usage.unknown) == (3600.0, 0.0, 1800.0, 1800.0)
    [interval] = again.intervals_to_credit()  # still held: counted up to `now`
    assert interval.activity_until == now
    assert credit_activity(interval, segments, now) is None
    # the release ends it; the rest is credited and it leaves the list
    again.free_leases("ada", "")
    [interval] = again.intervals_to_credit()
    credit = credit_activity(interval, segments, utcnow())
    assert again.credit_activity([(interval, credit)]) == 1
    assert again.intervals_to_credit() == []


def test_old_weeks_are_pruned(db_url):
    store = Store(db_url)
    store.lease_devices("ada", "", "a100", DEVICES, 1)
    store.free_leases("ada", "")
    backdate(db_url, "ada", MONDAY - timedelta(days=60), MONDAY - timedelta(days=59))
    [interval] = store.intervals_to_credit()
    store.credit_activity([(interval, credit_activity(interval, [], MONDAY))])
    store.lease_devices("bo", "", "a100", DEVICES, 1)  # held now: kept
    assert store.prune_accounting(week_start(MONDAY) - timedelta(days=28)) == 1
    now = utcnow()
    assert [i.user for i in store.lease_intervals(MONDAY - timedelta(days=90), now)] == ["bo"]
