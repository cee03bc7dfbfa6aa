"""gpuhub's own state: GPU leases, the environments and group quotas admins set at runtime, the
history of what the gpuhub service did and why (and, as gpuhub grows, its queue).

SQLAlchemy; a SQLite file by default, or PostgreSQL (`postgresql+psycopg://...`). The store is the
one owner of who holds which GPU: the unique constraint on `gpu_leases.device` is what guarantees
that no GPU is ever given to two servers, also across processes and machines.

The tables are the models below; their schema changes only through a migration
(gpuhub/migrations, docs/upgrades.md), which `Store` runs when it opens the database
(`gpuhub.schema.prepare`). Each public method of `Store` is one transaction, retried after a lost
connection or a serialization failure (`gpuhub.db_retry`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    false,
    func,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from . import schema
from .core.accounting import WEEK, ActivityCredit, LeaseInterval, Usage, UsageKey, week_usage
from .core.queue import QueueEntry
from .db_retry import retry_transient_errors

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class LeaseRow(Base):
    __tablename__ = "gpu_leases"
    __table_args__ = (UniqueConstraint("device", name="uq_gpu_leases_device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(255), index=True)
    server: Mapped[str] = mapped_column(String(255), default="")
    gpu_type: Mapped[str] = mapped_column(String(255))
    #: The device (GPU or MIG UUID) on the local backend; NULL where the cluster assigns devices.
    device: Mapped[str | None] = mapped_column(String(255), nullable=True)
    leased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


@dataclass(frozen=True)
class GpuLease:
    user: str
    server: str
    gpu_type: str
    device: str | None
    leased_at: datetime

    @property
    def holder(self) -> tuple[str, str]:
        return (self.user, self.server)


class CatalogEntryRow(Base):
    """An environment an admin registered or changed at runtime, over the catalogue file's."""

    __tablename__ = "catalog_environments"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    #: JSON, in the shape of one `environments` entry of the catalogue file
    data: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(255), default="")


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    data: Mapping[str, Any]
    updated_at: datetime
    updated_by: str


class GroupQuotaRow(Base):
    """A group's quota as an admin set it at runtime, over the configured one."""

    __tablename__ = "group_quotas"

    group: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: an integer as text, "unlimited", or NULL (not set by this entry)
    max_gpus: Mapped[str | None] = mapped_column(String(32), nullable=True)
    max_servers: Mapped[str | None] = mapped_column(String(32), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(255), default="")


@dataclass(frozen=True)
class StoredQuota:
    group: str
    max_gpus: int | str | None
    max_servers: int | str | None
    updated_at: datetime
    updated_by: str


class ActionRow(Base):
    """One thing the gpuhub service did (or set out to do) to a server, and why.

    `status` moves through the steps of the action (see `ACTION_OPEN`), so a service restarted in
    the middle of one finds it and finishes it instead of starting it again.
    """

    __tablename__ = "gpuhub_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user: Mapped[str] = mapped_column(String(255), index=True)
    server: Mapped[str] = mapped_column(String(255), default="")
    #: the server's `started` time as the hub reports it: which run of the server this was
    server_started: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))  # "release" | "stop" | "warn"
    rule: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(255))  # who: the service, or an admin's name
    status: Mapped[str] = mapped_column(String(32), index=True)
    gpus: Mapped[int] = mapped_column(Integer, default=0)
    gpu_type: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: JSON: the server's user options before the action (to give the GPU back with them)
    user_options: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: JSON: the kernel snapshots taken for the action
    snapshots: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    notified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class IdleGapRow(Base):
    """What the learned release policy knows about one server's, user's or the site's pauses.

    `scope` is "server" (`key` "user/server"), "user" (`key` the user's name), "site" (`key`
    empty), or "open" (a pause under way; `key` is the JSON list [user, server]). `data` is JSON:
    the latest pauses as [seconds, returned] pairs, or the open pause's state. Bounded: the
    service keeps at most a configured number of rows, dropping the least recently updated.
    """

    __tablename__ = "gpuhub_idle_gaps"

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(520), primary_key=True)
    data: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )


class ActionStatus(str, Enum):
    """The steps of an action (`gpuhub_actions.status` holds the member's value)."""

    PLANNED = "planned"
    SNAPSHOTTING = "snapshotting"
    SNAPSHOTTED = "snapshotted"
    STOPPING = "stopping"
    STARTING = "starting"
    DONE = "done"
    FAILED = "failed"
    #: the snapshot could not be taken (the server changed under it); nothing was changed
    ABORTED = "aborted"
    #: interrupted before the server was changed, and the rule no longer applies
    ABANDONED = "abandoned"
    SNAPSHOT_FAILED = "snapshot-failed"

    def __str__(self) -> str:
        return self.value


def _status_text(status: str) -> str:
    return status.value if isinstance(status, ActionStatus) else status


#: statuses of an action still under way: planned, then the snapshot, the stop and (for a
#: release) the start without GPU
ACTION_OPEN = (
    ActionStatus.PLANNED,
    ActionStatus.SNAPSHOTTING,
    ActionStatus.SNAPSHOTTED,
    ActionStatus.STOPPING,
    ActionStatus.STARTING,
)


