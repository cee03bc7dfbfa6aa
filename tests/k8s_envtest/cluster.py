"""A real control plane set up as a Zero to JupyterHub site has it, with the emulator's interface.

The hub authenticates with the `hub` ServiceAccount's token, bound to exactly the chart's hub Role
(in the namespace) and the ClusterRole gpuhub documents (`kubernetes/hub-gpu-capacity-rbac.yaml`);
the default storage class is `standard`; GPU nodes are registered as the GPU Operator labels and
taints them; kubelets, provisioner and (without kube-scheduler) scheduler are `StandIn`s. The
methods the Kubernetes tests call on the emulator (`list`, `pod`, `add_node`, `cordon`,
`set_ready`, `claim_dir`, `kubeconfig`, `requests`, `failures`) work the same here, so the same
tests run against both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from k8s_emulator.emulator import claim_folder
from k8s_emulator.scheduling import ScoringStrategy

from gpuhub import paths

from .control_plane import ControlPlane
from .standin import MERGE, StandIn, ready_condition

NAMESPACE = "jhub"
HUB = "hub"
#: The hub's Role in Zero to JupyterHub 4.x (templates/hub/rbac.yaml).
CHART_HUB_ROLE = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "Role",
    "metadata": {"name": "hub"},
    "rules": [
        {
            "apiGroups": [""],
            "resources": ["pods", "persistentvolumeclaims", "secrets", "services"],
            "verbs": ["get", "watch", "list", "create", "delete"],
        },
        {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "watch", "list"]},
    ],
}
PATHS = {
    "pods": "/api/v1/pods",
    "events": "/api/v1/events",
    "nodes": "/api/v1/nodes",
    "persistentvolumeclaims": "/api/v1/persistentvolumeclaims",
}
METHODS = {
    "create": "POST",
    "delete": "DELETE",
    "deletecollection": "DELETE",
    "update": "PUT",
    "patch": "PATCH",
    "get": "GET",
    "list": "GET",
    "watch": "GET",
}


class EnvtestCluster:
    """A real API server (and scheduler, controller manager where present) with stand-ins."""

    def __init__(
        self,
        root: Path,
        bin_dir: Path,
        container_env: Mapping[str, str] | None = None,
        scheduler_profiles: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        inherit_env: Sequence[str] = ("PATH", "LANG", "GPUHUB_TEST_RUN", "GPUHUB_FAKE_NVML"),
    ) -> None:
        self.root = root
        self.control = ControlPlane(root / "control-plane", bin_dir, dict(scheduler_profiles or {}))
        self.base_env = {k: os.environ[k] for k in inherit_env if k in os.environ}
        self.base_env.update(container_env or {})
        self.scheduler_profiles = dict(scheduler_profiles or {})
        self.standin: StandIn | None = None
        self.hub_token = ""

    @property
    def url(self) -> str:
        return self.control.url

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self.standin is not None
        return self.standin.api(method, path, **kwargs)

    def start(self) -> EnvtestCluster:
        self.control.start()
        session = self.control.admin()
        schedulers = None
        if not self.control.has_scheduler:
            schedulers = {"default-scheduler": ScoringStrategy()}
            schedulers.update(
                {
                    n: ScoringStrategy.from_plugin_config(c)
                    for n, c in self.scheduler_profiles.items()
                }
            )
        self.standin = StandIn(
            self.url,
            session,
            self.root,
            self.base_env,
            schedulers,
            bind_claims=not self.control.has_controller_manager,
        )
        self._set_up()
        self.standin.start()
        return self

    def _set_up(self) -> None:
        self.api(
            "POST",
            "/apis/storage.k8s.io/v1/storageclasses",
            json={
                "metadata": {
                    "name": "standard",
                    "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
                },
                "provisioner": "gpuhub.test/hostpath",
                "volumeBindingMode": "Immediate",
                "reclaimPolicy": "Retain",
            },
        )
        self.api("POST", "/api/v1/namespaces", json={"metadata": {"name": NAMESPACE}})
        for account in ("default", HUB):  # no controller manager: no default account either
            if self.api("GET", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{account}") is None:
                self.api(
                    "POST",
                    f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts",
                    json={"metadata": {"name": account}},
                )
        rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NAMESPACE}"
        self.api("POST", f"{rbac}/roles", json=CHART_HUB_ROLE)
        self.api(
            "POST",
            f"{rbac}/rolebindings",
            json={
                "metadata": {"name": "hub"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "hub"},
                "subjects": [{"kind": "ServiceAccount", "name": HUB, "namespace": NAMESPACE}],
            },
        )
        # Exactly the documented ClusterRole and its binding.
        manifest = paths.config_dir().parent / "kubernetes" / "hub-gpu-capacity-rbac.yaml"
        for doc in yaml.safe_load_all(manifest.read_text()):
            plural = {"ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings"}
            self.api("POST", f"/apis/rbac.authorization.k8s.io/v1/{plural[doc['kind']]}", json=doc)
        token = self.api(
            "POST",
            f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{HUB}/token",
            json={
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": 86400},
            },
        )
        self.hub_token = token["status"]["token"]

    def stop(self) -> None:
        if self.standin is not None:
            self.standin.stop()
        self.control.stop()

    # -- the emulator's interface ---------------------------------------------------------------

    def kubeconfig(self, path: Path) -> Path:
        """The hub's kubeconfig: the `hub` ServiceAccount's token, namespace `jhub`."""
        return self.control.write_kubeconfig(path, self.hub_token, NAMESPACE)

    def add_node(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        allocatable: Mapping[str, Any] | None = None,
        taints: list[dict[str, str]] | None = None,
    ) -> None:
        assert self.standin is not None
        self.api(
            "POST",
            "/api/v1/nodes",
            json={
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/hostname": name, **(labels or {})},
                },
                "spec": {"taints": list(taints or [])},
            },
        )
        resources = {
            "cpu": "16",
            "memory": "64Gi",
            "pods": "110",
            **{k: str(v) for k, v in (allocatable or {}).items()},
        }
        self.api(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            headers=MERGE,
            json={
                "status": {
                    "capacity": resources,
                    "allocatable": resources,
                    "conditions": [ready_condition(True)],
                    "addresses": [
                        {"type": "InternalIP", "address": "127.0.0.1"},
                        {"type": "Hostname", "address": name},
                    ],
                }
            },
        )
        self.standin.nodes.add(name)

    def _taint(self, name: str, key: str, on: bool, extra: Mapping[str, Any]) -> None:
        node = self.api("GET", f"/api/v1/nodes/{name}")
        taints = [t for t in node["spec"].get("taints") or [] if t["key"] != key]
        if on:
            taints.append({"key": key, "effect": "NoSchedule"})
        self.api(
            "PATCH",
            f"/api/v1/nodes/{name}",
            headers=MERGE,
            json={"spec": {**extra, "taints": taints}},
        )

    def cordon(self, name: str, cordoned: bool = True) -> None:
        """`kubectl cordon`; the node controller's taint comes with it (added here where no
        controller manager runs)."""
        if self.control.has_controller_manager:
            self.api(
                "PATCH",
                f"/api/v1/nodes/{name}",
                headers=MERGE,
                json={"spec": {"unschedulable": cordoned}},
            )
        else:
            self._taint(
                name, "node.kubernetes.io/unschedulable", cordoned, {"unschedulable": cordoned}
            )

    def set_ready(self, name: str, ready: bool = True) -> None:
        assert self.standin is not None
        (self.standin.not_ready.discard if ready else self.standin.not_ready.add)(name)
        self.api(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            headers=MERGE,
            json={"status": {"conditions": [ready_condition(ready)]}},
        )
        if not self.control.has_controller_manager:
            self._taint(name, "node.kubernetes.io/unreachable", not ready, {})

    def list(self, kind: str) -> list[dict[str, Any]]:
        return list((self.api("GET", PATHS[kind]) or {}).get("items") or [])

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.api("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")

    def claim_dir(self, namespace: str, name: str) -> Path:
        return claim_folder(self.root, namespace, name)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """What the hub asked the API server, from its audit log: (method, path and query)."""
        out = []
        log_file = self.control.audit_log
        if not log_file.exists():
            return out
        for line in log_file.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("user", {}).get("username") != f"system:serviceaccount:{NAMESPACE}:{HUB}":
                continue
            if entry.get("stage") != "ResponseComplete":
                continue
            out.append(
                (METHODS.get(entry.get("verb", ""), entry.get("verb", "")), entry["requestURI"])
            )
        return out

    @property
    def failures(self) -> list[str]:
        return list(self.standin.failures) if self.standin is not None else []
