"""The hub and the service write to the store at once, from separate processes, on SQLite and on
PostgreSQL: N+1 spawns on N GPUs get N distinct GPUs and one refusal, while the service records
and advances its actions and works the queue; nothing is lost or given twice."""

from __future__ import annotations

import multiprocessing

from gpuhub.store import NoGpuFree, Store

DEVICES = [f"GPU-{i}" for i in range(4)]
ACTIONS = 15


def _spawn(url: str, user: str, start, results) -> None:  # type: ignore[no-untyped-def]
    store = Store(url)
    start.wait(60)
    try:
        results.put((user, store.lease_devices(user, "", "gpu", DEVICES, 1)))
    except NoGpuFree:
        results.put((user, None))


def _service(url: str, start, results) -> None:  # type: ignore[no-untyped-def]
    store = Store(url)
    start.wait(60)
    ids = []
    for i in range(ACTIONS):
        action = store.record_action(
            f"s{i}", "", "release", "gpu-idle", "idle", actor="gpuhub", status="planned"
        )
        store.update_action(action.id, status="snapshotting")
        store.enqueue(f"q{i}", "", "gpu", 1)
        store.update_action(action.id, status="done")
        store.leases()
        store.purge_queue(store.queue()[0].seen_at)  # drops nothing seen since
        ids.append(action.id)
    results.put(("service", ids))


def test_hub_and_service_writing_at_once(db_url: str) -> None:
    Store(db_url)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_spawn, args=(db_url, f"u{i}", start, results))
        for i in range(len(DEVICES) + 1)
    ]
    procs.append(ctx.Process(target=_service, args=(db_url, start, results)))
    for p in procs:
        p.start()
    start.set()
    got = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0

    service_ids = got.pop("service")
    granted = [devices[0] for devices in got.values() if devices]
    assert sorted(granted) == DEVICES, "each GPU to exactly one spawn"
    assert sum(1 for devices in got.values() if devices is None) == 1, "the N+1th is refused"

    store = Store(db_url)
    leases = store.leases()
    assert sorted((x.user, x.device) for x in leases) == sorted(
        (user, devices[0]) for user, devices in got.items() if devices
    )
    actions = store.actions(limit=None)
    assert sorted(a.id for a in actions) == sorted(service_ids)
    assert {a.status for a in actions} == {"done"}
    assert len(store.queue()) == ACTIONS
