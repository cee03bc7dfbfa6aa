"""`GPUQueueMixin`: a spawn that finds no free GPU waits in gpuhub's fair queue.

Used by both backends (put it before `GPUSpawnerMixin`). The backend's `apply_selection` calls
`wait_for_gpus` with a function that takes the GPUs (a lease in the store); the spawn waits in
the store's queue until the order in `gpuhub.core.queue` lets it take them, showing its place and an
estimated wait as spawn progress messages. Stopping the pending spawn (or any failure) takes it
out of the queue. The wait runs in JupyterHub's `apply_user_options` step, before
`Spawner.start`, so `start_timeout` does not cut it short.

A selection with `when_no_gpu: start-on-cpu` does not wait: when its GPUs cannot be had now,
`wait_for_gpus` leaves its entry in the queue marked `on_cpu` (its place kept) and returns None;
the backend starts the server without a GPU, and the gpuhub service switches it to the GPU when
its turn comes (gpuhub.service.cpu_start). Stopping that server takes it out of the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

from traitlets import Dict, Float, Int, default
from traitlets.config import Configurable

from ..core import queue
from ..core.catalog import Catalog
from ..core.options import WAIT, Selection
from ..core.quotas import Usage
from ..store import utcnow

T = TypeVar("T")

#: Futures of the spawns waiting in this process, resolved whenever a lease is freed here.
_wakeups: set[asyncio.Future[None]] = set()


def wake_waiting_spawns() -> None:
    for future in list(_wakeups):
        if not future.done():
            future.set_result(None)


@dataclass(frozen=True)
class WaitStatus:
    place: int
    waiting: int
    wait: timedelta | None
    message: str


class GPUQueueMixin(Configurable):
    """The fair GPU wait queue for a gpuhub spawner."""

    queue_priorities = Dict(
        value_trait=Int(),
        config=True,
        help="""Queue priority by group: `{"staff": 10}`. Higher goes first; within a priority,
        first come, first served. A user gets their highest group's priority (0 without one).
        """,
    )

    queue_poll_interval = Float(
        2.0,
        min=0.01,
        config=True,
        help="""Seconds between two looks at the free GPUs while a spawn waits (a GPU freed
        by this hub wakes the waiting spawns at once).""",
    )

    queue_typical_hold = Float(
        3600.0,
        min=1.0,
        config=True,
        help="""Seconds a GPU is typically held, for the estimated wait shown to queued users
        (the idle release of the gpuhub service bounds it).""",
    )

    queue_keep_place = Float(
        900.0,
        min=0.0,
        config=True,
        help="Seconds an interrupted wait keeps its place in the queue before it is dropped.",
    )

    # queue_stale_after: `c.GpuhubConfig.queue_stale_after` (GPUSpawnerMixin, shared with the
    # gpuhub service and the pages)
    queue_stale_after: float

    _wait_status: WaitStatus | None = None
    _waiting_phase: str = "idle"  # idle -> applying -> (queued ->) done

    def current_usage(self) -> Usage:
        """What the user holds, plus the GPUs their other servers wait for in the queue: two
        servers admitted one after the other while both wait must fit the quota together."""
        usage: Usage = super().current_usage()  # type: ignore[misc]
        queued = self.store.gpus_queued(  # type: ignore[attr-defined]
            self.user.name,  # type: ignore[attr-defined]
            except_server=self.name,  # type: ignore[attr-defined]
            seen_since=utcnow() - timedelta(seconds=self.queue_stale_after),
        )
        return replace(usage, queued_gpus=queued)

    def queue_priority(self) -> int:
        return queue.priority_for(self.user_groups(), self.queue_priorities)  # type: ignore[attr-defined]

    async def wait_for_gpus(
        self, selection: Selection, catalog: Catalog, take: Callable[[], T | None]
    ) -> T | None:
        """Wait in the queue until `take()` may run and returns the GPUs (not None).

        A selection that starts on CPU (`Selection.starts_on_cpu`) waits for nothing: None when
        the GPUs cannot be had now, its entry kept in the queue `on_cpu`, and `self.selection`
        the same without GPUs (what the backend starts)."""
        assert selection.gpu_type is not None
        store = self.store  # type: ignore[attr-defined]
        user, server = self.user.name, self.name  # type: ignore[attr-defined]
        gpu_type = catalog.gpu_type(selection.gpu_type)
        gpu_name = gpu_type.display_name if gpu_type else selection.gpu_type
        stale = timedelta(seconds=self.queue_stale_after)
        store.purge_queue(utcnow() - timedelta(seconds=self.queue_keep_place))
        now = utcnow()
        me = queue.QueueEntry(
            user, server, selection.gpu_type, selection.gpus, now, now, self.queue_priority(), 2**62
        )
        queued = False
        try:
            while True:
                now = utcnow()
                line = queue.line(store.queue(selection.gpu_type), selection.gpu_type, now, stale)
                me = next((e for e in line if e.holder == me.holder), me)
                _total, free = self.gpu_capacity(catalog).get(selection.gpu_type, (0, 0))  # type: ignore[attr-defined]
                if queue.may_start(line, me, free):
                    if queued:  # the turn came: the week's GPU-hours may be used up meanwhile
                        self.check_gpu_budget(selection)  # type: ignore[attr-defined]
                    taken = take()
                    if taken is not None:
                        # our entry, from this wait or kept while the server ran on CPU
                        store.dequeue(user, server)
                        return taken
                if selection.starts_on_cpu:
                    self.start_on_cpu(selection, catalog, gpu_name)
                    return None
                if not queued:
                    me = store.enqueue(
                        user,
                        server,
                        selection.gpu_type,
                        selection.gpus,
                        self.queue_priority(),
                        selection.as_user_options(),
                    )
                    queued = True
                    self._waiting_phase = "queued"
                    self.log.info(  # type: ignore[attr-defined]
                        "gpuhub: %s waits for %d %s GPU(s)",
                        self._log_name,  # type: ignore[attr-defined]
                        selection.gpus,
                        selection.gpu_type,
                    )
                    continue  # look again with our own entry in line
                store.touch_queue_entry(user, server)
                held = [
                    lease.leased_at
                    for lease in store.leases()
                    if lease.gpu_type == selection.gpu_type
                ]
                wait = queue.estimated_wait(
                    line, me, free, held, now, timedelta(seconds=self.queue_typical_hold)
                )
                place = queue.position(line, me)
                message = queue.wait_message(gpu_name, place, len(line), wait)
                note = self.capacity_note(catalog, selection.gpu_type)  # type: ignore[attr-defined]
                if note:
                    message = f"{message} {note[:1].upper()}{note[1:]}."
                self._set_wait_status(WaitStatus(place, len(line), wait, message))
                await self._sleep_until_woken()
        except asyncio.CancelledError:
            # Either the user stopped the pending spawn (JupyterHub then clears the spawner's
            # state, which leaves the queue), or the hub is shutting down: then the entry keeps
            # its place for when the user starts again after the restart.
            self._left_queue_pending = queued
            self._queue_cancelled = True
            raise
        except BaseException:
            if queued:
                store.dequeue(user, server)
            raise
        finally:
            self._set_wait_status(None)

    def start_on_cpu(self, selection: Selection, catalog: Catalog, gpu_name: str) -> None:
        """No GPU for `selection` now: keep (or take) its place in the queue, marked `on_cpu`,
        and make the server start without a GPU (`self.selection`, saved as the options)."""
        assert selection.gpu_type is not None
        store = self.store  # type: ignore[attr-defined]
        user, server = self.user.name, self.name  # type: ignore[attr-defined]
        entry = store.enqueue(
            user,
            server,
            selection.gpu_type,
            selection.gpus,
            self.queue_priority(),
            selection.as_user_options(),
            on_cpu=True,
        )
        now = utcnow()
        line = queue.line(
            store.queue(selection.gpu_type),
            selection.gpu_type,
            now,
            timedelta(seconds=self.queue_stale_after),
        )
        place = queue.position(line, entry)
        self.started_on_cpu = (
            f"No {gpu_name} GPU free: your server starts now without a GPU, "
            f"{queue.ordinal(place)} in line of {max(len(line), place)}. It switches to the GPU "
            "when your turn comes (you are told first; your variables are saved and come back)."
        )
        cpu = replace(selection, gpus=0, when_no_gpu=WAIT)
        self.selection = cpu
        self.user_options = cpu.as_user_options()  # type: ignore[attr-defined]
        self.persist_user_options()  # type: ignore[attr-defined]
        self.log.info(  # type: ignore[attr-defined]
            "gpuhub: %s starts without a GPU, %s in line for %d %s GPU(s)",
            self._log_name,  # type: ignore[attr-defined]
            queue.ordinal(place),
            selection.gpus,
            selection.gpu_type,
        )

    #: the spawn page's message when the last spawn started on CPU to wait for its GPU
    started_on_cpu: str | None = None

    async def _sleep_until_woken(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        _wakeups.add(future)
        try:
            await asyncio.wait_for(future, self.queue_poll_interval)
        except asyncio.TimeoutError:
            pass
        finally:
            _wakeups.discard(future)

    def _set_wait_status(self, status: WaitStatus | None) -> None:
        self._wait_status = status
        changed = getattr(self, "_wait_changed", None)
        if changed is not None and not changed.done():
            changed.set_result(None)

    # -- hooks around GPUSpawnerMixin --------------------------------------------------------------

    async def apply_gpuhub_options(self, user_options: Any) -> Selection:
        self._waiting_phase = "applying"
        self._queue_cancelled = False
        self.started_on_cpu = None
        try:
            selection: Selection = await super().apply_gpuhub_options(user_options)  # type: ignore[misc]
            if not selection.gpus and not self.started_on_cpu:
                # a server that asks for no GPU waits for none (a switch that fell back, say)
                self.store.dequeue(self.user.name, self.name)  # type: ignore[attr-defined]
            return selection
        finally:
            self._waiting_phase = "done"
            self._set_wait_status(None)

    def free_leases(self) -> None:
        super().free_leases()  # type: ignore[misc]
        wake_waiting_spawns()

    async def stop(self, now: bool = False) -> None:
        try:
            await super().stop(now=now)  # type: ignore[misc]
        finally:
            # A server that ran on CPU waiting for its GPU leaves the queue with its stop (an
            # entry the service is switching to the GPU is no longer `on_cpu`: it stays).
            if self.store.dequeue_on_cpu(self.user.name, self.name):  # type: ignore[attr-defined]
                self.log.info("gpuhub: %s left the GPU queue with its stop", self._log_name)  # type: ignore[attr-defined]
                wake_waiting_spawns()

    _left_queue_pending: bool = False
    #: the last spawn was stopped while it waited in the queue
    _queue_cancelled: bool = False

    @default("progress_ready_hook")
    def _default_progress_ready_hook(self):  # type: ignore[no-untyped-def]
        return lambda spawner, event: spawner.queue_ready_event(event)

    def queue_ready_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """The progress stream's last event: a spawn stopped while it waited in the queue ends
        as cancelled, not as "Server ready" (JupyterHub asks before the stop is under way)."""
        if self._queue_cancelled:
            return cancelled_event()
        return event

    def clear_state(self) -> None:
        """JupyterHub clears the state after every stop, a stopped pending spawn included."""
        super().clear_state()  # type: ignore[misc]
        if self._left_queue_pending:
            self.store.dequeue(self.user.name, self.name)  # type: ignore[attr-defined]
            self._left_queue_pending = False
            wake_waiting_spawns()
        self._waiting_phase = "idle"

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """The queue's messages while the spawn waits for a GPU, then the backend's own."""
        shown: str | None = None
        while getattr(self, "_spawn_pending", False) and self._waiting_phase != "done":
            status = self._wait_status
            # Each look at the queue recomputes the wait; the page hears only of a new message.
            if status is not None and status.message != shown:
                shown = status.message
                yield {"progress": 5, "message": status.message}
            self._wait_changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wait_changed, 1.0)
        if self._queue_cancelled:
            yield cancelled_event()
            return
        if self.started_on_cpu:
            yield {"progress": 10, "message": self.started_on_cpu}
        async for event in super().progress():  # type: ignore[misc]
            yield event


def cancelled_event() -> dict[str, Any]:
    return {
        "progress": 100,
        "failed": True,
        "message": "Spawn cancelled: the server was stopped while it waited in line for a GPU.",
    }
