"""GPU capacity from the watched cluster: KubeSpawner's pod reflector and gpuhub's node watch,
running against the emulated API server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes_asyncio.client import Configuration

from gpuhub.spawner.kube_watch import stop_capacity_watches

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@pytest.fixture
def api_at_emulator(emulator) -> Iterator[None]:  # type: ignore[no-untyped-def]
    previous = Configuration.get_default_copy()
    conf = Configuration()
    conf.host = emulator.url
    Configuration.set_default(conf)
    yield
    Configuration.set_default(previous)


def gpu_pod(name: str, resource: str, count: int, product: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "c",
                "image": "busybox",
                "args": ["sleep", "600"],
                "resources": {"limits": {resource: str(count)}},
            }
        ],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    if product:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": product}
    return {"metadata": {"name": name, "namespace": "research"}, "spec": spec}


async def eventually(predicate, timeout: float = 10) -> Any:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"not true after {timeout} s: {value!r}")
        await asyncio.sleep(0.1)


async def test_capacity_follows_the_cluster(make_spawner, emulator, api_at_emulator) -> None:  # type: ignore[no-untyped-def]
    spawner = make_spawner(watch_gpu_capacity=True, gpu_capacity_all_namespaces=True)
    catalog = spawner.load_catalog()
    try:
        assert await spawner.start_capacity_watch() is not None
        assert spawner.gpu_capacity(catalog) == {
            "a100": (3, 3),
            "t4-shared": (4, 4),
            "a100-mig-1g": (7, 7),
            "a100-mig-3g": (2, 2),
        }
        # Another team's pod in another namespace takes two A100s and a MIG slice.
        emulator.call(
            emulator.create, "pods", gpu_pod("train", "nvidia.com/gpu", 2, "NVIDIA-A100-SXM4-80GB")
        )
        emulator.call(emulator.create, "pods", gpu_pod("mig", "nvidia.com/mig-3g.40gb", 1))
        emulator.call(emulator.schedule)
        await eventually(lambda: spawner.gpu_capacity(catalog)["a100"] == (3, 1))
        await eventually(lambda: spawner.gpu_capacity(catalog)["a100-mig-3g"] == (2, 1))
        # A new node joins: the node watch sees it without listing again.
        emulator.add_node(
            "a100-2",
            {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
            {"nvidia.com/gpu": 4},
            [GPU_TAINT],
        )
        await eventually(lambda: spawner.gpu_capacity(catalog)["a100"] == (7, 5))
        # The pod ends: its GPUs are free again.
        pod = emulator.pod("research", "train")
        emulator.call(emulator.terminate, pod, 0)
        await eventually(lambda: spawner.gpu_capacity(catalog)["a100"] == (7, 7))
        # A lease of a spawn whose pod is not bound yet counts as used.
        spawner.store.lease_units("ada", "", "a100", 2)
        assert spawner.gpu_capacity(catalog)["a100"] == (7, 5)
        assert emulator.failures == []
    finally:
        emulator.call(emulator.remove, "nodes", emulator.call(emulator.get, "nodes", "", "a100-2"))
        for name in ("mig",):
            pod = emulator.pod("research", name)
            if pod:
                emulator.call(emulator.terminate, pod, 0)
        await stop_capacity_watches()


async def test_without_permission_to_watch_nodes_capacity_falls_back(  # type: ignore[no-untyped-def]
    make_spawner, emulator, api_at_emulator, caplog
) -> None:
    """No ClusterRole to list nodes: each type counts as its per-server maximum, all free; the
    hub says so once, as a warning without traceback, and no future is left unretrieved."""
    emulator.forbidden = {"nodes"}
    loop = asyncio.get_running_loop()
    unhandled: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        with caplog.at_level("DEBUG"):
            for _ in range(3):  # three form renders
                spawner = make_spawner(watch_gpu_capacity=True, capacity_retry_interval=0)
                assert await spawner.start_capacity_watch() is None
                assert spawner.gpu_capacity(spawner.load_catalog())["a100"] == (4, 4)
                await spawner.render_options_form()
            import gc

            gc.collect()
            await asyncio.sleep(0.1)
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        message = warnings[0].getMessage()
        assert "may not list nodes" in message
        assert "kubernetes/hub-gpu-capacity-rbac.yaml" in message
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert unhandled == []
    finally:
        emulator.forbidden = set()
        loop.set_exception_handler(None)
    # Once permitted, the next spawn counts again.
    assert await spawner.start_capacity_watch() is not None
    assert spawner.gpu_capacity(spawner.load_catalog())["a100"] == (3, 3)
    await stop_capacity_watches()


async def test_after_a_failure_the_api_server_is_asked_again_only_later(  # type: ignore[no-untyped-def]
    make_spawner, emulator, api_at_emulator
) -> None:
    """Each form render does not ask the API server again while the permission is missing."""
    emulator.forbidden = {"nodes"}
    try:
        spawner = make_spawner(watch_gpu_capacity=True, capacity_retry_interval=30)
        assert await spawner.start_capacity_watch() is None
        before = len(emulator.requests)
        for _ in range(5):
            assert await spawner.start_capacity_watch() is None
        assert len(emulator.requests) == before
    finally:
        emulator.forbidden = set()
        await stop_capacity_watches()  # forgets the failure too


async def test_by_default_only_the_hubs_namespace_is_read(  # type: ignore[no-untyped-def]
    make_spawner, emulator, api_at_emulator
) -> None:
    """Least privilege: without the opt-in, the hub lists pods in its own namespace only (what
    Zero to JupyterHub's Role allows), never across the cluster."""
    emulator.forbidden = set()
    before = len(emulator.requests)
    spawner = make_spawner(watch_gpu_capacity=True, namespace="jhub")
    try:
        assert await spawner.start_capacity_watch() is not None
        paths = [path for _method, path in emulator.requests[before:]]
        assert any(p.startswith("/api/v1/namespaces/jhub/pods") for p in paths), paths
        assert not any(p.startswith("/api/v1/pods") for p in paths), paths
    finally:
        await stop_capacity_watches()


async def test_stopping_a_reflector_whose_watch_task_was_cancelled_does_not_raise() -> None:
    """KubeSpawner's reflector `stop()` re-raises its own watch task's CancelledError."""
    from gpuhub.spawner.kube_watch import stop_quietly

    class Reflector:
        async def stop(self) -> None:
            task = asyncio.create_task(asyncio.sleep(10))
            await asyncio.sleep(0)
            task.cancel()
            await task  # raises CancelledError, as ResourceReflector.stop does

    await stop_quietly(Reflector())  # returns normally

    async def caller() -> None:
        await stop_quietly(SlowReflector())

    class SlowReflector:
        async def stop(self) -> None:
            await asyncio.sleep(10)

    outer = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer  # the caller's own cancellation is not swallowed


async def test_counts_are_published_into_the_store(make_spawner, emulator, api_at_emulator) -> None:  # type: ignore[no-untyped-def]
    """The watch is the one owner of the cluster's capacity: it writes totals, free counts and
    why GPUs are held back into the store, stamped, for the service and its pages."""
    from gpuhub.spawner.capacity_publisher import stop_capacity_publishers

    spawner = make_spawner(watch_gpu_capacity=True, capacity_publish_interval=0.2)
    store = spawner.store
    try:
        assert await spawner.start_capacity_watch() is not None
        await eventually(lambda: "a100" in store.measured_capacity())
        a100 = store.measured_capacity()["a100"]
        assert (a100.total, a100.free, a100.unavailable) == (3, 3, 0)
        assert a100.source == "kubernetes" and a100.fresh() and a100.valid_for == 5.6
        emulator.cordon("t4-0")
        await eventually(lambda: store.measured_capacity()["t4-shared"].unavailable == 4)
        t4 = store.measured_capacity()["t4-shared"]
        assert (t4.total, t4.free, t4.offered_max) == (0, 0, 4)
        assert t4.note == "the 1 node with NVIDIA T4 (time-sliced share) GPUs is cordoned"
        spawner.store.lease_units("ada", "", "a100", 1)
        await eventually(lambda: store.measured_capacity()["a100"].free == 2)
        # A node stops reporting: its GPUs are held back, the others stay in the pool.
        emulator.set_ready("a100-1", False)
        await eventually(lambda: store.measured_capacity()["a100"].unavailable == 1)
        a100 = store.measured_capacity()["a100"]
        assert (a100.total, a100.free) == (2, 1)
        assert a100.note.startswith("1 of the 2 nodes with") and a100.note.endswith("unreachable")
    finally:
        emulator.set_ready("a100-1", True)
        emulator.cordon("t4-0", False)
        await stop_capacity_publishers()
        await stop_capacity_watches()
    stopped = store.measured_capacity()["a100"]
    await asyncio.sleep(0.3)
    assert store.measured_capacity()["a100"].measured_at == stopped.measured_at
