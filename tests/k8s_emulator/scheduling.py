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


def tolerated(pod: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    for t in pod["spec"].get("tolerations") or []:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if not t.get("key"):
            if t.get("operator") == "Exists":
                return True
            continue
        if t["key"] != taint.get("key"):
            continue
        if t.get("operator") == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def extended_requests(pod: Mapping[str, Any]) -> dict[str, float]:
    """The extended resources (GPUs) `pod` requests."""
    return {k: v for k, v in pod_requests(pod).items() if k not in NATIVE}


def fits(
    pod: Mapping[str, Any], node: Mapping[str, Any], node_pods: Iterable[Mapping[str, Any]]
) -> str | None:
    """None if `pod` fits on `node` (which runs `node_pods`), else kube-scheduler's reason."""
    if (node.get("spec") or {}).get("unschedulable"):
        return "node(s) were unschedulable"
    labels = node["metadata"].get("labels") or {}
    if any(labels.get(k) != v for k, v in (pod["spec"].get("nodeSelector") or {}).items()):
        return "node(s) didn't match Pod's node affinity/selector"
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerated(pod, taint):
            return f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    used: dict[str, float] = {}
    for other in node_pods:
        for name, n in extended_requests(other).items():
            used[name] = used.get(name, 0) + n
    for name, n in extended_requests(pod).items():
        if parse_quantity(allocatable.get(name, 0)) - used.get(name, 0) < n:
            return f"Insufficient {name}"
    return None


def place(
    pod: Mapping[str, Any],
    nodes: Iterable[Mapping[str, Any]],
    pods_on: Mapping[str, Sequence[Mapping[str, Any]]],
    strategy: ScoringStrategy,
    missing_claims: Sequence[str] = (),
    unbound_claims: Sequence[str] = (),
) -> tuple[str | None, str]:
    """(node, "") for the node kube-scheduler binds `pod` to, or (None, its FailedScheduling
    message). `pods_on`: the pods each node runs."""
    nodes = sorted(nodes, key=lambda n: n["metadata"]["name"])
    n_nodes = len(nodes)
    not_helpful = (
        f" preemption: 0/{n_nodes} nodes are available: {n_nodes} Preemption is "
        "not helpful for scheduling.."
    )
    if missing_claims:
        return None, (
            f'0/{n_nodes} nodes are available: persistentvolumeclaim "{missing_claims[0]}" '
            f"not found.{not_helpful}"
        )
    if unbound_claims:
        return None, (
            f"0/{n_nodes} nodes are available: pod has unbound immediate "
            f"PersistentVolumeClaims.{not_helpful}"
        )
    reasons = {
        n["metadata"]["name"]: fits(pod, n, pods_on.get(n["metadata"]["name"], ())) for n in nodes
    }
    fitting = [n for n in nodes if reasons[n["metadata"]["name"]] is None]
    if fitting:
        # The best NodeResourcesFit score; ties go to the first node by name.
        scores = {
            n["metadata"]["name"]: score(
                strategy,
                (n.get("status") or {}).get("allocatable") or {},
                pods_on.get(n["metadata"]["name"], ()),
                pod,
            )
            for n in fitting
        }
        best = max(scores.values())
        return next(name for name, value in scores.items() if value == best), ""
    counts: dict[str, int] = {}
    for why in reasons.values():
        counts[str(why)] = counts.get(str(why), 0) + 1
    detail = ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))
    short = sum(n for why, n in counts.items() if why.startswith("Insufficient"))
    preemption = [
        *([f"{short} No preemption victims found for incoming pod"] if short else []),
        *(
            [f"{n_nodes - short} Preemption is not helpful for scheduling"]
            if n_nodes - short
            else []
        ),
    ]
    return None, (
        f"0/{n_nodes} nodes are available: {detail}. preemption: "
        f"0/{n_nodes} nodes are available: {', '.join(preemption)}.."
    )