@dataclass(frozen=True)
class ActionRecord:
    id: int
    created_at: datetime
    updated_at: datetime
    user: str
    server: str
    server_started: str | None
    kind: str
    rule: str
    reason: str
    actor: str
    status: str
    gpus: int
    gpu_type: str | None
    user_options: Mapping[str, Any] | None
    snapshots: list[Mapping[str, Any]] | None
    error: str | None
    notified_at: datetime | None

    @property
    def open(self) -> bool:
        return self.status in ACTION_OPEN


def _to_action(row: ActionRow) -> ActionRecord:
    return ActionRecord(
        id=row.id,
        created_at=_aware(row.created_at),
        updated_at=_aware(row.updated_at),
        user=row.user,
        server=row.server,
        server_started=row.server_started,
        kind=row.kind,
        rule=row.rule,
        reason=row.reason,
        actor=row.actor,
        status=row.status,
        gpus=row.gpus,
        gpu_type=row.gpu_type,
        user_options=json.loads(row.user_options) if row.user_options else None,
        snapshots=json.loads(row.snapshots) if row.snapshots else None,
        error=row.error,
        notified_at=_aware(row.notified_at) if row.notified_at else None,
    )


def _limit_text(value: int | str | None) -> str | None:
    return None if value is None else str(value)


def _limit_value(text: str | None) -> int | str | None:
    if text is None:
        return None
    return int(text) if text.isdigit() else text


def _aware(t: datetime) -> datetime:
    """`t` in UTC (SQLite gives naive times, PostgreSQL the server's time zone)."""
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


class NoGpuFree(Exception):
    """Fewer GPUs of a type are free than a spawn asks for."""

    def __init__(self, gpu_type: str, wanted: int, free: int) -> None:
        self.gpu_type = gpu_type
        self.wanted = wanted
        self.free = free
        noun = "GPU is" if free == 1 else "GPUs are"
        super().__init__(
            f"no {gpu_type} GPU free for you right now: {wanted} asked, {free} {noun} free"
        )


class GpuQuotaReached(Exception):
    """Taking GPUs would make a user hold more than their GPU quota (checked in the transaction
    that takes them: a spawn admitted earlier, or waiting in the queue, cannot go over)."""

    def __init__(self, user: str, held: int, wanted: int, limit: int) -> None:
        self.user = user
        self.held = held
        self.wanted = wanted
        self.limit = limit
        super().__init__(
            f"{user} holds {held} GPU(s) of a limit of {limit}; {wanted} more would go over it"
        )


