from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from gpuhub.store import ActionStatus, GpuQuotaReached, NoGpuFree, Store

DEVICES = [f"GPU-{i}" for i in range(4)]


def test_lease_release_and_usage(db_url):
    store = Store(db_url)
    assert store.lease_devices("ada", "", "gpu", DEVICES, 2) == ["GPU-0", "GPU-1"]
    assert store.lease_devices("bob", "x", "gpu", DEVICES, 1) == ["GPU-2"]
    assert store.gpus_held("ada") == 2
    assert store.gpus_held("ada", except_server="") == 0
    with pytest.raises(NoGpuFree, match="2 asked, 1 GPU is free"):
        store.lease_devices("cy", "", "gpu", DEVICES, 2)
    assert [lease.device for lease in store.free_leases("ada", "")] == ["GPU-0", "GPU-1"]
    assert store.lease_devices("cy", "", "gpu", DEVICES, 2) == ["GPU-0", "GPU-1"]


def test_action_states_are_stored_as_their_plain_names(db_url):
    store = Store(db_url)
    planned = store.record_action(
        "ada", "", "release", "gpu-idle", "idle", actor="gpuhub", status=ActionStatus.PLANNED
    )
    assert planned.status == "planned" and planned.open
    failed = store.update_action(planned.id, status=ActionStatus.SNAPSHOT_FAILED)
    assert failed.status == "snapshot-failed" and not failed.open
    with sa.create_engine(db_url).connect() as c:
        stored = c.execute(sa.text("SELECT status FROM gpuhub_actions")).scalars().all()
    assert stored == ["snapshot-failed"]
    assert [a.id for a in store.actions(statuses=[ActionStatus.SNAPSHOT_FAILED])] == [planned.id]
    assert [a.id for a in store.actions(statuses=["snapshot-failed"])] == [planned.id]


def test_the_quota_is_checked_again_in_the_transaction_that_takes_the_gpus(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    assert store.lease_devices("ada", "a", "gpu", DEVICES, 1, max_user_gpus=1) == ["GPU-0"]
    with pytest.raises(GpuQuotaReached) as e:
        store.lease_devices("ada", "b", "gpu", DEVICES, 1, max_user_gpus=1)
    assert (e.value.held, e.value.wanted, e.value.limit) == (1, 1, 1)
    with pytest.raises(GpuQuotaReached):
        store.lease_units("ada", "c", "shared", 1, max_user_gpus=1)
    assert [(lease.server, lease.device) for lease in store.leases("ada")] == [("a", "GPU-0")]
    # others are not limited by ada's quota, and nothing of the refused leases is left behind
    assert store.lease_devices("bob", "", "gpu", DEVICES, 2, max_user_gpus=2) == ["GPU-1", "GPU-2"]
    assert store.lease_devices("ada", "b", "gpu", DEVICES, 1, max_user_gpus=2) == ["GPU-3"]


def test_gpus_queued_counts_waiting_spawns_of_other_servers(tmp_path):
    from datetime import timedelta

    from gpuhub.store import utcnow

    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    now = utcnow()
    store.enqueue("ada", "a", "gpu", 1, now=now)
    store.enqueue("ada", "b", "gpu", 2, now=now)
    store.enqueue("ada", "old", "gpu", 4, now=now - timedelta(hours=1))  # no longer waiting
    store.enqueue("bob", "", "gpu", 1, now=now)
    since = now - timedelta(minutes=1)
    assert store.gpus_queued("ada", seen_since=since) == 3
    assert store.gpus_queued("ada", except_server="b", seen_since=since) == 1
    assert store.gpus_queued("ada") == 7
    assert store.gpus_queued("cy") == 0


def test_reconcile_frees_unknown_servers(db_url):
    store = Store(db_url)
    store.lease_devices("ada", "", "gpu", DEVICES, 1)
    store.lease_devices("bob", "", "gpu", DEVICES, 1)
    store.lease_units("cy", "big", "shared", 2)
    freed = store.reconcile({("ada", ""), ("cy", "big")})
    assert [(lease.user, lease.device) for lease in freed] == [("bob", "GPU-1")]
    assert store.gpus_held("cy") == 2


def test_threads_never_share_a_gpu(db_url):
    store = Store(db_url)

    def take(i: int):
        try:
            return store.lease_devices(f"u{i}", "", "gpu", DEVICES, 1)
        except NoGpuFree:
            return None

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(take, range(12)))
    granted = [r[0] for r in results if r]
    assert sorted(granted) == DEVICES


def _lease_in_process(url: str, user: str, queue) -> None:  # type: ignore[no-untyped-def]
    store = Store(url)
    got = []
    for _ in range(4):
        try:
            got += store.lease_devices(user, str(len(got)), "gpu", DEVICES, 1)
        except NoGpuFree:
            break
    queue.put(got)


def test_processes_never_share_a_gpu(db_url):
    url = db_url
    Store(url)  # create the tables once
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_lease_in_process, args=(url, f"p{i}", queue)) for i in range(3)]
    for p in procs:
        p.start()
    granted = [d for _ in procs for d in queue.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert sorted(granted) == DEVICES
