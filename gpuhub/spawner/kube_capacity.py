"""How many GPUs of each type a cluster has, and how many are free: pure counting.

Input is what the API server says (nodes and pods as plain JSON dicts, as the watchers keep them)
and gpuhub's own leases (servers being started whose pod may not be bound to a node yet). Nothing
here talks to Kubernetes.

A node offers a GPU type when its labels match the type's node selector, it is Ready and
schedulable, the type tolerates its taints, and it has some of the type's resource allocatable.
A node that would offer the type but is cordoned or not ready holds its GPUs back for now: they
are counted apart (`unavailable`), with a note that says why, so a spawn waits instead of being
refused.
A pod uses what its containers request (limits where requests are not given, as Kubernetes does
for extended resources) on the node it is bound to, until it has Succeeded or Failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..core.catalog import GpuType
from ..store import GpuLease

USER_ANNOTATION = "gpuhub.io/user"
SERVER_ANNOTATION = "gpuhub.io/server"
_BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")


def quantity(value: Any) -> int:
    """A Kubernetes quantity of whole devices ("4", 4, "2k"); anything unreadable counts 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    text = str(value).strip()
    suffixes = {"k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in sorted(suffixes.items(), key=lambda s: -len(s[0])):
        if text.endswith(suffix) and text[: -len(suffix)].isdigit():
            return int(text[: -len(suffix)]) * factor
    try:
        return max(int(float(text)), 0)
    except ValueError:
        return 0


def tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """Whether one of `tolerations` tolerates `taint` (Kubernetes' matching rules)."""
    for t in tolerations:
        effect = t.get("effect")
        if effect and effect != taint.get("effect"):
            continue
        key = t.get("key")
        operator = t.get("operator", "Equal")
        if not key:
            if operator == "Exists":
                return True
            continue
        if key != taint.get("key"):
            continue
        if operator == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


#: Taints the node controller puts on cordoned and not ready nodes: they say the node is
#: unavailable for now (see `node_unavailable`), not that the type never runs there.
CONDITION_TAINTS = frozenset(
    {
        "node.kubernetes.io/unschedulable",
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    }
)


def node_unavailable(node: Mapping[str, Any]) -> str | None:
    """Why `node` takes no new pods now ("cordoned", "not ready", "unreachable"), or None."""
    spec = node.get("spec") or {}
    if spec.get("unschedulable"):
        return "cordoned"
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    if ready is None or ready.get("status") == "True":
        return None
    return "unreachable" if ready.get("status") == "Unknown" else "not ready"


def node_is_usable(node: Mapping[str, Any]) -> bool:
    return node_unavailable(node) is None


def node_has(
    node: Mapping[str, Any], gpu_type: GpuType, tolerations: Iterable[Mapping[str, Any]] = ()
) -> int:
    """How many of `gpu_type`'s resource `node` has for gpuhub's pods, usable now or not."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    if any(labels.get(k) != v for k, v in gpu_type.node_selector.items()):
        return 0
    all_tolerations = [*gpu_type.tolerations, *tolerations]
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("key") in CONDITION_TAINTS:
            continue
        if taint.get("effect") in _BLOCKING_EFFECTS and not tolerates(all_tolerations, taint):
            return 0
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    return quantity(allocatable.get(gpu_type.resource, 0))


def node_offers(
    node: Mapping[str, Any], gpu_type: GpuType, tolerations: Iterable[Mapping[str, Any]] = ()
) -> int:
    """How many of `gpu_type`'s resource `node` offers to gpuhub's pods (0: none or unusable)."""
    if not node_is_usable(node):
        return 0
    return node_has(node, gpu_type, tolerations)


def pod_requests(pod: Mapping[str, Any], resource: str) -> int:
    """What `pod` holds of `resource`: its containers' requests (or limits), at least its
    largest init container's."""
    spec = pod.get("spec") or {}

    def wanted(container: Mapping[str, Any]) -> int:
        resources = container.get("resources") or {}
        requests = resources.get("requests") or {}
        limits = resources.get("limits") or {}
        return quantity(requests.get(resource, limits.get(resource, 0)))

    running = sum(wanted(c) for c in spec.get("containers") or [])
    init = max((wanted(c) for c in spec.get("initContainers") or []), default=0)
    return max(running, init)


def pod_holds_resources(pod: Mapping[str, Any]) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed")


def pod_holder(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """The (user, server) of a gpuhub pod, from its annotations; None for other pods."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if USER_ANNOTATION not in annotations:
        return None
    return (annotations[USER_ANNOTATION], annotations.get(SERVER_ANNOTATION, ""))


@dataclass(frozen=True)
class TypeCapacity:
    total: int
    used: int
    #: GPUs on nodes that have the type but take no pods now
    unavailable: int = 0
    #: (node, why) of those nodes, and how many nodes offer the type now
    held_back: tuple[tuple[str, str], ...] = ()
    usable_nodes: int = 0

    @property
    def free(self) -> int:
        return max(self.total - self.used, 0)

    def note(self, display_name: str) -> str:
        """Why some GPUs of the type cannot be used now ("" when all can)."""
        return unavailable_note(display_name, self.held_back, self.usable_nodes)


def unavailable_note(
    display_name: str, held_back: Iterable[tuple[str, str]], usable_nodes: int
) -> str:
    """ "the 1 node with T4 GPUs is cordoned", "2 of the 3 nodes with A100 GPUs are not ready"."""
    held_back = list(held_back)
    if not held_back:
        return ""
    by_reason: dict[str, int] = {}
    for _node, why in held_back:
        by_reason[why] = by_reason.get(why, 0) + 1
    n = len(held_back)
    nodes = n + usable_nodes
    if len(by_reason) == 1:
        why = next(iter(by_reason))
    else:
        why = ", ".join(f"{k} ({v})" for k, v in sorted(by_reason.items()))
    verb = "is" if n == 1 else "are"
    if n == nodes:
        noun = "node" if n == 1 else "nodes"
        lead = f"the {n} {noun}" if n == 1 else f"all {n} {noun}"
        return f"{lead} with {display_name} GPUs {verb} {why}"
    return f"{n} of the {nodes} nodes with {display_name} GPUs {verb} {why}"


def cluster_capacity(
    gpu_types: Iterable[GpuType],
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    leases: Iterable[GpuLease] = (),
    tolerations: Iterable[Mapping[str, Any]] = (),
) -> dict[str, TypeCapacity]:
    """Total and used GPUs of each type.

    A lease whose server has no pod bound to one of the type's nodes yet counts as used: the
    spawn that holds it is creating its pod, and the GPU must not be promised twice.
    """
    nodes = list(nodes)
    live_pods = [p for p in pods if pod_holds_resources(p)]
    leases = list(leases)
    tolerations = list(tolerations)
    out: dict[str, TypeCapacity] = {}
    for gpu_type in gpu_types:
        offered = {}
        held_back: list[tuple[str, str]] = []
        unavailable = 0
        for node in nodes:
            count = node_has(node, gpu_type, tolerations)
            if not count:
                continue
            name = (node.get("metadata") or {}).get("name")
            why = node_unavailable(node)
            if why is None:
                offered[name] = count
            else:
                held_back.append((str(name), why))
                unavailable += count
        used_on: dict[str, int] = {}
        bound_holders: set[tuple[str, str]] = set()
        for pod in live_pods:
            node_name = (pod.get("spec") or {}).get("nodeName")
            if node_name not in offered:
                continue
            held = pod_requests(pod, gpu_type.resource)
            if not held:
                continue
            used_on[node_name] = used_on.get(node_name, 0) + held
            holder = pod_holder(pod)
            if holder is not None:
                bound_holders.add(holder)
        in_flight = sum(
            1
            for lease in leases
            if lease.gpu_type == gpu_type.id and lease.holder not in bound_holders
        )
        total = sum(offered.values())
        used = sum(min(used_on.get(name, 0), count) for name, count in offered.items())
        out[gpu_type.id] = TypeCapacity(
            total=total,
            used=min(used + in_flight, total),
            unavailable=unavailable,
            held_back=tuple(sorted(held_back)),
            usable_nodes=len(offered),
        )
    return out