class QueueRow(Base):
    """A spawn waiting for GPUs (see gpuhub.core.queue); one per server."""

    __tablename__ = "gpu_queue"
    __table_args__ = (UniqueConstraint("user", "server", name="uq_gpu_queue_server"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(255))
    server: Mapped[str] = mapped_column(String(255), default="")
    gpu_type: Mapped[str] = mapped_column(String(255), index=True)
    gpus: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: Refreshed while the spawn waits; an entry not seen for a while does not hold up others.
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user_options: Mapped[str] = mapped_column(Text, default="{}")
    #: the server runs without a GPU meanwhile (`when_no_gpu: start-on-cpu`), kept alive by the
    #: gpuhub service, switched to the GPU at its turn (gpuhub.service.cpu_start)
    on_cpu: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: "not now": out of the line until then, its place kept
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    not_now_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: when the user was told that their turn has come
    offered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ServerPodRow(Base):
    """Where a server's pod runs on Kubernetes (set by GPUKubeSpawner when the server has
    started, removed when it stops): how the gpuhub service finds the server's series in the
    cluster's GPU metrics. A pod belongs to one server at a time."""

    __tablename__ = "server_pods"
    __table_args__ = (UniqueConstraint("namespace", "pod", name="uq_server_pods_pod"),)

    user: Mapped[str] = mapped_column(String(255), primary_key=True)
    server: Mapped[str] = mapped_column(String(255), primary_key=True, default="")
    namespace: Mapped[str] = mapped_column(String(63))
    pod: Mapped[str] = mapped_column(String(253))
    node: Mapped[str | None] = mapped_column(String(253), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


@dataclass(frozen=True)
class ServerPod:
    user: str
    server: str
    namespace: str
    pod: str
    node: str | None
    updated_at: datetime

    @property
    def holder(self) -> tuple[str, str]:
        return (self.user, self.server)


def _to_server_pod(row: ServerPodRow) -> ServerPod:
    return ServerPod(row.user, row.server, row.namespace, row.pod, row.node, _aware(row.updated_at))


class CapacityRow(Base):
    """GPUs of one type as the one who can see them counted them (the Kubernetes spawner's node
    and pod watch), for the service, the pages and the metrics to read."""

    __tablename__ = "gpu_capacity"

    gpu_type: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: GPUs of the type on nodes that can take pods now
    total: Mapped[int] = mapped_column(Integer)
    #: of those, not requested by any pod nor promised to a spawn
    free: Mapped[int] = mapped_column(Integer)
    #: GPUs of the type on nodes that cannot take pods now (cordoned, not ready)
    unavailable: Mapped[int] = mapped_column(Integer, default=0)
    #: the most GPUs of the type ever offered (a type no node ever offered is refused)
    offered_max: Mapped[int] = mapped_column(Integer, default=0)
    #: why some of the type's GPUs cannot be used now ("the 1 node with T4 GPUs is cordoned")
    note: Mapped[str] = mapped_column(Text, default="")
    #: who counted ("kubernetes")
    source: Mapped[str] = mapped_column(String(64))
    measured_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: seconds after `measured_at` the counts are still to be trusted
    valid_for: Mapped[float] = mapped_column(Float, default=60.0)


@dataclass(frozen=True)
class MeasuredCapacity:
    """One GPU type's published counts (see `CapacityRow`)."""

    gpu_type: str
    total: int
    free: int
    unavailable: int = 0
    offered_max: int = 0
    note: str = ""
    source: str = ""
    measured_at: datetime | None = None
    valid_for: float = 60.0

    def age(self, now: datetime | None = None) -> float:
        if self.measured_at is None:
            return 0.0
        return max(0.0, ((now or utcnow()) - self.measured_at).total_seconds())

    def fresh(self, now: datetime | None = None) -> bool:
        return self.age(now) <= self.valid_for


def _to_capacity(row: CapacityRow) -> MeasuredCapacity:
    return MeasuredCapacity(
        gpu_type=row.gpu_type,
        total=row.total,
        free=row.free,
        unavailable=row.unavailable,
        offered_max=row.offered_max,
        note=row.note or "",
        source=row.source,
        measured_at=_aware(row.measured_at),
        valid_for=row.valid_for,
    )


def _to_entry(row: QueueRow) -> QueueEntry:
    return QueueEntry(
        user=row.user,
        server=row.server,
        gpu_type=row.gpu_type,
        gpus=row.gpus,
        enqueued_at=_aware(row.enqueued_at),
        seen_at=_aware(row.seen_at),
        priority=row.priority,
        id=row.id,
        user_options=json.loads(row.user_options or "{}"),
        on_cpu=bool(row.on_cpu),
        not_before=_aware(row.not_before) if row.not_before is not None else None,
        not_now_count=row.not_now_count or 0,
        offered_at=_aware(row.offered_at) if row.offered_at is not None else None,
    )


def _to_lease(row: LeaseRow) -> GpuLease:
    return GpuLease(row.user, row.server, row.gpu_type, row.device, _aware(row.leased_at))


class CapacityStore:
    """The published GPU capacity (table `gpu_capacity`); mixed into `Store`."""

    def session(self) -> Session:  # provided by Store
        raise NotImplementedError

    def publish_capacity(
        self,
        counts: Iterable[MeasuredCapacity],
        source: str,
        valid_for: float,
        now: datetime | None = None,
    ) -> None:
        """Replace what `source` published: one row per GPU type in `counts`. A type no longer
        counted keeps its row with zero GPUs, so that it is known to have been offered once."""
        now = now or utcnow()
        counts = {c.gpu_type: c for c in counts}
        with self.session() as s:
            rows = {r.gpu_type: r for r in s.scalars(select(CapacityRow))}
            for gpu_type, c in counts.items():
                row = rows.get(gpu_type)
                if row is None:
                    row = CapacityRow(gpu_type=gpu_type, offered_max=0)
                    s.add(row)
                row.total = c.total
                row.free = c.free
                row.unavailable = c.unavailable
                row.offered_max = max(row.offered_max or 0, c.total + c.unavailable)
                row.note = c.note
                row.source = source
                row.measured_at = now
                row.valid_for = valid_for
            for gpu_type, row in rows.items():
                if gpu_type not in counts and row.source == source:
                    row.total = row.free = row.unavailable = 0
                    row.note = ""
                    row.measured_at = now
                    row.valid_for = valid_for
            s.commit()

    def clear_capacity(self, source: str | None = None) -> int:
        """Forget what `source` (or everyone) published; returns how many rows went."""
        with self.session() as s:
            query = delete(CapacityRow)
            if source is not None:
                query = query.where(CapacityRow.source == source)
            deleted = s.execute(query)
            s.commit()
            return int(deleted.rowcount or 0)

    def measured_capacity(self) -> dict[str, MeasuredCapacity]:
        """Every published GPU type's counts (stale ones included: see `fresh()`)."""
        with self.session() as s:
            return {r.gpu_type: _to_capacity(r) for r in s.scalars(select(CapacityRow))}


class LeaseIntervalRow(Base):
    """One leased GPU from its lease to its release: what GPU-hours held are derived from
    (`gpuhub.core.accounting`). Written in the transaction that takes or frees the GPU, so no
    second is lost or counted twice, whatever restarts."""

    __tablename__ = "gpu_lease_intervals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: the `gpu_leases` row while the GPU is held (ids of freed leases may be used again)
    lease_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    user: Mapped[str] = mapped_column(String(255), index=True)
    server: Mapped[str] = mapped_column(String(255), default="")
    #: the group the GPU-hours count for (the quotas' rule, `accounting_group`); "" for none
    group: Mapped[str] = mapped_column(String(255), default="")
    gpu_type: Mapped[str] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(255), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    ended_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, index=True
    )
    #: up to when the trusted GPU activity of this GPU has been counted into `gpu_week_activity`
    activity_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WeekActivityRow(Base):
    """Busy and idle GPU-seconds from the trusted activity source, per week (its Monday 00:00
    UTC), user, group and GPU type; added to by the gpuhub service as `activity_until` of the
    intervals moves on, in the same transaction."""

    __tablename__ = "gpu_week_activity"

    week_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    user: Mapped[str] = mapped_column(String(255), primary_key=True)
    group: Mapped[str] = mapped_column(String(255), primary_key=True)
    gpu_type: Mapped[str] = mapped_column(String(255), primary_key=True)
    busy_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    idle_seconds: Mapped[float] = mapped_column(Float, default=0.0)


def _to_interval(row: LeaseIntervalRow) -> LeaseInterval:
    return LeaseInterval(
        id=row.id,
        user=row.user,
        server=row.server,
        group=row.group or "",
        gpu_type=row.gpu_type,
        device=row.device,
        started_at=_aware(row.started_at),
        ended_at=_aware(row.ended_at) if row.ended_at else None,
        activity_until=_aware(row.activity_until) if row.activity_until else None,
    )


@retry_transient_errors
class AccountingStore:
    """GPU-hours (tables `gpu_lease_intervals`, `gpu_week_activity`); mixed into `Store`."""

    _not_retried = ("session",)

    def session(self) -> Session:  # provided by Store
        raise NotImplementedError

    @staticmethod
    def _open_intervals(s: Session, rows: Iterable[LeaseRow], group: str) -> None:
        """Open the intervals of leases just added (flushed, so they have ids)."""
        s.add_all(
            LeaseIntervalRow(
                lease_id=r.id,
                user=r.user,
                server=r.server,
                group=group,
                gpu_type=r.gpu_type,
                device=r.device,
                started_at=r.leased_at,
            )
            for r in rows
        )

    @staticmethod
    def _close_intervals(s: Session, lease_ids: Iterable[int], now: datetime) -> None:
        ids = list(lease_ids)
        if not ids:
            return
        for row in s.scalars(
            select(LeaseIntervalRow).where(
                LeaseIntervalRow.lease_id.in_(ids), LeaseIntervalRow.ended_at.is_(None)
            )
        ):
            row.ended_at = now
            row.lease_id = None

    def lease_intervals(
        self, start: datetime, end: datetime, user: str | None = None
    ) -> list[LeaseInterval]:
        """The intervals that overlap [start, end) (open ones included), oldest first."""
        with self.session() as s:
            query = (
                select(LeaseIntervalRow)
                .where(
                    LeaseIntervalRow.started_at < end,
                    or_(LeaseIntervalRow.ended_at.is_(None), LeaseIntervalRow.ended_at > start),
                )
                .order_by(LeaseIntervalRow.started_at, LeaseIntervalRow.id)
            )
            if user is not None:
                query = query.where(LeaseIntervalRow.user == user)
            return [_to_interval(r) for r in s.scalars(query)]

    def intervals_to_credit(self) -> list[LeaseInterval]:
        """The intervals whose trusted activity is not counted to their end yet."""
        with self.session() as s:
            query = select(LeaseIntervalRow).where(
                or_(
                    LeaseIntervalRow.ended_at.is_(None),
                    LeaseIntervalRow.activity_until.is_(None),
                    LeaseIntervalRow.activity_until < LeaseIntervalRow.ended_at,
                )
            )
            return [_to_interval(r) for r in s.scalars(query.order_by(LeaseIntervalRow.id))]

    def credit_activity(self, credits: Iterable[tuple[LeaseInterval, ActivityCredit]]) -> int:
        """Add each credit's busy and idle seconds to its weeks and move its interval's
        `activity_until` on, all in one transaction. A credit computed from an interval whose
        `activity_until` has moved since (another run counted it) is skipped. Returns how many
        were applied."""
        applied = 0
        with self.session() as s:
            for interval, credit in credits:
                row = s.get(LeaseIntervalRow, interval.id)
                if row is None:
                    continue
                current = _aware(row.activity_until) if row.activity_until else None
                if current != interval.activity_until:
                    continue
                row.activity_until = credit.until
                for week, busy, idle in credit.weeks:
                    key = (week, interval.user, interval.group, interval.gpu_type)
                    week_row = s.get(WeekActivityRow, key)
                    if week_row is None:
                        week_row = WeekActivityRow(
                            week_start=week,
                            user=interval.user,
                            group=interval.group,
                            gpu_type=interval.gpu_type,
                            busy_seconds=0.0,
                            idle_seconds=0.0,
                        )
                        s.add(week_row)
                    week_row.busy_seconds = (week_row.busy_seconds or 0.0) + busy
                    week_row.idle_seconds = (week_row.idle_seconds or 0.0) + idle
                applied += 1
            s.commit()
        return applied

    def week_activity(self, week: datetime) -> dict[UsageKey, tuple[float, float]]:
        """(busy, idle) seconds counted for the week starting at `week`."""
        with self.session() as s:
            rows = s.scalars(select(WeekActivityRow).where(WeekActivityRow.week_start == week))
            return {
                UsageKey(r.user, r.group, r.gpu_type): (r.busy_seconds, r.idle_seconds)
                for r in rows
            }

    def week_usage(
        self, week: datetime, now: datetime | None = None, user: str | None = None
    ) -> list[Usage]:
        """Each (user, group, GPU type)'s GPU-seconds held, busy and idle in the week starting
        at `week` (Monday 00:00 UTC), as of `now`; only `user`'s when given."""
        now = now or utcnow()
        end = week + WEEK
        activity = self.week_activity(week)
        if user is not None:
            activity = {k: v for k, v in activity.items() if k.user == user}
        return week_usage(self.lease_intervals(week, end, user), activity, week, end, now)

    def gpu_seconds_held(self, user: str, start: datetime, now: datetime | None = None) -> float:
        """GPU-seconds `user` held from `start` to `now` (their budget's use this week)."""
        now = now or utcnow()
        return sum(i.held_seconds(start, now, now) for i in self.lease_intervals(start, now, user))

    def prune_accounting(self, before: datetime) -> int:
        """Forget intervals that ended before `before` with their activity counted, and the weeks
        that started before it; returns how many rows went."""
        with self.session() as s:
            gone = s.execute(
                delete(LeaseIntervalRow).where(
                    LeaseIntervalRow.ended_at < before,
                    LeaseIntervalRow.activity_until >= LeaseIntervalRow.ended_at,
                )
            ).rowcount
            gone += s.execute(
                delete(WeekActivityRow).where(WeekActivityRow.week_start < before)
            ).rowcount
            s.commit()
            return int(gone or 0)


@retry_transient_errors
class Store(CapacityStore, AccountingStore):
    """Leases in a SQL database; one `Store` per URL and process (see `Store.at`).

    Opening it brings the database to this gpuhub's schema (`gpuhub.schema.prepare`: a SQLite
    file is backed up first) unless `upgrade` is False; a database newer than this gpuhub raises
    `gpuhub.schema.SchemaTooNew`.
    """

    _instances: dict[str, Store] = {}
    _instances_lock = threading.Lock()
    _not_retried = ("session",)

    def __init__(self, url: str, *, upgrade: bool = True, backup: bool = True) -> None:
        self.url = url
        sqlite = url.startswith("sqlite")
        connect_args = {"timeout": 30} if sqlite else {}
        # pool_pre_ping: a connection the server closed since its last use is replaced, unseen
        self.engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.schema = schema.prepare(self.engine, upgrade=upgrade, backup=backup)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def at(cls, url: str) -> Store:
        """The process's `Store` for `url`, created on first use."""
        with cls._instances_lock:
            if url not in cls._instances:
                cls._instances[url] = cls(url)
            return cls._instances[url]

    def session(self) -> Session:
        return self._session()

    # -- leases ----------------------------------------------------------------------------------

    def lease_devices(
        self,
        user: str,
        server: str,
        gpu_type: str,
        candidates: Iterable[str],
        count: int,
        attempts: int = 5,
        max_user_gpus: int | None = None,
        group: str = "",
    ) -> list[str]:
        """Lease `count` of the `candidates` devices to `user`'s `server`, all or none.

        Devices are taken in the order given. Raises `NoGpuFree` when too few are free, and
        `GpuQuotaReached` when the user would then hold more than `max_user_gpus` (None: no
        limit), counted in the same transaction. Each GPU's interval (its GPU-hours, counted for
        `group`) opens in the same transaction.
        """
        candidates = list(candidates)
        for _ in range(attempts):
            with self.session() as s:
                taken = set(
                    s.scalars(select(LeaseRow.device).where(LeaseRow.device.in_(candidates)))
                )
                free = [d for d in candidates if d not in taken]
                if len(free) < count:
                    raise NoGpuFree(gpu_type, count, len(free))
                chosen = free[:count]
                now = utcnow()
                rows = [
                    LeaseRow(user=user, server=server, gpu_type=gpu_type, device=d, leased_at=now)
                    for d in chosen
                ]
                s.add_all(rows)
                try:
                    self._check_user_limit(s, user, count, max_user_gpus)
                    s.flush()
                    self._open_intervals(s, rows, group)
                    s.commit()
                except IntegrityError:
                    s.rollback()
                    log.info("GPU lease raced with another process; retrying")
                    continue
                return chosen
        raise NoGpuFree(gpu_type, count, 0)

    def lease_units(
        self,
        user: str,
        server: str,
        gpu_type: str,
        count: int,
        max_user_gpus: int | None = None,
        group: str = "",
    ) -> None:
        """Record `count` GPUs of `gpu_type` held by a server whose devices the cluster assigns
        (`GpuQuotaReached` as for `lease_devices`; intervals as there)."""
        with self.session() as s:
            now = utcnow()
            rows = [
                LeaseRow(user=user, server=server, gpu_type=gpu_type, leased_at=now)
                for _ in range(count)
            ]
            s.add_all(rows)
            self._check_user_limit(s, user, count, max_user_gpus)
            s.flush()
            self._open_intervals(s, rows, group)
            s.commit()

    @staticmethod
    def _check_user_limit(s: Session, user: str, count: int, limit: int | None) -> None:
        """With the new leases added (not committed): roll back and raise `GpuQuotaReached` if
        the user now holds more than `limit`. SQLite writes one transaction at a time, so no
        other lease of the user can be committed between this count and the commit."""
        if limit is None:
            return
        s.flush()
        holding = int(s.scalar(select(func.count(LeaseRow.id)).where(LeaseRow.user == user)) or 0)
        if holding > limit:
            s.rollback()
            raise GpuQuotaReached(user, holding - count, count, limit)

    def free_leases(self, user: str, server: str) -> list[GpuLease]:
        """Free every GPU `user`'s `server` holds; returns what was freed."""
        with self.session() as s:
            rows = list(
                s.scalars(select(LeaseRow).where(LeaseRow.user == user, LeaseRow.server == server))
            )
            self._close_intervals(s, [r.id for r in rows], utcnow())
            s.execute(delete(LeaseRow).where(LeaseRow.user == user, LeaseRow.server == server))
            s.commit()
            return [_to_lease(r) for r in rows]

    def leases(self, user: str | None = None) -> list[GpuLease]:
        with self.session() as s:
            query = select(LeaseRow).order_by(LeaseRow.id)
            if user is not None:
                query = query.where(LeaseRow.user == user)
            return [_to_lease(r) for r in s.scalars(query)]

    def leases_of(self, user: str, server: str) -> list[GpuLease]:
        return [lease for lease in self.leases(user) if lease.server == server]

    def gpus_held(self, user: str, *, except_server: str | None = None) -> int:
        with self.session() as s:
            query = select(func.count(LeaseRow.id)).where(LeaseRow.user == user)
            if except_server is not None:
                query = query.where(LeaseRow.server != except_server)
            return int(s.scalar(query) or 0)

    def reconcile(self, active: Iterable[tuple[str, str]]) -> list[GpuLease]:
        """Free the leases of servers not in `active` (user, server) pairs; returns them."""
        active = set(active)
        freed: list[GpuLease] = []
        with self.session() as s:
            gone = [r for r in s.scalars(select(LeaseRow)) if (r.user, r.server) not in active]
            self._close_intervals(s, [r.id for r in gone], utcnow())
            for row in gone:
                freed.append(_to_lease(row))
                s.delete(row)
            s.commit()
        return freed

    # -- environments and group quotas set at runtime -----------------------------------------

    def catalog_entries(self) -> list[CatalogEntry]:
        with self.session() as s:
            rows = s.scalars(select(CatalogEntryRow).order_by(CatalogEntryRow.updated_at))
            return [
                CatalogEntry(r.id, json.loads(r.data), _aware(r.updated_at), r.updated_by)
                for r in rows
            ]

    def put_catalog_entry(self, env_id: str, data: Mapping[str, Any], by: str) -> None:
        """Add or replace the stored environment `env_id` (`data` is its catalogue entry)."""
        with self.session() as s:
            row = s.get(CatalogEntryRow, env_id)
            if row is None:
                row = CatalogEntryRow(id=env_id)
                s.add(row)
            row.data = json.dumps(dict(data), sort_keys=True)
            row.updated_at = utcnow()
            row.updated_by = by
            s.commit()

    def delete_catalog_entry(self, env_id: str) -> bool:
        with self.session() as s:
            deleted = s.execute(delete(CatalogEntryRow).where(CatalogEntryRow.id == env_id))
            s.commit()
            return bool(deleted.rowcount)

    def group_quotas(self) -> list[StoredQuota]:
        with self.session() as s:
            return [
                StoredQuota(
                    r.group,
                    _limit_value(r.max_gpus),
                    _limit_value(r.max_servers),
                    _aware(r.updated_at),
                    r.updated_by,
                )
                for r in s.scalars(select(GroupQuotaRow).order_by(GroupQuotaRow.group))
            ]

    def put_group_quota(
        self, group: str, max_gpus: int | str | None, max_servers: int | str | None, by: str
    ) -> None:
        """Set `group`'s quota (each limit a number, "unlimited", or None: not set here)."""
        with self.session() as s:
            row = s.get(GroupQuotaRow, group)
            if row is None:
                row = GroupQuotaRow(group=group)
                s.add(row)
            row.max_gpus = _limit_text(max_gpus)
            row.max_servers = _limit_text(max_servers)
            row.updated_at = utcnow()
            row.updated_by = by
            s.commit()

    def delete_group_quota(self, group: str) -> bool:
        with self.session() as s:
            deleted = s.execute(delete(GroupQuotaRow).where(GroupQuotaRow.group == group))
            s.commit()
            return bool(deleted.rowcount)

    # -- the GPU wait queue ------------------------------------------------------------------------

    def enqueue(
        self,
        user: str,
        server: str,
        gpu_type: str,
        gpus: int,
        priority: int = 0,
        user_options: Mapping[str, Any] | None = None,
        now: datetime | None = None,
        on_cpu: bool = False,
    ) -> QueueEntry:
        """Put `user`'s `server` in the queue, or refresh its entry.

        An entry for the same GPUs keeps its place (`enqueued_at`): a spawn interrupted by a hub
        restart and asked for again does not go to the back. Asking for other GPUs starts anew.
        `on_cpu`: the server starts without a GPU meanwhile (`when_no_gpu: start-on-cpu`).
        """
        now = now or utcnow()
        with self.session() as s:
            row = s.scalar(select(QueueRow).where(QueueRow.user == user, QueueRow.server == server))
            if row is not None and (row.gpu_type, row.gpus) != (gpu_type, gpus):
                s.delete(row)
                s.flush()
                row = None
            if row is None:
                row = QueueRow(
                    user=user, server=server, gpu_type=gpu_type, gpus=gpus, enqueued_at=now
                )
                s.add(row)
            row.priority = priority
            row.seen_at = now
            row.user_options = json.dumps(dict(user_options or {}), sort_keys=True)
            row.on_cpu = on_cpu
            row.offered_at = None
            s.commit()
            return _to_entry(row)

    def queue_entry(self, user: str, server: str) -> QueueEntry | None:
        with self.session() as s:
            row = s.scalar(select(QueueRow).where(QueueRow.user == user, QueueRow.server == server))
            return _to_entry(row) if row is not None else None

    def update_queue_entry(self, user: str, server: str, **changes: Any) -> QueueEntry | None:
        """Change `user`'s `server`'s entry (`on_cpu`, `seen_at`, `not_before`, `not_now_count`,
        `offered_at`, `enqueued_at`); None when there is none."""
        allowed = {"on_cpu", "seen_at", "not_before", "not_now_count", "offered_at", "enqueued_at"}
        unknown = set(changes) - allowed
        if unknown:
            raise TypeError(f"not a queue entry field: {sorted(unknown)}")
        with self.session() as s:
            row = s.scalar(select(QueueRow).where(QueueRow.user == user, QueueRow.server == server))
            if row is None:
                return None
            for name, value in changes.items():
                setattr(row, name, value)
            s.commit()
            return _to_entry(row)

    def dequeue_on_cpu(self, user: str, server: str) -> bool:
        """Take out `user`'s `server`'s entry if its server runs on CPU meanwhile (the server
        stopped: the request ends with it; an entry being switched to the GPU stays)."""
        with self.session() as s:
            deleted = s.execute(
                delete(QueueRow).where(
                    QueueRow.user == user, QueueRow.server == server, QueueRow.on_cpu.is_(True)
                )
            )
            s.commit()
            return bool(deleted.rowcount)

    def touch_queue_entry(self, user: str, server: str, now: datetime | None = None) -> None:
        """Record that the spawn of `user`'s `server` is still waiting."""
        with self.session() as s:
            row = s.scalar(select(QueueRow).where(QueueRow.user == user, QueueRow.server == server))
            if row is not None:
                row.seen_at = now or utcnow()
                s.commit()

    def gpus_queued(
        self, user: str, *, except_server: str | None = None, seen_since: datetime | None = None
    ) -> int:
        """GPUs `user`'s servers wait for in the queue (those seen since `seen_since`: a spawn
        still waiting), not counting `except_server`."""
        with self.session() as s:
            query = select(func.coalesce(func.sum(QueueRow.gpus), 0)).where(QueueRow.user == user)
            if except_server is not None:
                query = query.where(QueueRow.server != except_server)
            if seen_since is not None:
                # a server running on CPU waits as long as it runs: always counted
                query = query.where((QueueRow.seen_at >= seen_since) | QueueRow.on_cpu.is_(True))
            return int(s.scalar(query) or 0)

    def dequeue(self, user: str, server: str) -> bool:
        """Take `user`'s `server` out of the queue (started, cancelled or failed)."""
        with self.session() as s:
            deleted = s.execute(
                delete(QueueRow).where(QueueRow.user == user, QueueRow.server == server)
            )
            s.commit()
            return bool(deleted.rowcount)

    def queue(self, gpu_type: str | None = None) -> list[QueueEntry]:
        """Every queue entry (waiting or not: see `QueueEntry.waiting`), oldest first.

        Who waits for which GPU type since when: the demand signal for the hub service.
        """
        with self.session() as s:
            query = select(QueueRow).order_by(QueueRow.enqueued_at, QueueRow.id)
            if gpu_type is not None:
                query = query.where(QueueRow.gpu_type == gpu_type)
            return [_to_entry(r) for r in s.scalars(query)]

    def purge_queue(self, not_seen_since: datetime) -> list[QueueEntry]:
        """Drop the entries whose spawn has not been seen since `not_seen_since`."""
        with self.session() as s:
            rows = list(
                s.scalars(
                    select(QueueRow).where(
                        QueueRow.seen_at < not_seen_since, QueueRow.on_cpu.is_not(True)
                    )
                )
            )
            for row in rows:
                s.delete(row)
            s.commit()
            return [_to_entry(r) for r in rows]

    # -- where servers run (Kubernetes) ------------------------------------------------------------

    def set_server_pod(
        self, user: str, server: str, namespace: str, pod: str, node: str | None = None
    ) -> ServerPod:
        """Record that `user`'s `server` runs in `namespace`/`pod` (on `node`). Another server's
        claim on the same pod (left over from a stop that was not recorded) is dropped."""
        with self.session() as s:
            s.execute(
                delete(ServerPodRow).where(
                    ServerPodRow.namespace == namespace,
                    ServerPodRow.pod == pod,
                    (ServerPodRow.user != user) | (ServerPodRow.server != server),
                )
            )
            row = s.get(ServerPodRow, (user, server))
            if row is None:
                row = ServerPodRow(user=user, server=server)
                s.add(row)
            row.namespace = namespace
            row.pod = pod
            row.node = node
            row.updated_at = utcnow()
            s.commit()
            return _to_server_pod(row)

    def remove_server_pod(self, user: str, server: str) -> bool:
        """Forget where `user`'s `server` ran (it stopped)."""
        with self.session() as s:
            deleted = s.execute(
                delete(ServerPodRow).where(ServerPodRow.user == user, ServerPodRow.server == server)
            )
            s.commit()
            return bool(deleted.rowcount)

    def server_pod(self, user: str, server: str) -> ServerPod | None:
        with self.session() as s:
            row = s.get(ServerPodRow, (user, server))
            return _to_server_pod(row) if row is not None else None

    def server_pods(self) -> dict[tuple[str, str], ServerPod]:
        """(user, server) -> where it runs, for every server with a recorded pod."""
        with self.session() as s:
            rows = s.scalars(select(ServerPodRow).order_by(ServerPodRow.user, ServerPodRow.server))
            return {(r.user, r.server): _to_server_pod(r) for r in rows}

    # -- actions (history of releases, stops and warnings) -------------------------------------

    def record_action(
        self,
        user: str,
        server: str,
        kind: str,
        rule: str,
        reason: str,
        *,
        actor: str,
        status: str,
        server_started: str | None = None,
        gpus: int = 0,
        gpu_type: str | None = None,
        user_options: Mapping[str, Any] | None = None,
    ) -> ActionRecord:
        with self.session() as s:
            row = ActionRow(
                user=user,
                server=server,
                server_started=server_started,
                kind=kind,
                rule=rule,
                reason=reason,
                actor=actor,
                status=_status_text(status),
                gpus=gpus,
                gpu_type=gpu_type,
                user_options=json.dumps(dict(user_options)) if user_options is not None else None,
            )
            s.add(row)
            s.commit()
            return _to_action(row)

    def update_action(self, action_id: int, **changes: Any) -> ActionRecord:
        """Change `status`, `rule`, `reason`, `snapshots`, `error` or `notified_at` of an action."""
        allowed = {"status", "rule", "reason", "snapshots", "error", "notified_at"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"update_action: cannot change {sorted(unknown)[0]!r}")
        with self.session() as s:
            row = s.get(ActionRow, action_id)
            if row is None:
                raise KeyError(f"no action {action_id}")
            for name, value in changes.items():
                if name == "snapshots" and value is not None:
                    value = json.dumps(value)
                elif name == "status":
                    value = _status_text(value)
                setattr(row, name, value)
            row.updated_at = utcnow()
            s.commit()
            return _to_action(row)

    def actions(
        self,
        user: str | None = None,
        server: str | None = None,
        *,
        statuses: Iterable[str] | None = None,
        kinds: Iterable[str] | None = None,
        since_id: int | None = None,
        limit: int | None = 200,
    ) -> list[ActionRecord]:
        """Recorded actions, newest first."""
        with self.session() as s:
            query = select(ActionRow).order_by(ActionRow.id.desc())
            if user is not None:
                query = query.where(ActionRow.user == user)
            if server is not None:
                query = query.where(ActionRow.server == server)
            if statuses is not None:
                query = query.where(ActionRow.status.in_([_status_text(x) for x in statuses]))
            if kinds is not None:
                query = query.where(ActionRow.kind.in_(list(kinds)))
            if since_id is not None:
                query = query.where(ActionRow.id > since_id)
            if limit is not None:
                query = query.limit(limit)
            return [_to_action(r) for r in s.scalars(query)]

    # -- the learned release policy's pauses ---------------------------------------------------

    def idle_gaps(self) -> list[tuple[str, str, Any]]:
        """Every stored (scope, key, data) of the learned release policy, oldest update first."""
        with self.session() as s:
            rows = s.scalars(select(IdleGapRow).order_by(IdleGapRow.updated_at))
            out = []
            for row in rows:
                try:
                    data = json.loads(row.data)
                except ValueError:
                    log.warning("gpuhub_idle_gaps: unreadable %s %r skipped", row.scope, row.key)
                    continue
                out.append((row.scope, row.key, data))
            return out

    def save_idle_gaps(
        self,
        items: Mapping[tuple[str, str], Any],
        delete_keys: Iterable[tuple[str, str]] = (),
        keep: int | None = None,
        never_drop: Iterable[str] = (),
    ) -> None:
        """Write (scope, key) -> data, delete `delete_keys`, keep the `keep` latest rows (rows
        of a scope in `never_drop` are never dropped for that, nor counted)."""
        with self.session() as s:
            now = utcnow()
            for (scope, key), data in items.items():
                row = s.get(IdleGapRow, (scope, key))
                text = json.dumps(data, separators=(",", ":"))
                if row is None:
                    s.add(IdleGapRow(scope=scope, key=key, data=text, updated_at=now))
                else:
                    row.data = text
                    row.updated_at = now
            for scope, key in delete_keys:
                row = s.get(IdleGapRow, (scope, key))
                if row is not None:
                    s.delete(row)
            s.flush()
            if keep is not None:
                kept = list(never_drop)
                total = (
                    s.scalar(
                        select(func.count())
                        .select_from(IdleGapRow)
                        .where(IdleGapRow.scope.not_in(kept))
                    )
                    or 0
                )
                if total > keep:
                    old = list(
                        s.execute(
                            select(IdleGapRow.scope, IdleGapRow.key)
                            .where(IdleGapRow.scope.not_in(kept))
                            .order_by(IdleGapRow.updated_at)
                            .limit(total - keep)
                        )
                    )
                    for scope, key in old:
                        s.execute(
                            delete(IdleGapRow).where(
                                IdleGapRow.scope == scope, IdleGapRow.key == key
                            )
                        )
            s.commit()


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
