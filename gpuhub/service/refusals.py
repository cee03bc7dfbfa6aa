"""Refused token lookups counted per source address, so that random tokens cannot turn the
service into a load generator against the hub.

Every token the service does not know yet costs one request to the hub (`GET /hub/api/user`).
Known tokens are cached and never limited; a source that had `max_refusals` tokens refused within
`window` seconds gets its unknown tokens refused without asking the hub until the oldest refusal
leaves the window.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any


class RefusalLimiter:
    """Refused lookups per source within a sliding window (at most `max_sources` sources kept;
    the least recently refused are forgotten first)."""

    def __init__(
        self,
        max_refusals: int = 30,
        window: float = 60.0,
        max_sources: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_refusals = max_refusals
        self.window = window
        self.max_sources = max_sources
        self.clock = clock
        self._refusals: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, source: str) -> deque[float] | None:
        times = self._refusals.get(source)
        if times is None:
            return None
        cutoff = self.clock() - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._refusals[source]
            return None
        return times

    def retry_after(self, source: str | None) -> float:
        """0 when `source` may have a token looked up now, else the seconds until it may."""
        if source is None or self.max_refusals <= 0:
            return 0.0
        times = self._recent(source)
        if times is None or len(times) < self.max_refusals:
            return 0.0
        return max(0.0, times[0] + self.window - self.clock())

    def refused(self, source: str | None) -> None:
        """Count one refused lookup for `source`."""
        if source is None or self.max_refusals <= 0:
            return
        times = self._recent(source) or deque(maxlen=self.max_refusals)
        times.append(self.clock())
        self._refusals[source] = times
        self._refusals.move_to_end(source)
        while len(self._refusals) > self.max_sources:
            self._refusals.popitem(last=False)


def peer_address(request: Any) -> str:
    """The address of the connection a tornado request came on: never `X-Forwarded-For` or
    `X-Real-Ip` (the service's server reads them for its logs, and any sender sets them at will,
    which would give it a fresh address for every guess)."""
    context = getattr(request.connection, "context", None)
    address = getattr(context, "address", None)
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address) if address else "unknown"
