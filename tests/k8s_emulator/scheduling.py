"""The emulated scheduler's scoring: kube-scheduler's `NodeResourcesFit` plugin.

Of the nodes a pod fits on, kube-scheduler binds it to the one with the best score. Only the
`NodeResourcesFit` score is emulated, with its two strategies as kube-scheduler 1.28 computes
them (pkg/scheduler/framework/plugins/noderesources): for each scored resource the node has,
`LeastAllocated` scores `(allocatable - requested) * 100 / allocatable` and `MostAllocated`
`requested * 100 / allocatable`, where `requested` is what the node's pods request plus the
pod's own request; the node's score is the weighted mean. A container without a CPU or memory
request counts as 100m CPU and 200 MiB (the scheduler's non-zero defaults). An extended resource
(a GPU) the pod does not request is not scored. The default profile scores CPU and memory with
`LeastAllocated` (spreading pods); Zero to JupyterHub's user-scheduler uses `MostAllocated`
(packing them), with the resources its `pluginConfig` names.

kube-scheduler picks at random among equally scored nodes; the emulator takes the first by name,
so the tests are repeatable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_MILLI_CPU = 100
DEFAULT_MEMORY = 200 * 1024 * 1024
MAX_NODE_SCORE = 100
NATIVE = {"cpu", "memory", "ephemeral-storage", "pods"}

_SUFFIXES = {
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_quantity(value: Any) -> float:
    """A Kubernetes quantity ("100m", "4G", "64Gi", 2) as a number; unreadable: 0."""
    text = str(value).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            try:
                return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
            except ValueError:
                return 0.0
    try:
        return float(text)
    except ValueError:
        return 0.0


def container_requests(container: Mapping[str, Any]) -> dict[str, float]:
    """Requests, with limits standing in where no request is given (as the API server
    defaults them)."""
    resources = container.get("resources") or {}
    merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return {name: parse_quantity(v) for name, v in merged.items()}


def pod_requests(pod: Mapping[str, Any], non_zero: bool = False) -> dict[str, float]:
    """What `pod` requests (CPU in cores, memory in bytes, extended resources in units).
    `non_zero`: CPU and memory of containers without a request count as the defaults."""
    out: dict[str, float] = {}
    for container in (pod.get("spec") or {}).get("containers") or []:
        wanted = container_requests(container)
        if non_zero:
            wanted.setdefault("cpu", DEFAULT_MILLI_CPU / 1000)
            wanted.setdefault("memory", DEFAULT_MEMORY)
        for name, n in wanted.items():
            out[name] = out.get(name, 0) + n
    return out


@dataclass(frozen=True)
class ScoringStrategy:
    """`NodeResourcesFit`'s `scoringStrategy`: its type and the resources it scores."""

    type: str = "LeastAllocated"
    resources: tuple[tuple[str, int], ...] = (("cpu", 1), ("memory", 1))

    @classmethod
    def from_plugin_config(cls, plugin_config: Sequence[Mapping[str, Any]]) -> ScoringStrategy:
        """From a scheduler profile's `pluginConfig` (as in Zero to JupyterHub's values)."""
        for plugin in plugin_config:
            if plugin.get("name") == "NodeResourcesFit":
                strategy = (plugin.get("args") or {}).get("scoringStrategy") or {}
                resources = tuple(
                    (r["name"], int(r.get("weight", 1))) for r in strategy.get("resources") or ()
                )
                return cls(strategy.get("type", "LeastAllocated"), resources or cls.resources)
        return cls()


def score(
    strategy: ScoringStrategy,
    allocatable: Mapping[str, Any],
    node_pods: Iterable[Mapping[str, Any]],
    pod: Mapping[str, Any],
) -> int:
    """The `NodeResourcesFit` score (0-100) of binding `pod` to a node with `allocatable`
    that already runs `node_pods`."""
    requested: dict[str, float] = {}
    for other in node_pods:
        for name, n in pod_requests(other, non_zero=True).items():
            requested[name] = requested.get(name, 0) + n
    own = pod_requests(pod, non_zero=True)
    total = weights = 0
    for name, weight in strategy.resources:
        if name not in NATIVE and not own.get(name):
            continue  # an extended resource the pod does not ask for is not scored
        capacity = parse_quantity(allocatable.get(name, 0))
        if capacity <= 0:
            continue
        used = min(requested.get(name, 0) + own.get(name, 0), capacity)
        if strategy.type == "MostAllocated":
            resource_score = used * MAX_NODE_SCORE // capacity
        else:
            resource_score = (capacity - used) * MAX_NODE_SCORE // capacity
        total += int(resource_score) * weight
        weights += weight
    return total // weights if weights else 0
