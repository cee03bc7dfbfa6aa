"""The cluster's GPU counts, published into the store for the gpuhub service and its pages.

The hub's node and pod watch (`kube_watch`) is the one place that sees the cluster's capacity.
A `CapacityPublisher` per event loop and store writes what it counts (per GPU type: total, free,
held back on cordoned or not ready nodes, and why) every `interval` seconds, stamped with the
time and how long the counts stay valid, so that a reader can tell fresh counts from a hub that
stopped publishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from ..store import MeasuredCapacity, Store

log = logging.getLogger(__name__)

#: Counts the watch sees now, or None when it cannot count (no watch, no permission).
Measure = Callable[[], Iterable[MeasuredCapacity] | None]


class CapacityPublisher:
    """Writes `measure()` into `store` every `interval` seconds (and on `publish_now`)."""

    def __init__(
        self, store: Store, measure: Measure, interval: float, source: str = "kubernetes"
    ) -> None:
        self.store = store
        self.measure = measure
        self.interval = interval
        self.source = source
        self.published = 0
        self._task: asyncio.Task[None] | None = None
        self._failed = False

    @property
    def valid_for(self) -> float:
        """Counts older than this are stale: three missed rounds, and some slack."""
        return 3 * self.interval + 5

    def publish_now(self) -> bool:
        """Count and write now; False when there was nothing to count."""
        try:
            counts = self.measure()
            if counts is None:
                return False
            self.store.publish_capacity(list(counts), self.source, self.valid_for)
        except Exception as e:
            if not self._failed:
                log.warning("gpuhub: cannot publish the cluster's GPU counts: %s", e)
            self._failed = True
            return False
        if self._failed:
            log.info("gpuhub: publishing the cluster's GPU counts again")
        self._failed = False
        self.published += 1
        return True

    async def _run(self) -> None:
        while True:
            self.publish_now()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


_publishers: dict[tuple[Any, ...], CapacityPublisher] = {}


def capacity_publisher(
    store: Store, measure: Measure, interval: float, source: str = "kubernetes"
) -> CapacityPublisher:
    """The running publisher of this event loop for `store` (started on first use; later calls
    hand it their `measure`, so it counts with the newest watch and catalogue)."""
    key = (asyncio.get_running_loop(), store.url, source)
    publisher = _publishers.get(key)
    if publisher is None:
        publisher = _publishers[key] = CapacityPublisher(store, measure, interval, source)
    publisher.measure = measure
    publisher.interval = interval
    publisher.start()
    return publisher


async def stop_capacity_publishers() -> None:
    """Stop every publisher of the running loop (tests, hub shutdown)."""
    loop = asyncio.get_running_loop()
    for key in [k for k in _publishers if k[0] is loop]:
        await _publishers.pop(key).stop()
