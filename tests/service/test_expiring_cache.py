"""gpuhub.expiring: the one expiring cache (fresh for its ttl, bounded, nothing kept on failure)."""

from __future__ import annotations

import pytest

from gpuhub.expiring import ExpiringCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_values_are_fresh_for_their_ttl():
    clock = Clock()
    cache: ExpiringCache[str, int] = ExpiringCache(10, clock=clock)
    cache.put("a", 1)
    cache.put("b", 2, ttl=60)
    clock.now += 9.9
    assert cache.get("a") == 1
    clock.now += 0.1
    assert cache.get("a") is None
    assert cache.get("b") == 2
    assert cache.get("b", max_age=5) is None  # a caller may ask for fresher
    assert cache.stored("a") and not cache.stored("c")


def test_get_or_load_loads_once_per_ttl_and_keeps_nothing_on_failure():
    clock = Clock()
    cache: ExpiringCache[str, int | None] = ExpiringCache(30, clock=clock)
    calls = []

    def load() -> int | None:
        calls.append(clock.now)
        return None  # a stored None is a value like any other

    assert cache.get_or_load("k", load) is None
    assert cache.get_or_load("k", load) is None
    assert len(calls) == 1
    clock.now += 30
    cache.get_or_load("k", load)
    assert len(calls) == 2

    def broken() -> int:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.get_or_load("other", broken)
    assert not cache.stored("other")


def test_the_least_recently_stored_go_first():
    cache: ExpiringCache[int, int] = ExpiringCache(60, max_entries=3)
    for i in range(5):
        cache.put(i, i)
    cache.put(2, 20)  # stored again: the most recent now
    cache.put(5, 5)
    assert len(cache) == 3
    assert [cache.get(i) for i in range(6)] == [None, None, 20, None, 4, 5]
