"""The fair GPU wait queue: order, place, who may start, estimated wait (pure)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from gpuhub.core.queue import (
    QueueEntry,
    demand,
    estimated_wait,
    line,
    may_start,
    ordinal,
    position,
    priority_for,
    wait_message,
)

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
STALE = timedelta(minutes=1)
HOUR = timedelta(hours=1)


def entry(
    user: str,
    minute: int,
    gpus: int = 1,
    priority: int = 0,
    gpu_type: str = "a100",
    seen: int | None = None,
) -> QueueEntry:
    at = T0 + timedelta(minutes=minute)
    seen_at = T0 + timedelta(minutes=seen if seen is not None else minute)
    return QueueEntry(user, "", gpu_type, gpus, at, seen_at, priority, id=minute)


def newcomer(user: str = "zoe", gpus: int = 1, priority: int = 0) -> QueueEntry:
    """Someone asking now who is not in the queue yet."""
    now = T0 + timedelta(minutes=10)
    return QueueEntry(user, "", "a100", gpus, now, now, priority, id=10**9)


NOW = T0 + timedelta(minutes=10)


def test_first_come_first_served() -> None:
    entries = [entry("cy", 3), entry("ada", 1), entry("bo", 2)]
    assert [e.user for e in line(entries, "a100", NOW, timedelta(hours=1))] == ["ada", "bo", "cy"]


def test_priority_goes_first_then_time() -> None:
    entries = [entry("ada", 1), entry("bo", 2, priority=5), entry("cy", 3, priority=5)]
    assert [e.user for e in line(entries, "a100", NOW, HOUR)] == ["bo", "cy", "ada"]


def test_other_types_and_stale_entries_are_not_in_line() -> None:
    entries = [entry("ada", 1, seen=2), entry("bo", 2, gpu_type="t4"), entry("cy", 3, seen=9.5)]
    assert [e.user for e in line(entries, "a100", NOW, STALE)] == ["cy"]


@pytest.mark.parametrize(
    "me, free, ok",
    [
        (newcomer(), 0, False),
        (newcomer(), 2, False),  # ada and bo are ahead and want 2
        (newcomer(), 3, True),
        (newcomer(priority=1), 1, True),  # a higher priority goes first
        (entry("ada", 1), 1, True),  # the head takes the first free GPU
        (entry("bo", 2), 1, False),
        (entry("bo", 2), 2, True),
    ],
)
def test_may_start(me: QueueEntry, free: int, ok: bool) -> None:
    queue = line([entry("ada", 1), entry("bo", 2)], "a100", NOW, HOUR)
    assert may_start(queue, me, free) is ok


def test_a_big_request_at_the_head_holds_the_line() -> None:
    """No overtaking: a 1-GPU request waits behind a 2-GPU head even with 1 GPU free."""
    queue = line([entry("ada", 1, gpus=2), entry("bo", 2)], "a100", NOW, HOUR)
    assert not may_start(queue, entry("bo", 2), 1)
    assert may_start(queue, entry("bo", 2), 3)


def test_position() -> None:
    queue = line([entry("ada", 1), entry("bo", 2), entry("cy", 3)], "a100", NOW, HOUR)
    assert [position(queue, e) for e in queue] == [1, 2, 3]
    assert position(queue, newcomer()) == 4


def test_estimated_wait() -> None:
    # Two GPUs, held since 9:00 and 9:30; typical hold one hour; now 9:10.
    held = [T0, T0 + timedelta(minutes=30)]
    queue = line([entry("ada", 1), entry("bo", 2)], "a100", NOW, HOUR)
    ada, bo = queue
    assert estimated_wait(queue, ada, 0, held, NOW, HOUR) == timedelta(minutes=50)
    assert estimated_wait(queue, bo, 0, held, NOW, HOUR) == timedelta(minutes=80)
    # cy, third, waits for ada's GPU to come back after ada's hour.
    cy = newcomer("cy")
    assert estimated_wait(queue, cy, 0, held, NOW, HOUR) == timedelta(minutes=110)
    assert estimated_wait(queue, ada, 1, held, NOW, HOUR) == timedelta(0)
    # Overdue holds are expected soon, not in the past.
    late = [T0 - timedelta(hours=3)]
    assert estimated_wait(queue, ada, 0, late, NOW, HOUR) == timedelta(minutes=6)
    # Nothing held, nothing free: no estimate.
    assert estimated_wait(queue, ada, 0, [], NOW, HOUR) is None


def test_priority_for_groups() -> None:
    assert priority_for(["students"], {"staff": 10}) == 0
    assert priority_for(["students", "staff"], {"staff": 10, "students": 1}) == 10


def test_demand_counts_waiting_gpus() -> None:
    entries = [
        entry("ada", 1, gpus=2),
        entry("bo", 9),
        entry("cy", 9, gpu_type="t4"),
        entry("old", 0),
    ]
    assert demand(entries, NOW, STALE) == {"a100": 1, "t4": 1}


def test_messages() -> None:
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
        "101st",
    ]
    text = wait_message("A100", 2, 3, timedelta(minutes=25))
    assert text == (
        "Waiting for a free A100 GPU: 2nd in line of 3, estimated wait about 25 minutes. "
        "Stop the server to leave the queue."
    )
    assert "estimated wait unknown" in wait_message("A100", 1, 1, None)


# -- servers running on CPU while they wait, "not now" --------------------------------------------


def test_an_entry_on_cpu_waits_while_its_server_runs_and_not_while_postponed():
    from dataclasses import replace

    from gpuhub.core.queue import ON_CPU_STALE_AFTER

    cpu = replace(entry("ann", 0), on_cpu=True)
    # the service refreshes it each cycle: a minute without a look does not drop it
    assert cpu.waiting(T0 + 3 * STALE, STALE)
    assert not entry("ann", 0).waiting(T0 + 3 * STALE, STALE)
    # without the service for long, nobody would switch it: it stops holding the line
    assert not cpu.waiting(T0 + ON_CPU_STALE_AFTER + STALE, STALE)
    later = replace(cpu, not_before=T0 + 10 * STALE)
    assert not later.waiting(T0 + STALE, STALE) and later.postponed(T0 + STALE)
    assert later.waiting(T0 + 10 * STALE, timedelta(hours=1))


def test_not_now_keeps_the_place_until_the_limit_then_the_back_of_the_line():
    from dataclasses import replace

    from gpuhub.core.queue import postpone

    ann = replace(entry("ann", 0), on_cpu=True)
    first = postpone(ann, T0, STALE * 30, limit=3)
    assert (first.not_now_count, first.to_back, first.not_before) == (1, False, T0 + 30 * STALE)
    second = postpone(replace(ann, not_now_count=1), T0, STALE, limit=3)
    assert (second.not_now_count, second.to_back) == (2, False)
    third = postpone(replace(ann, not_now_count=2), T0, STALE, limit=3)
    assert (third.not_now_count, third.to_back) == (0, True)
    assert postpone(replace(ann, not_now_count=50), T0, STALE, limit=0).to_back is False


def test_a_postponed_head_lets_the_next_one_start():
    from dataclasses import replace

    ann = replace(entry("ann", 0), on_cpu=True, not_before=T0 + HOUR)
    ben = entry("ben", 1)
    now = T0 + timedelta(minutes=2)
    queue = line([ann, ben], "a100", now, STALE)
    assert queue == [ben] and may_start(queue, ben, free=1)
