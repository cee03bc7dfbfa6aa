"""The cluster's GPUs as the hub sees them: nodes and pods, listed once and then watched.

Pods are kept by KubeSpawner's own `ResourceReflector` (the machinery KubeSpawner watches its
pods with), across all namespaces or in the hub's namespace. Nodes are cluster-scoped and the
reflector keys everything by namespace, so `NodeWatch` does the same list-then-watch for them.
One `CapacityWatch` per event loop and namespace is shared by every spawner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from kubernetes_asyncio import client, watch
from kubespawner.clients import shared_client
from kubespawner.reflector import ResourceReflector

from ..expiring import ExpiringCache

log = logging.getLogger(__name__)


class GpuPodReflector(ResourceReflector):
    """Every pod that may hold a GPU (KubeSpawner's reflector, not limited to its own pods)."""

    kind = "pods"

    async def start(self) -> None:
        try:
            await super().start()
        except Exception:
            # Nobody else waits for the first load: mark its exception as seen, or asyncio
            # reports "Future exception was never retrieved" when the reflector is dropped.
            future = self.first_load_future
            if future.done() and not future.cancelled():
                future.exception()
            raise


class CapacityForbidden(Exception):
    """The hub's service account may not read what counting GPUs needs (HTTP 403)."""

    def __init__(self, what: str, detail: str) -> None:
        self.what = what
        super().__init__(f"the hub may not {what} ({detail})")


async def probe(namespace: str | None, node_label_selector: str) -> None:
    """List one node and one pod, so a missing permission ends here, quietly, with
    `CapacityForbidden` (KubeSpawner's reflector would log a traceback for it)."""
    api = shared_client("CoreV1Api")
    calls = [
        ("list nodes", partial(api.list_node, label_selector=node_label_selector, limit=1)),
        (
            "list pods in every namespace"
            if namespace is None
            else f"list pods in namespace {namespace}",
            partial(api.list_pod_for_all_namespaces, limit=1)
            if namespace is None
            else partial(api.list_namespaced_pod, namespace, limit=1),
        ),
    ]
    for what, call in calls:
        response = await call(_preload_content=False)
        if response.status == 403:
            try:
                detail = json.loads(await response.read()).get("message", "403 Forbidden")
            except ValueError:
                detail = "403 Forbidden"
            raise CapacityForbidden(what, detail)
        if response.status != 200:
            raise client.ApiException(status=response.status, reason=response.reason)
        await response.read()


class NodeWatch:
    """The cluster's nodes by name, kept up to date with list + watch."""

    def __init__(
        self,
        label_selector: str = "",
        timeout_seconds: int = 30,
        restart_seconds: float = 300,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.api = shared_client("CoreV1Api")
        self.label_selector = label_selector
        self.timeout_seconds = timeout_seconds
        self.restart_seconds = restart_seconds
        self.on_failure = on_failure
        self.nodes: dict[str, dict[str, Any]] = {}
        self.first_load = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None

    async def _list(self) -> str:
        response = await self.api.list_node(
            label_selector=self.label_selector, _preload_content=False
        )
        if response.status != 200:
            raise client.ApiException(status=response.status, reason=response.reason)
        data = json.loads(await response.read())
        self.nodes = {n["metadata"]["name"]: n for n in data.get("items") or []}
        if not self.first_load.done():
            self.first_load.set_result(None)
        return data["metadata"]["resourceVersion"]

    async def _run(self) -> None:
        delay = 0.1
        resource_version: str | None = None
        while True:
            started = time.monotonic()
            w = watch.Watch()
            try:
                if resource_version is None:
                    resource_version = await self._list()
                method = partial(self.api.list_node, _preload_content=False)
                async with w.stream(
                    method,
                    label_selector=self.label_selector,
                    resource_version=resource_version,
                    timeout_seconds=self.timeout_seconds,
                ) as stream:
                    async for event in stream:
                        delay = 0.1
                        node = event["raw_object"]
                        name = node["metadata"]["name"]
                        if event["type"] == "DELETED":
                            self.nodes.pop(name, None)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            self.nodes[name] = node
                        if event["type"] != "ERROR":
                            resource_version = node["metadata"].get(
                                "resourceVersion", resource_version
                            )
                        if time.monotonic() - started > self.restart_seconds:
                            resource_version = None  # list again now and then
                            break
            except asyncio.CancelledError:
                raise
            except Exception:
                resource_version = None
                delay *= 2
                if delay > 30:
                    log.exception("gpuhub: watching nodes never recovered, giving up")
                    if self.on_failure:
                        self.on_failure()
                    return
                log.exception("gpuhub: error watching nodes, retrying in %.1fs", delay)
                await asyncio.sleep(delay)
            finally:
                w.stop()
                await w.close()

    async def start(self) -> None:
        await self._list()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class CapacityWatch:
    """Nodes and pods for counting GPUs. `ready` once both were listed; `failed` when either
    gave up (permissions, API server gone): the spawner then falls back to not counting."""

    def __init__(self, pods: ResourceReflector, nodes: NodeWatch) -> None:
        self.pod_reflector = pods
        self.node_watch = nodes
        self.failed = False

    @property
    def pods(self) -> list[dict[str, Any]]:
        return list(self.pod_reflector.resources.values())

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return list(self.node_watch.nodes.values())

    def mark_failed(self) -> None:
        self.failed = True

    async def stop(self) -> None:
        await asyncio.gather(stop_quietly(self.pod_reflector), stop_quietly(self.node_watch))


async def stop_quietly(part: Any) -> None:
    """Stop a reflector or watch. KubeSpawner's `ResourceReflector.stop` awaits the watch task it
    has just cancelled and so raises that task's CancelledError; only a cancellation of the caller
    itself goes on."""
    try:
        await part.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


_watches: dict[tuple[Any, ...], asyncio.Future[CapacityWatch]] = {}
#: the last failure to start a watch, by key (what was raised)
_failures: ExpiringCache[tuple[Any, ...], BaseException] = ExpiringCache(30.0)


async def capacity_watch(
    parent: Any, namespace: str | None, node_label_selector: str = "", retry_after: float = 30.0
) -> CapacityWatch:
    """The running `CapacityWatch` for this event loop (started on first use).

    `namespace` None watches pods in every namespace (needs a ClusterRole that lists pods).
    Raises what the first list raised; calls within `retry_after` seconds of a failure raise
    the same without asking the API server again, later ones try again.
    """
    key = (asyncio.get_running_loop(), namespace, node_label_selector)
    if key in _watches:
        return await asyncio.shield(_watches[key])
    failure = _failures.get(key, max_age=retry_after)
    if failure is not None:
        raise failure
    future: asyncio.Future[CapacityWatch] = asyncio.get_running_loop().create_future()
    _watches[key] = future
    started: list[Any] = []
    try:
        await probe(namespace, node_label_selector)
        holder: list[CapacityWatch] = []

        def failed() -> None:
            if holder:
                holder[0].mark_failed()
            _watches.pop(key, None)

        pods = GpuPodReflector(
            parent=parent,
            namespace=namespace,
            omit_namespace=namespace is None,
            list_method_name=(
                "list_pod_for_all_namespaces" if namespace is None else "list_namespaced_pod"
            ),
            on_failure=failed,
        )
        nodes = NodeWatch(label_selector=node_label_selector, on_failure=failed)
        watch_ = CapacityWatch(pods, nodes)
        holder.append(watch_)
        started += [pods, nodes]
        results = await asyncio.gather(pods.start(), nodes.start(), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
    except BaseException as e:
        _watches.pop(key, None)
        if isinstance(e, Exception):
            _failures.put(key, e)
        for part in started:
            await stop_quietly(part)
        future.set_exception(e)
        future.exception()  # retrieved: later callers start afresh
        raise
    _failures.discard(key)
    future.set_result(watch_)
    return watch_


def running_capacity_watch(
    namespace: str | None, node_label_selector: str = ""
) -> CapacityWatch | None:
    """The started watch of this event loop for `namespace`, or None."""
    future = _watches.get((asyncio.get_running_loop(), namespace, node_label_selector))
    if future is None or not future.done() or future.cancelled() or future.exception():
        return None
    return future.result()


async def stop_capacity_watches() -> None:
    """Stop every watch of the running loop (tests, hub shutdown)."""
    loop = asyncio.get_running_loop()
    for key in [k for k in _failures if k[0] is loop]:
        _failures.discard(key)
    for key in [k for k in _watches if k[0] is loop]:
        future = _watches.pop(key)
        if future.done() and not future.exception():
            await future.result().stop()
