"""The GPU wait queue in the store: survives a new Store (hub restart), keeps places."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from gpuhub.store import Store

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)


def test_queue_survives_a_restart_and_keeps_places(db_url):
    url = db_url
    store = Store(url)
    store.enqueue("ada", "", "a100", 1, user_options={"gpus": 1}, now=T0)
    store.enqueue("bo", "x", "a100", 2, priority=3, now=T0 + timedelta(minutes=1))
    store.enqueue("cy", "", "t4", 1, now=T0 + timedelta(minutes=2))

    again = Store(url)  # another process, or the hub after a restart
    entries = again.queue()
    assert [(e.user, e.server, e.gpu_type, e.gpus, e.priority) for e in entries] == [
        ("ada", "", "a100", 1, 0),
        ("bo", "x", "a100", 2, 3),
        ("cy", "", "t4", 1, 0),
    ]
    assert entries[0].user_options == {"gpus": 1}
    assert entries[0].enqueued_at == T0
    assert [e.user for e in again.queue("t4")] == ["cy"]

    # Asked again for the same GPUs: same place, seen again.
    later = T0 + timedelta(minutes=30)
    ada = again.enqueue("ada", "", "a100", 1, now=later)
    assert (ada.enqueued_at, ada.seen_at) == (T0, later)
    # Asked for other GPUs: a new place.
    ada = again.enqueue("ada", "", "a100", 2, now=later)
    assert ada.enqueued_at == later

    again.touch_queue_entry("bo", "x", now=later)
    assert {e.user for e in again.purge_queue(T0 + timedelta(minutes=10))} == {"cy"}
    assert again.dequeue("bo", "x") is True
    assert again.dequeue("bo", "x") is False
    assert [e.user for e in again.queue()] == ["ada"]
    assert again.leases() == []  # the queue never touches leases
