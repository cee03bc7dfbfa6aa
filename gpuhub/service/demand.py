"""Who waits for a GPU, and how many GPUs of each type there are: the inputs of demand-aware
reclaim and of the pool metrics.

The wait queue lives in the store (`Store.queue()`, filled by the spawners while a spawn waits);
GPU leases too. The pool's size comes from NVML on the local backend (the service runs on the
machine whose GPUs it hands out); on Kubernetes from the counts the hub's node and pod watch
publishes into the store (`Store.measured_capacity()`: totals and free GPUs that include other
workloads' pods and leave out cordoned and not ready nodes), or from configuration
(`gpu_totals`) where nothing publishes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..core.decide import Demand, Waiting
from ..store import MeasuredCapacity

log = logging.getLogger("gpuhub.service")


class PoolTotals(dict[str, int | None]):
    """GPUs in the pool by type (None: unknown), and, for the types the cluster's watch counted,
    the free GPUs it saw (`measured_free`), their age in seconds and why GPUs are held back."""

    def __init__(self, totals: Mapping[str, int | None] | None = None) -> None:
        super().__init__(totals or {})
        self.measured_free: dict[str, int] = {}
        self.age: dict[str, float] = {}
        self.unavailable: dict[str, int] = {}
        self.notes: dict[str, str] = {}

    def measured(self, capacity: Mapping[str, MeasuredCapacity], now: datetime) -> None:
        """Take the fresh counts of `capacity` (stale ones are left out: the hub that
        published them stopped)."""
        for gpu_type, c in capacity.items():
            if not c.fresh(now):
                continue
            self[gpu_type] = c.total
            self.measured_free[gpu_type] = c.free
            self.age[gpu_type] = c.age(now)
            self.unavailable[gpu_type] = c.unavailable
            if c.note:
                self.notes[gpu_type] = c.note

    def configured(self, totals: Mapping[str, int]) -> None:
        """Configured sizes win over counted ones; a counted free number still bounds the free
        GPUs (a configured size cannot see other workloads' pods or a cordoned node)."""
        self.update(totals)


@dataclass(frozen=True)
class Pool:
    """GPUs of each type: in the pool (`total`, None where unknown) and leased (`allocated`)."""

    total: Mapping[str, int | None] = field(default_factory=dict)
    allocated: Mapping[str, int] = field(default_factory=dict)

    @property
    def types(self) -> list[str]:
        return sorted(set(self.total) | set(self.allocated))

    def free(self) -> dict[str, int]:
        """Free GPUs of the types whose size is known: the pool's size less gpuhub's leases,
        and never more than the cluster's watch saw free (other workloads, cordoned nodes)."""
        measured = getattr(self.total, "measured_free", {})
        out = {}
        for t, n in self.total.items():
            if n is None:
                continue
            free = max(0, n - self.allocated.get(t, 0))
            if t in measured:
                free = min(free, measured[t])
            out[t] = free
        return out


def allocated_by_type(leases: Iterable[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for lease in leases:
        out[lease.gpu_type] = out.get(lease.gpu_type, 0) + 1
    return out


def local_totals(catalog_file: str) -> dict[str, int]:
    """GPUs of each catalogue type on this machine, as NVML lists them (and as the local spawner
    sorts them into types)."""
    from .. import nvml
    from ..core.catalog import devices_by_type, load_catalog

    catalog = load_catalog(catalog_file)
    inventory = nvml.inventory()
    names = {d.uuid: d.name for d in inventory.devices}
    return {t: len(devices) for t, devices in devices_by_type(catalog.gpu_types, names).items()}


@dataclass(frozen=True)
class Queued:
    """One waiting spawn, as the metrics and `decide` see it."""

    user: str
    server: str
    gpu_type: str
    gpus: int
    since: float


def waiting_entries(entries: Iterable[Any], now: datetime, stale_after: float) -> list[Queued]:
    """The queue entries whose spawn still waits (seen within `stale_after` seconds)."""
    out = []
    horizon = timedelta(seconds=stale_after)
    for e in entries:
        if not e.waiting(now, horizon):
            continue
        out.append(Queued(e.user, e.server, e.gpu_type, int(e.gpus), e.enqueued_at.timestamp()))
    return out


def demand_from(queued: Iterable[Queued], pool: Pool) -> Demand:
    waiting = tuple(
        Waiting(
            user=f"{q.user}/{q.server}" if q.server else q.user,
            since=q.since,
            gpus=q.gpus,
            gpu_type=q.gpu_type,
        )
        for q in queued
    )
    return Demand(waiting=waiting, free_gpus=pool.free())


def queue_by_type(queued: Iterable[Queued], now: float) -> dict[str, tuple[int, float]]:
    """gpu type -> (waiting spawns, longest wait in seconds)."""
    out: dict[str, tuple[int, float]] = {}
    for q in queued:
        n, longest = out.get(q.gpu_type, (0, 0.0))
        out[q.gpu_type] = (n + 1, max(longest, now - q.since))
    return out
