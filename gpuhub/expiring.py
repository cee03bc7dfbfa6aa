"""A small expiring cache: values kept for a while, at most so many of them.

The one cache of its kind in gpuhub (the service's token checks and GPU counts, the pages' quotas
and devices, the local backend's NVML inventory, the cluster watch's last failure). Not
thread-safe; each user keeps it on one event loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    """Values by key, each fresh for `ttl` seconds after it was stored (or the `ttl` given to
    `put`); with `max_entries`, the least recently stored go first when there are more."""

    def __init__(
        self,
        ttl: float,
        max_entries: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        #: key -> (stored at, fresh for seconds, value)
        self._entries: OrderedDict[K, tuple[float, float, V]] = OrderedDict()

    def _fresh(self, key: K, max_age: float | None) -> tuple[bool, V | None]:
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        stored_at, ttl, value = entry
        if self.clock() - stored_at >= (ttl if max_age is None else max_age):
            return False, None
        return True, value

    def get(self, key: K, max_age: float | None = None) -> V | None:
        """The value stored for `key` while fresh (younger than `max_age` seconds when given,
        else than its ttl), else None."""
        return self._fresh(key, max_age)[1]

    def put(self, key: K, value: V, ttl: float | None = None) -> V:
        self._entries[key] = (self.clock(), self.ttl if ttl is None else ttl, value)
        self._entries.move_to_end(key)
        if self.max_entries is not None:
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def get_or_load(self, key: K, load: Callable[[], V], max_age: float | None = None) -> V:
        """The fresh value for `key`, or `load()` stored and returned (nothing is stored when
        `load` raises)."""
        fresh, value = self._fresh(key, max_age)
        if fresh:
            return value  # type: ignore[return-value]
        return self.put(key, load())

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __iter__(self) -> Iterator[K]:
        """Every stored key, fresh or not (a copy: the cache may change meanwhile)."""
        return iter(list(self._entries))

    def stored(self, key: K) -> bool:
        """Whether `key` was ever stored (fresh or not, and not dropped since)."""
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
