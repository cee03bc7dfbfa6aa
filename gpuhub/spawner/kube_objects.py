"""What a `Selection` changes in a single-user pod: pure, plain data in, plain data out.

`pod_settings` turns a validated selection into the values `GPUKubeSpawner` puts into
KubeSpawner's own traits (image, resource limits, node selector, tolerations, volumes, labels,
annotations, environment). Nothing here talks to Kubernetes, so every manifest gpuhub can produce
is tested without a cluster.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.catalog import Catalog
from ..core.options import Selection
from .server_env import server_env

LABEL_PREFIX = "gpuhub.io/"
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")


def label_value(value: str) -> str:
    """`value` as a valid Kubernetes label value (63 characters of [A-Za-z0-9._-]).

    Valid values are kept as they are; others are lower-cased, invalid characters become `-`,
    and a short hash keeps two different values from mapping to the same label.
    """
    if _LABEL_VALUE.match(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    safe = re.sub(r"[^a-z0-9._-]+", "-", value.lower()).strip("._-")
    return f"{safe[:54]}-{digest}".strip("-")


def template_literal(value: str) -> str:
    """`value` protected from KubeSpawner's `{field}` expansion of labels and annotations."""
    return value.replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class PodSettings:
    """The KubeSpawner trait values for one selection (lists and dicts are fresh copies)."""

    image: str
    extra_resource_limits: dict[str, str]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    volume_mounts: list[dict[str, Any]]
    labels: dict[str, str]
    annotations: dict[str, str]
    environment: dict[str, Any]
    default_url: str
    gpu_resource: str | None = None
    gpus: int = 0


@dataclass(frozen=True)
class PodBase:
    """What the admin configured on the spawner, before a selection is applied."""

    image: str
    extra_resource_limits: Mapping[str, str] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    volumes: tuple[Mapping[str, Any], ...] = ()
    volume_mounts: tuple[Mapping[str, Any], ...] = ()
    environment: Mapping[str, Any] = field(default_factory=dict)
    home_pvc: bool = True
    home_mount_path: str = "/home/jovyan"
    shm_size_limit: str | None = "1Gi"


HOME_VOLUME = "gpuhub-home"
SHM_VOLUME = "gpuhub-shm"
#: KubeSpawner expands `{pvc_name}` in volumes to the spawner's PVC name.
PVC_NAME_FIELD = "{pvc_name}"


def gpu_resources(catalog: Catalog) -> set[str]:
    """Every extended resource a GPU type of `catalog` uses."""
    return {g.resource for g in catalog.gpu_types}


def _without_names(items: Iterable[Mapping[str, Any]], names: set[str]) -> list[dict[str, Any]]:
    return [dict(item) for item in items if item.get("name") not in names]


def selection_record(selection: Selection) -> dict[str, Any]:
    """The selection as the pod's annotation records it: a CPU-only server names no GPU type."""
    record = selection.as_user_options()
    if not selection.gpus:
        record["gpu_type"] = None
    return record


def pod_settings(
    selection: Selection, catalog: Catalog, base: PodBase, user: str, server: str = ""
) -> PodSettings:
    """The pod of `user`'s `server` running `selection`.

    `selection` must come from `options.parse` with the same catalogue; an id it names that the
    catalogue lacks raises `ValueError`. GPU resources the admin put into the base limits are
    dropped: only the selection decides how many GPUs a pod gets, and a CPU-only selection gets
    neither GPU limits nor GPU tolerations nor GPU node selectors.
    """
    environment = catalog.environment(selection.environment)
    interface = catalog.interface(selection.interface)
    if environment is None or interface is None:
        raise ValueError(f"selection {selection} does not fit catalogue {catalog.source}")
    gpu_type = catalog.gpu_type(selection.gpu_type) if selection.gpu_type else None
    if selection.gpus and gpu_type is None:
        raise ValueError(f"selection {selection} names no GPU type of {catalog.source}")

    gpu_names = gpu_resources(catalog)
    limits = {k: str(v) for k, v in base.extra_resource_limits.items() if k not in gpu_names}
    node_selector = dict(base.node_selector)
    tolerations = [dict(t) for t in base.tolerations]
    env = dict(base.environment)
    env.update(server_env(selection, None))  # the device plugin picks the GPUs at start
    gpu_resource = None
    if selection.gpus and gpu_type is not None:
        gpu_resource = gpu_type.resource
        limits[gpu_type.resource] = str(selection.gpus)
        node_selector.update(gpu_type.node_selector)
        for toleration in gpu_type.tolerations:
            if dict(toleration) not in tolerations:
                tolerations.append(dict(toleration))
    else:
        # Images built on CUDA base images set NVIDIA_VISIBLE_DEVICES=all; on a node whose
        # container runtime honours it, a pod without a GPU limit would see every GPU.
        env["NVIDIA_VISIBLE_DEVICES"] = "void"

    ours = {HOME_VOLUME, SHM_VOLUME}
    volumes = _without_names(base.volumes, ours)
    mounts = _without_names(base.volume_mounts, ours)
    mounted_paths = {m.get("mountPath") for m in mounts}
    if base.home_pvc and base.home_mount_path not in mounted_paths:
        volumes.append(
            {"name": HOME_VOLUME, "persistentVolumeClaim": {"claimName": PVC_NAME_FIELD}}
        )
        mounts.append({"name": HOME_VOLUME, "mountPath": base.home_mount_path})
    if "/dev/shm" not in mounted_paths:
        shm: dict[str, Any] = {"medium": "Memory"}
        if base.shm_size_limit:
            shm["sizeLimit"] = base.shm_size_limit
        volumes.append({"name": SHM_VOLUME, "emptyDir": shm})
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})

    gpu_type_label = gpu_type.id if (gpu_type is not None and selection.gpus) else "none"
    labels = {
        f"{LABEL_PREFIX}managed": "true",
        f"{LABEL_PREFIX}user": label_value(user),
        f"{LABEL_PREFIX}server": label_value(server) if server else "default",
        f"{LABEL_PREFIX}interface": selection.interface,
        f"{LABEL_PREFIX}environment": selection.environment,
        f"{LABEL_PREFIX}gpu-type": gpu_type_label,
        f"{LABEL_PREFIX}gpus": str(selection.gpus),
    }
    annotations = {
        f"{LABEL_PREFIX}user": user,
        f"{LABEL_PREFIX}server": server,
        f"{LABEL_PREFIX}selection": json.dumps(selection_record(selection), sort_keys=True),
    }
    return PodSettings(
        image=environment.image or base.image,
        extra_resource_limits=limits,
        node_selector=node_selector,
        tolerations=tolerations,
        volumes=volumes,
        volume_mounts=mounts,
        labels=labels,
        annotations=annotations,
        environment=env,
        default_url=interface.default_url,
        gpu_resource=gpu_resource,
        gpus=selection.gpus,
    )
