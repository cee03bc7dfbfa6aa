"""Servers that started without a GPU while they wait for one (`when_no_gpu: start-on-cpu`).

The spawner leaves such a server's request in the store's queue, marked `on_cpu`
(gpuhub.spawner.queueing). Each cycle the service:

- keeps those entries alive while their server runs without a GPU (and drops the entry of a
  server that is gone: its stop took it out already, unless the hub never saw that stop);
- finds whose turn has come (`core.queue.may_start`: the GPUs free for them and everyone ahead),
  tells the user first (a notice in JupyterLab's status bar, on the hub pages and, once, in the
  notice file of their home), and after `switch_notice` seconds switches the server: the same
  sequence as "GPU again" (`Executor.restart_with_gpu`: snapshot, stop, start with the GPU, the
  variables restored when the kernels start);
- answers the user's "switch now", "not now" (`core.queue.postpone`: out of the line for
  `not_now_delay`, its place kept; the `not_now_limit`th in a row sends it to the back of the
  line) and "leave the queue".

While the turn is offered the GPU stays free for the user: the line holds it for the head.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from ..core import protocol, queue
from ..core.decide import Warn
from ..core.queue import QueueEntry
from ..store import ActionStatus
from .actions import GPU_AGAIN
from .servers import RunningServer

if TYPE_CHECKING:
    from .app import GpuhubService

log = logging.getLogger("gpuhub.service")

Key = tuple[str, str]
RULE_QUEUE_TURN = "queue-turn"


@dataclass(frozen=True)
class CpuStartRules:
    #: seconds between telling the user that their turn has come and the switch
    switch_notice: float = 120.0
    #: seconds a "not now" keeps the request out of the line
    not_now_delay: float = 1800.0
    #: the "not now"s in a row after which the request goes to the back of the line (0: never)
    not_now_limit: int = 3
    #: seconds a typical GPU is held, for the estimated wait
    typical_hold: float = 3600.0


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class CpuStart:
    """The servers of one service that run on CPU while they wait for their GPU."""

    def __init__(self, service: GpuhubService, rules: CpuStartRules) -> None:
        self.service = service
        self.rules = rules
        #: per server running on CPU with a request: what its notices say (`queue`, `gpu_turn`)
        self.notices: dict[Key, dict[str, Any]] = {}

    # -- each cycle ------------------------------------------------------------------------------

    def cycle(self, running: Mapping[Key, RunningServer], free: Mapping[str, int]) -> None:
        """Keep the entries of the servers running on CPU, offer the turns, start the switches
        that are due. `free`: free GPUs by type (the pool less the leases)."""
        store = self.service.store
        executor = self.service.executor
        now = _utcnow()
        stale = timedelta(seconds=self.service.queue_stale_after)
        for entry in store.queue():
            key = entry.holder
            server = running.get(key)
            busy = executor.busy(key)
            if server is not None and server.gpus == 0:
                if busy:
                    # being switched: keep the place fresh for the spawn that takes the GPU
                    store.update_queue_entry(*key, seen_at=now)
                else:
                    store.update_queue_entry(*key, seen_at=now, on_cpu=True)
            elif server is not None and entry.on_cpu:
                store.dequeue(*key)  # it holds its GPUs: nothing left to wait for
            elif entry.on_cpu and not busy and now - entry.seen_at > queue.ON_CPU_STALE_AFTER:
                log.info("gpuhub: %s/%s is gone; its request leaves the GPU queue", *key)
                store.dequeue(*key)
        entries = store.queue()
        held: dict[str, list[datetime]] = {}
        for lease in store.leases():
            held.setdefault(lease.gpu_type, []).append(lease.leased_at)
        notices: dict[Key, dict[str, Any]] = {}
        for entry in entries:
            server = running.get(entry.holder)
            if not entry.on_cpu or server is None or server.gpus:
                continue
            line = queue.line(entries, entry.gpu_type, now, stale)
            notices[entry.holder] = {"queue": self._queue_notice(entry, line, free, held, now)}
            if entry.postponed(now):
                continue
            if executor.busy(entry.holder):  # telling the user, or switching
                if entry.offered_at is not None:
                    switch_at = entry.offered_at + timedelta(seconds=self.rules.switch_notice)
                    notices[entry.holder]["gpu_turn"] = self._turn_notice(entry, switch_at)
                continue
            if self._switch_failed(entry):
                # the switch did not happen (no good snapshot, say): the GPU goes to the next in
                # line rather than waiting for this server, as after a "not now"
                self.postpone(entry, now)
                log.warning("gpuhub: %s/%s's switch failed; the turn passes", *entry.holder)
                continue
            turn = queue.may_start(line, entry, free.get(entry.gpu_type, 0))
            if not turn:
                if entry.offered_at is not None:
                    store.update_queue_entry(*entry.holder, offered_at=None)
                continue
            offered = entry.offered_at
            if offered is None:
                offered = now
                store.update_queue_entry(*entry.holder, offered_at=now)
                self._warn(server, entry, now)
            switch_at = offered + timedelta(seconds=self.rules.switch_notice)
            notices[entry.holder]["gpu_turn"] = self._turn_notice(entry, switch_at)
            if now >= switch_at:
                self.switch(server, entry, actor=executor.settings.actor)
        for key, value in notices.items():
            if self.notices.get(key) != value:
                self.service.board.wake(key)
        self.notices = notices

    def _queue_notice(
        self,
        entry: QueueEntry,
        line: list[QueueEntry],
        free: Mapping[str, int],
        held: Mapping[str, list[datetime]],
        now: datetime,
    ) -> dict[str, Any]:
        me = entry
        if entry.postponed(now):
            # where it will stand when it comes back (its place is kept)
            me = replace(entry, not_before=None)
            line = sorted([*line, me], key=queue.order_key)
        wait = queue.estimated_wait(
            line,
            me,
            free.get(entry.gpu_type, 0),
            held.get(entry.gpu_type, []),
            now,
            timedelta(seconds=self.rules.typical_hold),
        )
        if entry.postponed(now) and entry.not_before is not None:
            wait = max(wait or timedelta(0), entry.not_before - now)
        notice: dict[str, Any] = {
            "place": queue.position(line, me),
            "waiting": max(len(line), queue.position(line, me)),
            "estimate_s": wait.total_seconds() if wait is not None else None,
            "gpus": entry.gpus,
            "gpu_type": entry.gpu_type,
            "not_before": protocol.iso(entry.not_before.timestamp())
            if entry.postponed(now) and entry.not_before is not None
            else None,
            "not_now_left": max(0, self.rules.not_now_limit - entry.not_now_count - 1)
            if self.rules.not_now_limit
            else None,
        }
        return notice

    def _turn_notice(self, entry: QueueEntry, switch_at: datetime) -> dict[str, Any]:
        return {
            "switch_at": protocol.iso(switch_at.timestamp()),
            "gpus": entry.gpus,
            "gpu_type": entry.gpu_type,
        }

    def _warn(self, server: RunningServer, entry: QueueEntry, now: datetime) -> None:
        """The turn in the notice file too (once per run of the server), for VS Code users."""
        executor = self.service.executor
        reason = (
            f"your turn for a GPU has come ({entry.gpus} x {entry.gpu_type}): this server restarts "
            f"with the GPU in {self.rules.switch_notice:g} s (your variables are saved and come "
            "back); choose 'not now' on the hub's gpuhub page to let it go to the next in line"
        )
        action = Warn(server.user, server.server, RULE_QUEUE_TURN, reason)
        executor.run_for(server.key, executor.warn(action, server))

    # -- the switch ------------------------------------------------------------------------------

    def switch(self, server: RunningServer, entry: QueueEntry, actor: str) -> bool:
        """Restart `server` with the GPU its request waits for (snapshot first, restored after);
        False when another action on it is under way (the next cycle tries again)."""
        store = self.service.store
        options = dict(entry.user_options)
        options.setdefault("when_no_gpu", "start-on-cpu")  # no GPU after all: back on CPU

        def before_stop() -> None:
            # the server's stop must not end the request: the start takes the GPU with it
            store.update_queue_entry(*entry.holder, on_cpu=False, seen_at=_utcnow())

        if self.service.executor.busy(server.key):
            return False
        log.info("gpuhub: %s's turn for a GPU: switching it", server.label)
        self.service.executor.restart_with_gpu(
            server.user,
            server.server,
            options,
            gpus=entry.gpus,
            gpu_type=entry.gpu_type,
            actor=actor,
            rule=RULE_QUEUE_TURN,
            reason=f"{server.user}'s turn for a GPU came after waiting on CPU",
            before_stop=before_stop,
        )
        return True

    def _switch_failed(self, entry: QueueEntry) -> bool:
        """Whether a switch of `entry` since its turn was offered ended without the GPU."""
        if entry.offered_at is None:
            return False
        ledger = getattr(self.service.executor, "ledger", None)
        rows = getattr(ledger, "rows", {}).values()
        return any(
            r.kind == GPU_AGAIN
            and r.rule == RULE_QUEUE_TURN
            and (r.user, r.server) == entry.holder
            and r.created_at >= entry.offered_at
            and r.status in (ActionStatus.SNAPSHOT_FAILED, ActionStatus.FAILED)
            for r in rows
        )

    def postpone(self, entry: QueueEntry, now: datetime) -> queue.Postpone:
        """Out of the line for `not_now_delay`, its place kept (`core.queue.postpone`)."""
        step = queue.postpone(
            entry, now, timedelta(seconds=self.rules.not_now_delay), self.rules.not_now_limit
        )
        changes: dict[str, Any] = {
            "not_before": step.not_before,
            "not_now_count": step.not_now_count,
            "offered_at": None,
        }
        if step.to_back:
            changes["enqueued_at"] = now
        self.service.store.update_queue_entry(*entry.holder, **changes)
        self.notices.get(entry.holder, {}).pop("gpu_turn", None)
        return step

    # -- the user's requests ---------------------------------------------------------------------

    def request(self, key: Key, kind: str) -> tuple[bool, str]:
        """ "switch-now", "not-now" or "leave-queue" from the user of `key`."""
        store = self.service.store
        executor = self.service.executor
        entry = store.queue_entry(*key)
        if entry is None or not entry.on_cpu:
            return False, "this server is not waiting for a GPU"
        if executor.busy(key):
            return False, "the server is being switched to its GPU already"
        now = _utcnow()
        if kind == protocol.LEAVE_QUEUE:
            store.dequeue(*key)
            self.notices.pop(key, None)
            return True, "you left the GPU queue; the server keeps running without a GPU"
        if kind == protocol.NOT_NOW:
            step = self.postpone(entry, now)
            minutes = self.rules.not_now_delay / 60
            if step.to_back:
                return True, (
                    f"not now: the GPU goes to the next in line, and after "
                    f"{self.rules.not_now_limit} 'not now's in a row your request goes to the "
                    f"back of the line; you are offered a GPU again in {minutes:g} min at the "
                    "earliest"
                )
            return True, (
                f"not now: the GPU goes to the next in line; your place is kept, and you are "
                f"offered the next GPU in {minutes:g} min at the earliest"
            )
        if kind == protocol.SWITCH_NOW:
            server = self.service.running.get(key)
            if server is None:
                return False, "the service has not seen this server running yet; try again shortly"
            if entry.offered_at is None or entry.postponed(now):
                return False, "it is not your turn yet; the server switches when it is"
            if not self.switch(server, entry, actor=key[0]):
                return False, "an action on this server is under way; try again shortly"
            return True, "the server restarts with the GPU now; your variables come back"
        return False, f"unknown request {kind!r}"

    def notices_for(self, key: Key) -> dict[str, Any]:
        return dict(self.notices.get(key) or {})
