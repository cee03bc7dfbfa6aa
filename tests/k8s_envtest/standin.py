"""The machines behind a real control plane: kubelets that run pods as local processes, a volume
provisioner, and (where no kube-scheduler binary runs) the emulator's scheduler.

They talk to the API server over HTTP with the admin's token, the way the real components do:
the scheduler binds pods through the `binding` subresource, kubelets report pod status through
`status`, heartbeat their nodes, record events, and finish a deletion with a zero grace period;
the provisioner creates a hostPath volume per claim of the default class and, without a
controller manager, binds it. The container processes are started exactly as the emulator's
kubelet starts them (`k8s_emulator.emulator.start_container`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests
from k8s_emulator.emulator import Process, claim_folder, start_container
from k8s_emulator.scheduling import ScoringStrategy, place

log = logging.getLogger("k8s-envtest")

MERGE = {"Content-Type": "application/merge-patch+json"}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class StandIn:
    """Kubelets for `nodes`, a provisioner, and a scheduler when `schedulers` is given."""

    def __init__(
        self,
        url: str,
        session: requests.Session,
        root: Path,
        base_env: Mapping[str, str],
        schedulers: Mapping[str, ScoringStrategy] | None,
        bind_claims: bool,
        storage_class: str = "standard",
        block_storage: bool = True,
        bind_delay: float = 1.0,
    ) -> None:
        self.url = url
        self.http = session
        self.root = root
        self.base_env = dict(base_env)
        self.schedulers = schedulers
        self.bind_claims = bind_claims
        self.storage_class = storage_class
        self.block_storage = block_storage
        #: seconds from first seeing a claim to binding it (a provisioner takes a moment)
        self.bind_delay = bind_delay
        self.claims_seen: dict[str, float] = {}
        self.nodes: set[str] = set()
        self.not_ready: set[str] = set()
        self.processes: dict[str, Process] = {}
        self.terminating: set[str] = set()
        self.reported: dict[str, str] = {}
        self.failures: list[str] = []
        self.pod_ips = (
            f"127.{random.randint(100, 250)}.{i // 250}.{i % 250 + 1}" for i in itertools.count(1)
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="k8s-stand-in", daemon=True)
        self._last_heartbeat = 0.0

    # -- API ------------------------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.http.request(method, f"{self.url}{path}", timeout=30, **kwargs)
        if r.status_code >= 400 and r.status_code != 404:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    def items(self, path: str, **params: str) -> list[dict[str, Any]]:
        return list((self.api("GET", path, params=params) or {}).get("items") or [])

    def event(
        self, pod: Mapping[str, Any], reason: str, message: str, type_: str, component: str
    ) -> None:
        meta = pod["metadata"]
        stamp = now()
        self.api(
            "POST",
            f"/api/v1/namespaces/{meta['namespace']}/events",
            json={
                "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}"},
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
                "source": {"component": component},
            },
        )

    # -- the loop -------------------------------------------------------------------------------

    def start(self) -> StandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for process in self.processes.values():
            if process.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.popen.pid, signal.SIGKILL)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for step in (self.heartbeat, self.provision, self.schedule, self.run_pods):
                try:
                    step()
                except Exception as e:  # a test should find none
                    log.exception("stand-in step %s failed", step.__name__)
                    self.failures.append(f"{step.__name__}: {e!r}")
            self._stop.wait(0.2)

    def heartbeat(self) -> None:
        """Ready nodes report every 10 s (the node controller's grace period is 40 s)."""
        if time.monotonic() - self._last_heartbeat < 10:
            return
        self._last_heartbeat = time.monotonic()
        for name in sorted(self.nodes - self.not_ready):
            self.api(
                "PATCH",
                f"/api/v1/nodes/{name}/status",
                headers=MERGE,
                json={"status": {"conditions": [ready_condition(True)]}},
            )

    def provision(self) -> None:
        for claim in self.items("/api/v1/persistentvolumeclaims"):
            meta, spec = claim["metadata"], claim["spec"]
            if (
                claim["status"].get("phase") == "Bound"
                or spec.get("storageClassName") != self.storage_class
            ):
                continue
            seen = self.claims_seen.setdefault(meta["uid"], time.monotonic())
            if time.monotonic() - seen < self.bind_delay:
                continue
            volume = f"pvc-{meta['uid']}"
            folder = claim_folder(self.root, meta["namespace"], meta["name"])
            folder.mkdir(parents=True, exist_ok=True)
            if self.api("GET", f"/api/v1/persistentvolumes/{volume}") is None:
                self.api(
                    "POST",
                    "/api/v1/persistentvolumes",
                    json={
                        "metadata": {"name": volume},
                        "spec": {
                            "capacity": dict(spec["resources"]["requests"]),
                            "accessModes": list(spec.get("accessModes") or ["ReadWriteOnce"]),
                            "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
                            "claimRef": {
                                "namespace": meta["namespace"],
                                "name": meta["name"],
                                "uid": meta["uid"],
                            },
                            "storageClassName": self.storage_class,
                            "persistentVolumeReclaimPolicy": "Retain",
                        },
                    },
                )
            if self.bind_claims:  # no controller manager: bind as its volume binder would
                path = (
                    f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}"
                )
                self.api("PATCH", path, headers=MERGE, json={"spec": {"volumeName": volume}})
                self.api(
                    "PATCH",
                    f"{path}/status",
                    headers=MERGE,
                    json={
                        "status": {
                            "phase": "Bound",
                            "accessModes": list(spec.get("accessModes") or []),
                            "capacity": dict(spec["resources"]["requests"]),
                        }
                    },
                )
                self.api(
                    "PATCH",
                    f"/api/v1/persistentvolumes/{volume}/status",
                    headers=MERGE,
                    json={"status": {"phase": "Bound"}},
                )

    def schedule(self) -> None:
        if self.schedulers is None:
            return  # kube-scheduler runs
        pending = self.items("/api/v1/pods", fieldSelector="spec.nodeName=")
        if not pending:
            return
        nodes = self.items("/api/v1/nodes")
        pods = self.items("/api/v1/pods")
        claims = {
            (c["metadata"]["namespace"], c["metadata"]["name"]): c
            for c in self.items("/api/v1/persistentvolumeclaims")
        }
        pods_on: dict[str, list[dict[str, Any]]] = {}
        for p in pods:
            if p["spec"].get("nodeName") and p["status"].get("phase") not in (
                "Succeeded",
                "Failed",
            ):
                pods_on.setdefault(p["spec"]["nodeName"], []).append(p)
        for pod in sorted(pending, key=lambda p: p["metadata"]["creationTimestamp"]):
            strategy = self.schedulers.get(pod["spec"].get("schedulerName", ""))
            if strategy is None or "deletionTimestamp" in pod["metadata"]:
                continue
            ns = pod["metadata"]["namespace"]
            wanted = [
                v["persistentVolumeClaim"]["claimName"]
                for v in pod["spec"].get("volumes") or []
                if "persistentVolumeClaim" in v
            ]
            missing = [c for c in wanted if (ns, c) not in claims]
            unbound = [
                c
                for c in wanted
                if (ns, c) in claims and claims[(ns, c)]["status"].get("phase") != "Bound"
            ]
            chosen, message = place(pod, nodes, pods_on, strategy, missing, unbound)
            scheduler = pod["spec"]["schedulerName"]
            if chosen is None:
                if self.reported.get(pod["metadata"]["uid"]) != message:
                    self.reported[pod["metadata"]["uid"]] = message
                    self.event(pod, "FailedScheduling", message, "Warning", scheduler)
                continue
            name = pod["metadata"]["name"]
            self.api(
                "POST",
                f"/api/v1/namespaces/{ns}/pods/{name}/binding",
                json={
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": chosen},
                },
            )
            pods_on.setdefault(chosen, []).append(pod)
            self.event(
                pod,
                "Scheduled",
                f"Successfully assigned {ns}/{name} to {chosen}",
                "Normal",
                scheduler,
            )

    def run_pods(self) -> None:
        pods = [p for p in self.items("/api/v1/pods") if p["spec"].get("nodeName") in self.nodes]
        for pod in pods:
            uid = pod["metadata"]["uid"]
            if "deletionTimestamp" in pod["metadata"]:
                if uid not in self.terminating:
                    self.terminating.add(uid)
                    threading.Thread(target=self.kill, args=(pod,), daemon=True).start()
                continue
            phase = pod["status"].get("phase")
            if phase == "Pending" and uid not in self.processes:
                if self.attached_elsewhere(pod, pods):
                    continue
                self.start_pod(pod)
            elif phase == "Running" and uid in self.processes:
                code = self.processes[uid].popen.poll()
                if code is not None:
                    self.patch_status(pod, {"phase": "Succeeded" if code == 0 else "Failed"})

    def attached_elsewhere(self, pod: Mapping[str, Any], pods: list[dict[str, Any]]) -> bool:
        """A ReadWriteOnce claim in use on another node: the Multi-Attach error, once."""
        if not self.block_storage:
            return False
        ns, node = pod["metadata"]["namespace"], pod["spec"]["nodeName"]
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"].get("volumes") or []
            if "persistentVolumeClaim" in v
        }
        users = sorted(
            p["metadata"]["name"]
            for p in pods
            if p["metadata"]["uid"] != pod["metadata"]["uid"]
            and p["metadata"]["namespace"] == ns
            and p["spec"].get("nodeName") != node
            and p["status"].get("phase") not in ("Succeeded", "Failed")
            and claims
            & {
                v["persistentVolumeClaim"]["claimName"]
                for v in p["spec"].get("volumes") or []
                if "persistentVolumeClaim" in v
            }
        )
        if not users:
            return False
        message = (
            f"Multi-Attach error for volume Volume is already used by pod(s) {', '.join(users)}"
        )
        if self.reported.get(pod["metadata"]["uid"]) != message:
            self.reported[pod["metadata"]["uid"]] = message
            self.event(pod, "FailedAttachVolume", message, "Warning", "attachdetach-controller")
        return True

    def start_pod(self, pod: dict[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        self.event(pod, "Pulling", f'Pulling image "{container["image"]}"', "Normal", "kubelet")
        self.event(
            pod, "Pulled", f'Successfully pulled image "{container["image"]}"', "Normal", "kubelet"
        )
        ip = next(self.pod_ips)
        try:
            self.processes[pod["metadata"]["uid"]] = start_container(
                self.root, self.base_env, pod, container, ip
            )
        except OSError as e:
            self.event(pod, "Failed", f"Error: {e}", "Warning", "kubelet")
            self.patch_status(pod, {"phase": "Failed"})
            return
        self.event(pod, "Created", f"Created container {container['name']}", "Normal", "kubelet")
        self.event(pod, "Started", f"Started container {container['name']}", "Normal", "kubelet")
        started = now()
        self.patch_status(
            pod,
            {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "hostIP": "127.0.0.1",
                "startTime": started,
                "conditions": [
                    {"type": t, "status": "True", "lastTransitionTime": started}
                    for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
                ],
                "containerStatuses": [
                    {
                        "name": c["name"],
                        "ready": True,
                        "started": True,
                        "restartCount": 0,
                        "image": c["image"],
                        "imageID": "",
                        "state": {"running": {"startedAt": started}},
                    }
                    for c in pod["spec"]["containers"]
                ],
            },
        )

    def patch_status(self, pod: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        self.api(
            "PATCH",
            f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
            headers=MERGE,
            json={"status": dict(status)},
        )

    def kill(self, pod: Mapping[str, Any]) -> None:
        """Stop the containers within the grace period, then remove the pod (grace 0)."""
        meta = pod["metadata"]
        process = self.processes.pop(meta["uid"], None)
        grace = int(meta.get("deletionGracePeriodSeconds") or 0)
        if process is not None and process.popen.poll() is None:
            self.event(pod, "Killing", "Stopping container", "Normal", "kubelet")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGTERM)
            try:
                process.popen.wait(grace)
            except Exception:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.popen.pid, signal.SIGKILL)
                process.popen.wait()
        try:
            self.api(
                "DELETE",
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                json={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": meta["uid"]},
                },
            )
        except Exception as e:
            self.failures.append(f"kill: {e!r}")


def ready_condition(ready: bool) -> dict[str, str]:
    stamp = now()
    return {
        "type": "Ready",
        "status": "True" if ready else "Unknown",
        "reason": "KubeletReady" if ready else "NodeStatusUnknown",
        "message": "gpuhub's kubelet stand-in" if ready else "Kubelet stopped posting node status.",
        "lastHeartbeatTime": stamp,
        "lastTransitionTime": stamp,
    }
