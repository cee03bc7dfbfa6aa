"""An emulated Kubernetes API server with a scheduler and a kubelet, for tests.

Serves the core/v1 REST API that KubeSpawner and gpuhub use (pods, events, nodes, persistent
volume claims): create, read, delete, list and watch, with label and field selectors and
resource versions, over real HTTP, so kubernetes_asyncio and KubeSpawner's reflectors run
unchanged against it. The scheduler binds pending pods to nodes whose labels, taints and free
extended resources (GPUs) fit; the kubelet moves them to Running, optionally running the
container's command as a real local process on its own loopback address (127.x.y.z), with the
claim mounted at the home folder as a local folder. What it does not emulate is listed in
docs/kubernetes.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import kubernetes_validate
from aiohttp import web

from .scheduling import ScoringStrategy, place
from .selectors import SelectorError, field_selector, label_selector

log = logging.getLogger("k8s-emulator")

NAMESPACED = {"pods": "Pod", "events": "Event", "persistentvolumeclaims": "PersistentVolumeClaim"}
CLUSTER = {"nodes": "Node"}
KINDS = {**NAMESPACED, **CLUSTER}
CORE_RESOURCES = {"cpu", "memory", "ephemeral-storage", "pods"}
HISTORY = 10_000
#: What the DefaultTolerationSeconds admission plugin adds to every pod that lacks them.
DEFAULT_TOLERATIONS = (
    {
        "key": "node.kubernetes.io/not-ready",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 300,
    },
    {
        "key": "node.kubernetes.io/unreachable",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 300,
    },
)
PVC_PROTECTION = "kubernetes.io/pvc-protection"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def error(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(status_body(code, reason, message), status=code)


@dataclass
class Event:
    rv: int
    kind: str
    type: str
    old: dict[str, Any] | None
    new: dict[str, Any]


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    log_file: Path


def start_container(
    root: Path,
    base_env: Mapping[str, str],
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    ip: str,
) -> Process:
    """Run `container`'s command as a local process, as the emulated kubelet does: the pod's
    environment over `base_env`, the claim mounted at the working folder (`claim_folder`) as
    its working folder and HOME, the hub's URL rewritten to the pod's own address."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not argv:
        raise OSError("the emulated kubelet runs only containers with a command or args")
    env = dict(base_env)
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = item["value"]
    if "JUPYTERHUB_SERVICE_URL" in env:
        url = urlsplit(env["JUPYTERHUB_SERVICE_URL"])
        env["JUPYTERHUB_SERVICE_URL"] = urlunsplit(url._replace(netloc=f"{ip}:{url.port}"))
    cwd = root / "pods" / pod["metadata"]["uid"]
    cwd.mkdir(parents=True, exist_ok=True)
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"], {})
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        if claim and mount["mountPath"] == container.get("workingDir", mount["mountPath"]):
            cwd = claim_folder(root, pod["metadata"]["namespace"], claim)
            cwd.mkdir(parents=True, exist_ok=True)
            env["HOME"] = str(cwd)
    env.setdefault("HOME", str(cwd))
    executable = shutil.which(argv[0], path=env.get("PATH"))
    if executable is None:
        raise OSError(f"executable not found: {argv[0]}")
    log_file = root / "logs" / f"{pod['metadata']['name']}-{pod['metadata']['uid'][:8]}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as out:
        popen = subprocess.Popen(
            [executable, *argv[1:]],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(popen, log_file)


def claim_folder(root: Path, namespace: str, name: str) -> Path:
    """Where a claim's volume lives on this machine."""
    return root / "volumes" / namespace / name


@dataclass
class KubeEmulator:
    """The emulator. `run_containers`: start each pod's command as a local process."""

    root: Path
    run_containers: bool = False
    #: Extra variables for every container process (PATH is taken from this process).
    container_env: Mapping[str, str] = field(default_factory=dict)
    #: Variables of this process passed on to container processes.
    inherit_env: tuple[str, ...] = ("PATH", "LANG", "GPUHUB_TEST_RUN", "GPUHUB_FAKE_NVML")
    #: Seconds between a pod's binding and its containers running (image pull, start).
    start_delay: float = 0.2
    validate_version: str = "1.33.0"
    #: Scheduler profiles by `schedulerName` and how each scores nodes; a pod naming another
    #: scheduler stays Pending (nothing schedules it), as on a real cluster.
    schedulers: Mapping[str, ScoringStrategy] = field(
        default_factory=lambda: {"default-scheduler": ScoringStrategy()}
    )
    #: The default storage class (set on claims that name none, as the DefaultStorageClass
    #: admission plugin does) and whether its volumes are block storage, which one node at a
    #: time can attach (ReadWriteOnce: a second node gets a Multi-Attach error).
    default_storage_class: str = "standard"
    block_storage: bool = True
    #: Seconds between a claim's creation and its binding (the provisioner at work); meanwhile
    #: pods using it are not scheduled, with the scheduler's warning.
    bind_delay: float = 0.3

    def __post_init__(self) -> None:
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in KINDS}
        self.history: list[Event] = []
        self.rv = 1
        self.requests: list[tuple[str, str]] = []
        #: Kinds the client may not read (as without RBAC permission): 403 Forbidden.
        self.forbidden: set[str] = set()
        #: Errors of the emulator itself (a test should find none).
        self.failures: list[str] = []
        self.processes: dict[str, Process] = {}
        self.pod_ips = (
            f"127.{random.randint(100, 250)}.{i // 250}.{i % 250 + 1}" for i in itertools.count(1)
        )
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unschedulable_reported: dict[str, str] = {}
        self.url = ""
        self._closing = False

    # -- store ------------------------------------------------------------------------------------

    def _commit(
        self, kind: str, type_: str, obj: dict[str, Any], old: dict[str, Any] | None
    ) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if type_ == "DELETED":
            self.objects[kind].pop(key, None)
        else:
            self.objects[kind][key] = obj
        self.history.append(Event(self.rv, kind, type_, copy.deepcopy(old), copy.deepcopy(obj)))
        del self.history[:-HISTORY]
        assert self._changed is not None

        async def notify() -> None:
            async with self._changed:  # type: ignore[union-attr]
                self._changed.notify_all()  # type: ignore[union-attr]

        self._spawn(notify())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("emulator task failed", exc_info=task.exception())
            self.failures.append(repr(task.exception()))

    def create(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now())
        obj.setdefault("apiVersion", "v1")
        obj.setdefault("kind", KINDS[kind])
        if kind == "pods":
            obj.setdefault("status", {})
            obj["status"].update(phase="Pending", conditions=[], qosClass="BestEffort")
            spec = obj["spec"]
            spec.setdefault("schedulerName", "default-scheduler")
            tolerations = spec.setdefault("tolerations", [])
            for default in DEFAULT_TOLERATIONS:
                if not any(
                    t.get("key") == default["key"] and t.get("effect") in (None, "NoExecute")
                    for t in tolerations
                ):
                    tolerations.append(dict(default))
        if kind == "persistentvolumeclaims":
            meta.setdefault("finalizers", [])
            if PVC_PROTECTION not in meta["finalizers"]:
                meta["finalizers"].append(PVC_PROTECTION)
            if obj["spec"].get("storageClassName") is None and self.default_storage_class:
                obj["spec"]["storageClassName"] = self.default_storage_class
            obj["status"] = {"phase": "Pending"}
            self.claim_dir(meta["namespace"], meta["name"]).mkdir(parents=True, exist_ok=True)
            self._spawn(self.bind_claim(meta["namespace"], meta["name"], meta["uid"]))
        self._commit(kind, "ADDED", obj, None)
        return obj

    async def bind_claim(self, namespace: str, name: str, uid: str) -> None:
        """The provisioner creates a volume and the claim binds, after `bind_delay`."""
        await asyncio.sleep(self.bind_delay)
        claim = self.get("persistentvolumeclaims", namespace, name)
        if claim is None or claim["metadata"]["uid"] != uid:
            return

        def bound(c: dict[str, Any]) -> None:
            c["spec"]["volumeName"] = f"pvc-{uid}"
            c["status"] = {
                "phase": "Bound",
                "accessModes": list(c["spec"].get("accessModes") or []),
                "capacity": dict(c["spec"]["resources"]["requests"]),
            }

        self.update("persistentvolumeclaims", claim, bound)
        await self.schedule()

    def update(
        self, kind: str, obj: dict[str, Any], change: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        old = copy.deepcopy(obj)
        new = copy.deepcopy(obj)
        change(new)
        self._commit(kind, "MODIFIED", new, old)
        return new

    def remove(self, kind: str, obj: dict[str, Any]) -> None:
        self._commit(kind, "DELETED", copy.deepcopy(obj), obj)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects[kind].get((namespace, name))

    def claim_dir(self, namespace: str, name: str) -> Path:
        return claim_folder(self.root, namespace, name)

    def record_event(
        self,
        pod: Mapping[str, Any],
        reason: str,
        message: str,
        type_: str = "Normal",
        component: str = "kubelet",
    ) -> None:
        meta = pod["metadata"]
        stamp = now()
        self.create(
            "events",
            {
                "metadata": {
                    "name": f"{meta['name']}.{uuid.uuid4().hex[:12]}",
                    "namespace": meta["namespace"],
                },
                "involvedObject": {
                    "kind": "Pod",
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta["uid"],
                    "apiVersion": "v1",
                },
                "reason": reason,
                "message": message,
                "type": type_,
                "count": 1,
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "eventTime": None,
                "source": {"component": component},
                "reportingComponent": component,
            },
        )

    # -- HTTP -------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/version", self.h_version)
        app.router.add_get("/api/v1/namespaces/{ns}/{kind}", self.h_list)
        app.router.add_get("/api/v1/{kind}", self.h_list)
        app.router.add_post("/api/v1/namespaces/{ns}/{kind}", self.h_create)
        app.router.add_post("/api/v1/{kind}", self.h_create)
        app.router.add_get("/api/v1/namespaces/{ns}/{kind}/{name}", self.h_read)
        app.router.add_get("/api/v1/{kind}/{name}", self.h_read)
        app.router.add_delete("/api/v1/namespaces/{ns}/{kind}/{name}", self.h_delete)
        app.router.add_delete("/api/v1/{kind}/{name}", self.h_delete)
        app.middlewares.append(self.record_request)
        return app

    @web.middleware
    async def record_request(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        return await handler(request)

    async def h_version(self, request: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "33", "gitVersion": "v1.33.0-emulated"})

    def _kind(self, request: web.Request) -> tuple[str | None, str]:
        kind = request.match_info["kind"]
        ns = request.match_info.get("ns", "")
        if (
            kind not in KINDS
            or (kind in CLUSTER and ns)
            or (kind in NAMESPACED and not ns and request.method != "GET")
        ):
            raise web.HTTPNotFound(
                text=json.dumps(
                    status_body(
                        404,
                        "NotFound",
                        f"the server could not find the requested resource ({kind})",
                    )
                ),
                content_type="application/json",
            )
        return (ns or None) if kind in NAMESPACED else None, kind

    def _matcher(
        self, request: web.Request, namespace: str | None
    ) -> Callable[[dict[str, Any]], bool]:
        labels = label_selector(request.query.get("labelSelector"))
        fields = field_selector(request.query.get("fieldSelector"))

        def match(obj: dict[str, Any]) -> bool:
            if namespace is not None and obj["metadata"].get("namespace") != namespace:
                return False
            return labels(obj["metadata"].get("labels") or {}) and fields(obj)

        return match

    async def h_list(self, request: web.Request) -> web.StreamResponse:
        namespace, kind = self._kind(request)
        if kind in self.forbidden:
            return error(403, "Forbidden", f'{kind} is forbidden: cannot list resource "{kind}"')
        try:
            match = self._matcher(request, namespace)
        except SelectorError as e:
            return error(400, "BadRequest", str(e))
        if request.query.get("watch") in ("true", "1", "True"):
            return await self._watch(request, kind, match)
        items = [copy.deepcopy(o) for o in self.objects[kind].values() if match(o)]
        return web.json_response(
            {
                "kind": f"{KINDS[kind]}List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, kind: str, match: Callable[[dict[str, Any]], bool]
    ) -> web.StreamResponse:
        timeout = min(float(request.query.get("timeoutSeconds", 1800)), 1800)
        rv_text = request.query.get("resourceVersion", "")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)

        async def send(type_: str, obj: dict[str, Any]) -> None:
            await response.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

        if rv_text in ("", "0"):
            since = self.rv
            for obj in list(self.objects[kind].values()):
                if match(obj):
                    await send("ADDED", obj)
        else:
            since = int(rv_text)
            oldest = self.history[0].rv if self.history else self.rv
            if since < oldest - 1:
                await send(
                    "ERROR",
                    status_body(410, "Expired", f"too old resource version: {since} ({oldest})"),
                )
                return response
        deadline = asyncio.get_running_loop().time() + timeout
        assert self._changed is not None
        try:
            while True:
                for ev in [e for e in self.history if e.rv > since]:
                    since = ev.rv
                    if ev.kind != kind:
                        continue
                    was = ev.old is not None and match(ev.old)
                    now_ = ev.type != "DELETED" and match(ev.new)
                    if ev.type == "DELETED" and was:
                        await send("DELETED", ev.new)
                    elif now_ and not was:
                        await send("ADDED", ev.new)
                    elif now_ and was:
                        await send("MODIFIED", ev.new)
                    elif was and not now_:
                        await send("DELETED", ev.new)
                left = deadline - asyncio.get_running_loop().time()
                gone = request.transport is None or request.transport.is_closing()
                if left <= 0 or gone or self._closing:
                    break
                async with self._changed:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        return response

    async def h_create(self, request: web.Request) -> web.Response:
        namespace, kind = self._kind(request)
        try:
            body = await request.json()
        except ValueError:
            return error(400, "BadRequest", "the body is not JSON")
        meta = body.setdefault("metadata", {})
        if namespace is not None:
            meta["namespace"] = namespace
        if not meta.get("name"):
            return error(
                422, "Invalid", f'{KINDS[kind]} "" is invalid: metadata.name: Required value'
            )
        if self.validate_version:
            try:
                kubernetes_validate.validate(
                    {"apiVersion": "v1", "kind": KINDS[kind], **body},
                    self.validate_version,
                    strict=True,
                )
            except kubernetes_validate.ValidationError as e:
                return error(
                    422, "Invalid", f"{KINDS[kind]} {meta['name']!r} is invalid: {e.message}"
                )
        if self.get(kind, meta.get("namespace", ""), meta["name"]) is not None:
            return error(409, "AlreadyExists", f'{kind} "{meta["name"]}" already exists')
        obj = self.create(kind, body)
        if kind == "pods":
            self._spawn(self.schedule())
        return web.json_response(obj, status=201)

    async def h_read(self, request: web.Request) -> web.Response:
        namespace, kind = self._kind(request)
        obj = self.get(kind, namespace or "", request.match_info["name"])
        if obj is None:
            return error(404, "NotFound", f'{kind} "{request.match_info["name"]}" not found')
        return web.json_response(obj)

    async def h_delete(self, request: web.Request) -> web.Response:
        namespace, kind = self._kind(request)
        obj = self.get(kind, namespace or "", request.match_info["name"])
        if obj is None:
            return error(404, "NotFound", f'{kind} "{request.match_info["name"]}" not found')
        grace = request.query.get("gracePeriodSeconds")
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                body = {}
            if isinstance(body, dict) and body.get("gracePeriodSeconds") is not None:
                grace = body["gracePeriodSeconds"]
        if kind == "persistentvolumeclaims" and PVC_PROTECTION in (
            obj["metadata"].get("finalizers") or []
        ):
            # The pvc-protection finalizer: a claim in use by a pod goes when its last pod does.
            if "deletionTimestamp" not in obj["metadata"]:
                obj = self.update(
                    kind, obj, lambda c: c["metadata"].__setitem__("deletionTimestamp", now())
                )
            self.release_claims(obj["metadata"]["namespace"])
            return web.json_response(obj)
        if kind != "pods":
            self.remove(kind, obj)
            return web.json_response(obj)
        if "deletionTimestamp" in obj["metadata"]:
            return web.json_response(obj)
        seconds = (
            int(grace)
            if grace is not None
            else int(obj["spec"].get("terminationGracePeriodSeconds", 30))
        )

        def mark(p: dict[str, Any]) -> None:
            p["metadata"]["deletionTimestamp"] = now()
            p["metadata"]["deletionGracePeriodSeconds"] = seconds

        obj = self.update("pods", obj, mark)
        self._spawn(self.terminate(obj, seconds))
        return web.json_response(obj)

    # -- scheduler and kubelet --------------------------------------------------------------------

    def release_claims(self, namespace: str) -> None:
        """Remove the claims being deleted that no pod uses any more."""
        used = {
            (v.get("persistentVolumeClaim") or {}).get("claimName")
            for p in self.objects["pods"].values()
            if p["metadata"].get("namespace") == namespace
            for v in p["spec"].get("volumes") or []
        }
        for claim in list(self.objects["persistentvolumeclaims"].values()):
            meta = claim["metadata"]
            if (
                meta.get("namespace") == namespace
                and "deletionTimestamp" in meta
                and meta["name"] not in used
            ):
                self.remove("persistentvolumeclaims", claim)

    def node_pods(self, node_name: str) -> list[dict[str, Any]]:
        """The pods bound to `node_name` that still hold its resources."""
        return [
            p
            for p in self.objects["pods"].values()
            if p["spec"].get("nodeName") == node_name
            and p["status"].get("phase") not in ("Succeeded", "Failed")
        ]

    async def schedule(self) -> None:
        """Bind every pending pod that fits somewhere (oldest first)."""
        pending = sorted(
            (
                p
                for p in self.objects["pods"].values()
                if not p["spec"].get("nodeName") and "deletionTimestamp" not in p["metadata"]
            ),
            key=lambda p: int(p["metadata"]["resourceVersion"]),
        )
        for pod in pending:
            strategy = self.schedulers.get(pod["spec"].get("schedulerName", "default-scheduler"))
            if strategy is None:
                continue  # no such scheduler runs: the pod waits, without an event
            namespace = pod["metadata"]["namespace"]
            claims = [
                (
                    v["persistentVolumeClaim"]["claimName"],
                    self.get(
                        "persistentvolumeclaims", namespace, v["persistentVolumeClaim"]["claimName"]
                    ),
                )
                for v in pod["spec"].get("volumes") or []
                if "persistentVolumeClaim" in v
            ]
            missing = [name for name, claim in claims if claim is None]
            unbound = [
                name
                for name, claim in claims
                if claim is not None and claim["status"].get("phase") != "Bound"
            ]
            nodes = list(self.objects["nodes"].values())
            chosen, message = place(
                pod,
                nodes,
                {n["metadata"]["name"]: self.node_pods(n["metadata"]["name"]) for n in nodes},
                strategy,
                missing,
                unbound,
            )
            if chosen is None:
                key = pod["metadata"]["uid"]
                if self._unschedulable_reported.get(key) != message:
                    self._unschedulable_reported[key] = message
                    self.record_event(
                        pod, "FailedScheduling", message, "Warning", pod["spec"]["schedulerName"]
                    )
                continue

            def bind(p: dict[str, Any], node_name: str = chosen) -> None:
                p["spec"]["nodeName"] = node_name
                p["status"]["conditions"] = [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}
                ]

            pod = self.update("pods", pod, bind)
            meta = pod["metadata"]
            self.record_event(
                pod,
                "Scheduled",
                f"Successfully assigned {meta['namespace']}/{meta['name']} to {chosen}",
                component=pod["spec"]["schedulerName"],
            )
            self._spawn(self.run_pod(meta["namespace"], meta["name"], meta["uid"]))

    def attached_elsewhere(self, pod: Mapping[str, Any]) -> tuple[str, list[str]] | None:
        """(volume, pods) when one of `pod`'s ReadWriteOnce claims is attached to another node
        by other pods (block storage attaches to one node at a time), else None."""
        if not self.block_storage:
            return None
        namespace = pod["metadata"]["namespace"]
        node = pod["spec"].get("nodeName")
        for volume in pod["spec"].get("volumes") or []:
            claim_name = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            claim = claim_name and self.get("persistentvolumeclaims", namespace, claim_name)
            if not claim or "ReadWriteMany" in (claim["spec"].get("accessModes") or []):
                continue
            users = [
                p["metadata"]["name"]
                for p in self.objects["pods"].values()
                if p["metadata"]["uid"] != pod["metadata"]["uid"]
                and p["metadata"].get("namespace") == namespace
                and p["spec"].get("nodeName") not in (None, node)
                and p["status"].get("phase") not in ("Succeeded", "Failed")
                and any(
                    (v.get("persistentVolumeClaim") or {}).get("claimName") == claim_name
                    for v in p["spec"].get("volumes") or []
                )
            ]
            if users:
                return claim["spec"].get("volumeName", claim_name), sorted(users)
        return None

    async def wait_for_attach(self, namespace: str, name: str, uid: str) -> bool:
        """Hold a pod in ContainerCreating while its volume is attached to another node (the
        attach/detach controller's Multi-Attach error); False when the pod went meanwhile."""
        reported = False
        while True:
            pod = self.get("pods", namespace, name)
            if (
                pod is None
                or pod["metadata"]["uid"] != uid
                or "deletionTimestamp" in pod["metadata"]
            ):
                return False
            conflict = self.attached_elsewhere(pod)
            if conflict is None:
                return True
            if not reported:
                volume, users = conflict
                self.record_event(
                    pod,
                    "FailedAttachVolume",
                    f'Multi-Attach error for volume "{volume}" Volume is already used by '
                    f"pod(s) {', '.join(users)}",
                    "Warning",
                    "attachdetach-controller",
                )
                reported = True
            await asyncio.sleep(0.5)

    async def run_pod(self, namespace: str, name: str, uid: str) -> None:
        if not await self.wait_for_attach(namespace, name, uid):
            return
        image = self.get("pods", namespace, name)["spec"]["containers"][0]["image"]  # type: ignore[index]
        self.record_event(self.get("pods", namespace, name), "Pulling", f'Pulling image "{image}"')  # type: ignore[arg-type]
        await asyncio.sleep(self.start_delay)
        pod = self.get("pods", namespace, name)
        if pod is None or pod["metadata"]["uid"] != uid or "deletionTimestamp" in pod["metadata"]:
            return
        self.record_event(pod, "Pulled", f'Successfully pulled image "{image}"')
        ip = next(self.pod_ips)
        container = pod["spec"]["containers"][0]
        if self.run_containers:
            try:
                self.processes[uid] = self.start_process(pod, container, ip)
            except OSError as e:
                self.record_event(pod, "Failed", f"Error: {e}", "Warning")
                self.update("pods", pod, lambda p: p["status"].update(phase="Failed"))
                return
            self._spawn(self.wait_process(namespace, name, uid))
        self.record_event(pod, "Created", f"Created container {container['name']}")
        self.record_event(pod, "Started", f"Started container {container['name']}")
        started = now()

        def running(p: dict[str, Any]) -> None:
            p["status"].update(
                phase="Running",
                podIP=ip,
                podIPs=[{"ip": ip}],
                hostIP="127.0.0.1",
                startTime=started,
                containerStatuses=[
                    {
                        "name": c["name"],
                        "ready": True,
                        "started": True,
                        "restartCount": 0,
                        "image": c["image"],
                        "imageID": "",
                        "state": {"running": {"startedAt": started}},
                    }
                    for c in p["spec"]["containers"]
                ],
            )

        pod = self.get("pods", namespace, name)
        if pod is not None and pod["metadata"]["uid"] == uid:
            self.update("pods", pod, running)

    def start_process(self, pod: dict[str, Any], container: dict[str, Any], ip: str) -> Process:
        env = {k: os.environ[k] for k in self.inherit_env if k in os.environ}
        env.update(self.container_env)
        return start_container(self.root, env, pod, container, ip)

    async def wait_process(self, namespace: str, name: str, uid: str) -> None:
        process = self.processes[uid]
        while process.popen.poll() is None:
            await asyncio.sleep(0.2)
        code = process.popen.returncode
        pod = self.get("pods", namespace, name)
        if pod is None or pod["metadata"]["uid"] != uid or "deletionTimestamp" in pod["metadata"]:
            return

        def terminated(p: dict[str, Any]) -> None:
            p["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
            for status in p["status"].get("containerStatuses") or []:
                status["ready"] = False
                status["state"] = {
                    "terminated": {
                        "exitCode": code,
                        "finishedAt": now(),
                        "reason": "Completed" if code == 0 else "Error",
                    }
                }

        self.update("pods", pod, terminated)

    async def terminate(self, pod: dict[str, Any], grace: int) -> None:
        uid = pod["metadata"]["uid"]
        process = self.processes.pop(uid, None)
        if process is not None and process.popen.poll() is None:
            self.record_event(
                pod, "Killing", f"Stopping container {pod['spec']['containers'][0]['name']}"
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGTERM)
            deadline = asyncio.get_running_loop().time() + grace
            while process.popen.poll() is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
            if process.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.popen.pid, signal.SIGKILL)
                process.popen.wait()
        else:
            await asyncio.sleep(0.05)
        current = self.get("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
        if current is not None and current["metadata"]["uid"] == uid:
            self.remove("pods", current)
        self._unschedulable_reported.pop(uid, None)
        self.release_claims(pod["metadata"]["namespace"])
        await self.schedule()  # freed resources may let a pending pod in

    # -- running it -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        self._changed = asyncio.Condition()
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> KubeEmulator:
        """Serve from a thread of its own (so blocking test code cannot stall it)."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="k8s-emulator", daemon=True)
        self._thread.start()
        ready.wait(30)
        return self

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in the emulator's thread and return its result (async fns awaited)."""
        assert self._loop is not None

        async def run() -> Any:
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return copy.deepcopy(result)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(60)

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._closing = True
            for process in self.processes.values():
                if process.popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.popen.pid, signal.SIGKILL)
            for task in list(self._tasks):
                task.cancel()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    # -- conveniences for tests (call from any thread) ------------------------------------------

    def add_node(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        allocatable: Mapping[str, Any] | None = None,
        taints: list[dict[str, str]] | None = None,
    ) -> None:
        node = {
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/hostname": name, **(labels or {})},
            },
            "spec": {"taints": list(taints or [])},
            "status": {
                "allocatable": {
                    "cpu": "16",
                    "memory": "64Gi",
                    "pods": "110",
                    **{k: str(v) for k, v in (allocatable or {}).items()},
                },
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }

        async def add() -> None:
            self.create("nodes", node)
            await self.schedule()

        self.call(add)

    def cordon(self, name: str, cordoned: bool = True) -> None:
        """`kubectl cordon` (or uncordon): the node takes no new pods, and the node controller's
        `node.kubernetes.io/unschedulable` taint comes with it, as on a real cluster."""
        taint = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}

        def change(node: dict[str, Any]) -> None:
            node["spec"]["unschedulable"] = cordoned
            taints = [t for t in node["spec"].get("taints") or [] if t["key"] != taint["key"]]
            node["spec"]["taints"] = [*taints, taint] if cordoned else taints

        async def run() -> None:
            self.update("nodes", self.get("nodes", "", name), change)  # type: ignore[arg-type]
            await self.schedule()

        self.call(run)

    def set_ready(self, name: str, ready: bool = True) -> None:
        """The node's kubelet stops (or resumes) reporting: Ready turns Unknown and the node
        controller taints the node `node.kubernetes.io/unreachable`."""
        taint = {"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule"}

        def change(node: dict[str, Any]) -> None:
            node["status"]["conditions"] = [
                {"type": "Ready", "status": "True" if ready else "Unknown"}
            ]
            taints = [t for t in node["spec"].get("taints") or [] if t["key"] != taint["key"]]
            node["spec"]["taints"] = taints if ready else [*taints, taint]

        async def run() -> None:
            self.update("nodes", self.get("nodes", "", name), change)  # type: ignore[arg-type]
            await self.schedule()

        self.call(run)

    def list(self, kind: str) -> list[dict[str, Any]]:
        return self.call(lambda: list(self.objects[kind].values()))

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.call(self.get, "pods", namespace, name)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {"token": "emulated"}}],
                    "contexts": [
                        {
                            "name": "emulated",
                            "context": {
                                "cluster": "emulated",
                                "user": "tester",
                                "namespace": "jhub",
                            },
                        }
                    ],
                    "current-context": "emulated",
                }
            )
        )
        return path
