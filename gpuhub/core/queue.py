"""The fair GPU wait queue: who goes next, at which place one waits, and for about how long.

Pure core: entries come from the store as `QueueEntry` values; time is passed in. First come,
first served within a priority (groups may have a higher one). A spawn starts when the GPUs it
wants, plus those wanted by everyone ahead of it in the same GPU type's line, are free: the
GPU freed first goes to the head of the line.

An entry whose spawn has not been seen for `stale_after` (its hub restarted, say) does not hold
up the line; it keeps its place, for when its user starts again, until the store purges it.

A spawn with `when_no_gpu: start-on-cpu` that finds no GPU free starts without one and leaves
an entry `on_cpu`: its server runs, the gpuhub service keeps the entry alive (it is seen for
`ON_CPU_STALE_AFTER`) and switches the server to the GPU when `may_start` says its turn has
come. "Not now" postpones the entry (`not_before`: out of the line until then, its place kept);
after `not_now_limit` of them in a row it goes to the back of the line (`postpone`).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any


@dataclass(frozen=True)
class QueueEntry:
    """One spawn waiting for GPUs."""

    user: str
    server: str
    gpu_type: str
    gpus: int
    enqueued_at: datetime
    seen_at: datetime
    priority: int = 0
    id: int = 0
    user_options: Mapping[str, Any] = field(default_factory=dict)
    #: the server runs without a GPU meanwhile (`when_no_gpu: start-on-cpu`)
    on_cpu: bool = False
    #: "not now": out of the line until then (its place kept)
    not_before: datetime | None = None
    #: "not now"s in a row
    not_now_count: int = 0
    #: when the service told the user that their turn has come (the switch follows)
    offered_at: datetime | None = None

    @property
    def holder(self) -> tuple[str, str]:
        return (self.user, self.server)

    def postponed(self, now: datetime) -> bool:
        return self.not_before is not None and now < self.not_before

    def waiting(self, now: datetime, stale_after: timedelta) -> bool:
        """Whether its spawn is still waiting (seen recently; for a server running on CPU, kept
        alive by the service) and not postponed."""
        horizon = max(stale_after, ON_CPU_STALE_AFTER) if self.on_cpu else stale_after
        return now - self.seen_at <= horizon and not self.postponed(now)


#: how long an entry of a server running on CPU holds its place in the line without the gpuhub
#: service seeing the server (the service refreshes it every cycle; without the service nobody
#: would switch the server, so the GPU must not be kept for it)
ON_CPU_STALE_AFTER = timedelta(minutes=5)


@dataclass(frozen=True)
class Postpone:
    """What a "not now" does to an entry: out of the line until `not_before`; `to_back`: its
    place given up (it goes behind everyone in line now), the count starting again."""

    not_before: datetime
    not_now_count: int
    to_back: bool


def postpone(entry: QueueEntry, now: datetime, delay: timedelta, limit: int) -> Postpone:
    """A "not now" from `entry`'s user: the GPU goes to the next in line. The entry keeps its
    place for `limit - 1` of them in a row; the `limit`th sends it to the back of the line, so
    that a user who keeps saying "not now" cannot keep a GPU idle or hold the others back."""
    count = entry.not_now_count + 1
    if limit > 0 and count >= limit:
        return Postpone(now + delay, 0, True)
    return Postpone(now + delay, count, False)


def order_key(entry: QueueEntry) -> tuple[int, datetime, int]:
    return (-entry.priority, entry.enqueued_at, entry.id)


def line(
    entries: Iterable[QueueEntry], gpu_type: str, now: datetime, stale_after: timedelta
) -> list[QueueEntry]:
    """The waiting entries for `gpu_type`, first in line first."""
    waiting = [e for e in entries if e.gpu_type == gpu_type and e.waiting(now, stale_after)]
    return sorted(waiting, key=order_key)


def ahead_of(queue: list[QueueEntry], me: QueueEntry) -> list[QueueEntry]:
    """Those of `queue` (a `line`) who go before `me` (who may or may not be in it yet)."""
    return [e for e in queue if e.holder != me.holder and order_key(e) < order_key(me)]


def may_start(queue: list[QueueEntry], me: QueueEntry, free: int) -> bool:
    """Whether `me` may take its GPUs now: enough are free for it and everyone ahead."""
    wanted = sum(e.gpus for e in ahead_of(queue, me)) + me.gpus
    return wanted <= free


def position(queue: list[QueueEntry], me: QueueEntry) -> int:
    """`me`'s place in the line, 1 for the head."""
    return len(ahead_of(queue, me)) + 1


def estimated_wait(
    queue: list[QueueEntry],
    me: QueueEntry,
    free: int,
    held_since: Iterable[datetime],
    now: datetime,
    typical_hold: timedelta,
) -> timedelta | None:
    """About how long until `me` starts, or None when nothing held can be expected to free up.

    Each GPU held now is expected back `typical_hold` after it was taken (GPUs held longer than
    that are expected soon: a tenth of `typical_hold`). Each GPU handed to someone ahead is held
    for `typical_hold` again.
    """
    ahead = sum(e.gpus for e in ahead_of(queue, me))
    needed = ahead + me.gpus - free
    if needed <= 0:
        return timedelta(0)
    soonest = now + typical_hold / 10
    releases = [max(since + typical_hold, soonest) for since in held_since]
    heapq.heapify(releases)
    for_others = max(ahead - free, 0)
    at = now
    for taken in range(needed):
        if not releases:
            return None
        at = heapq.heappop(releases)
        if taken < for_others:
            heapq.heappush(releases, at + typical_hold)
    return max(at - now, timedelta(0))


def priority_for(groups: Iterable[str], priorities: Mapping[str, int]) -> int:
    """A user's queue priority: the highest of their groups' (0 without any)."""
    return max((priorities[g] for g in groups if g in priorities), default=0)


def demand(entries: Iterable[QueueEntry], now: datetime, stale_after: timedelta) -> dict[str, int]:
    """GPUs wanted by waiting spawns, by GPU type (the signal to free idle GPUs)."""
    out: dict[str, int] = {}
    for e in entries:
        if e.waiting(now, stale_after):
            out[e.gpu_type] = out.get(e.gpu_type, 0) + e.gpus
    return out


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def describe_wait(wait: timedelta | None) -> str:
    if wait is None:
        return "unknown"
    minutes = wait.total_seconds() / 60
    if minutes < 1.5:
        return "about a minute"
    if minutes < 90:
        return f"about {round(minutes)} minutes"
    return f"about {minutes / 60:.1f} hours"


def wait_message(gpu_name: str, place: int, waiting: int, wait: timedelta | None) -> str:
    """What the spawn page says while a spawn waits."""
    return (
        f"Waiting for a free {gpu_name} GPU: {ordinal(place)} in line of {waiting}, "
        f"estimated wait {describe_wait(wait)}. Stop the server to leave the queue."
    )


def on_cpu_message(gpu_name: str, place: int, waiting: int, wait: timedelta | None) -> str:
    """What the pages say of a request whose server runs without a GPU meanwhile."""
    return (
        f"Running without a GPU, waiting for a free {gpu_name} GPU: {ordinal(place)} in line of "
        f"{waiting}, estimated wait {describe_wait(wait)}. The server switches to the GPU at "
        "your turn (you are told first); stop it or leave the queue to give up the place."
    )
