"""Counting a cluster's GPUs from nodes and pods (pure, table-driven)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from gpuhub.core.catalog import GpuType
from gpuhub.spawner.kube_capacity import (
    TypeCapacity,
    cluster_capacity,
    node_offers,
    pod_requests,
    quantity,
    tolerates,
)
from gpuhub.store import GpuLease

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
A100 = GpuType(
    "a100",
    "A100",
    resource="nvidia.com/gpu",
    node_selector={"nvidia.com/gpu.product": "A100"},
    tolerations=(GPU_TOLERATION,),
    max_per_server=4,
)
T4_SHARED = GpuType(
    "t4-shared",
    "T4 shared",
    resource="nvidia.com/gpu.shared",
    sharing="shared",
    node_selector={"nvidia.com/gpu.product": "T4-SHARED"},
    tolerations=(GPU_TOLERATION,),
)
MIG_1G = GpuType("mig-1g", "MIG 1g", resource="nvidia.com/mig-1g.10gb", sharing="mig")
TYPES = (A100, T4_SHARED, MIG_1G)


def node(
    name: str,
    labels: dict[str, str] | None = None,
    allocatable: dict[str, Any] | None = None,
    taints: list[dict[str, str]] | None = None,
    ready: bool = True,
    unschedulable: bool = False,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"taints": taints or [], "unschedulable": unschedulable},
        "status": {
            "allocatable": {"cpu": "32", **(allocatable or {})},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pod(
    name: str,
    node_name: str | None,
    limits: dict[str, str],
    phase: str = "Running",
    holder: tuple[str, str] | None = None,
    requests: dict[str, str] | None = None,
) -> dict[str, Any]:
    annotations = {}
    if holder:
        annotations = {"gpuhub.io/user": holder[0], "gpuhub.io/server": holder[1]}
    resources: dict[str, Any] = {"limits": limits}
    if requests is not None:
        resources["requests"] = requests
    return {
        "metadata": {"name": name, "namespace": "jhub", "annotations": annotations},
        "spec": {"nodeName": node_name, "containers": [{"name": "c", "resources": resources}]},
        "status": {"phase": phase},
    }


def lease(user: str, server: str, gpu_type: str) -> GpuLease:
    return GpuLease(user, server, gpu_type, None, datetime.now(timezone.utc))


GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
NODES = [
    node("a1", {"nvidia.com/gpu.product": "A100"}, {"nvidia.com/gpu": "4"}, [GPU_TAINT]),
    node("a2", {"nvidia.com/gpu.product": "A100"}, {"nvidia.com/gpu": "2"}, [GPU_TAINT]),
    node("t1", {"nvidia.com/gpu.product": "T4-SHARED"}, {"nvidia.com/gpu.shared": "8"}),
    node("m1", {}, {"nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "0"}),
    node("cpu", {}, {}),
]


@pytest.mark.parametrize(
    "text, expected",
    [("4", 4), (4, 4), ("0", 0), ("2k", 2000), ("1Ki", 1024), ("junk", 0), (True, 0), ("-3", 0)],
)
def test_quantity(text: Any, expected: int) -> None:
    assert quantity(text) == expected


@pytest.mark.parametrize(
    "toleration, ok",
    [
        (GPU_TOLERATION, True),
        ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}, True),
        ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "other"}, False),
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}, False),
        ({"operator": "Exists"}, True),
        ({"key": "other", "operator": "Exists"}, False),
    ],
)
def test_tolerates(toleration: dict[str, str], ok: bool) -> None:
    assert tolerates([toleration], GPU_TAINT) is ok


@pytest.mark.parametrize(
    "the_node, gpu_type, expected",
    [
        (NODES[0], A100, 4),
        (NODES[2], T4_SHARED, 8),
        (NODES[2], A100, 0),  # wrong product label
        (NODES[3], MIG_1G, 7),
        (NODES[4], MIG_1G, 0),  # no such resource
        (
            node("n", {"nvidia.com/gpu.product": "A100"}, {"nvidia.com/gpu": "4"}, ready=False),
            A100,
            0,
        ),
        (
            node(
                "n", {"nvidia.com/gpu.product": "A100"}, {"nvidia.com/gpu": "4"}, unschedulable=True
            ),
            A100,
            0,
        ),
        # A taint the type does not tolerate keeps its pods off the node.
        (node("n", {}, {"nvidia.com/mig-1g.10gb": "7"}, [GPU_TAINT]), MIG_1G, 0),
    ],
)
def test_node_offers(the_node: dict[str, Any], gpu_type: GpuType, expected: int) -> None:
    assert node_offers(the_node, gpu_type) == expected


def test_admin_tolerations_count_too() -> None:
    tainted = node("n", {}, {"nvidia.com/mig-1g.10gb": "7"}, [GPU_TAINT])
    assert node_offers(tainted, MIG_1G, [GPU_TOLERATION]) == 7


def test_pod_requests_use_requests_then_limits_and_init_containers() -> None:
    p = pod("p", "a1", {"nvidia.com/gpu": "2"})
    assert pod_requests(p, "nvidia.com/gpu") == 2
    assert pod_requests(p, "nvidia.com/gpu.shared") == 0
    p = pod("p", "a1", {}, requests={"nvidia.com/gpu": "1"})
    assert pod_requests(p, "nvidia.com/gpu") == 1
    p["spec"]["initContainers"] = [{"name": "i", "resources": {"limits": {"nvidia.com/gpu": "3"}}}]
    assert pod_requests(p, "nvidia.com/gpu") == 3


def test_empty_cluster() -> None:
    counts = cluster_capacity(TYPES, NODES, [])
    assert {t: (c.total, c.used, c.unavailable) for t, c in counts.items()} == {
        "a100": (6, 0, 0),
        "t4-shared": (8, 0, 0),
        "mig-1g": (7, 0, 0),
    }
    assert counts["a100"] == TypeCapacity(6, 0, usable_nodes=2)
    assert counts["a100"].note("A100") == ""


def test_bound_pods_use_gpus_until_they_end() -> None:
    pods = [
        pod("p1", "a1", {"nvidia.com/gpu": "3"}),
        pod("p2", "a2", {"nvidia.com/gpu": "1"}, holder=("ada", "")),
        pod("p3", "a2", {"nvidia.com/gpu": "1"}, phase="Succeeded"),
        pod("p4", "a1", {"nvidia.com/gpu": "1"}, phase="Failed"),
        pod("p5", None, {"nvidia.com/gpu": "1"}, phase="Pending"),  # not bound: not counted
        pod("p6", "t1", {"nvidia.com/gpu.shared": "1"}),
        pod("p7", "m1", {"nvidia.com/mig-1g.10gb": "1"}),
        pod("p8", "cpu", {"cpu": "1"}),
    ]
    counts = cluster_capacity(TYPES, NODES, pods)
    assert (counts["a100"].total, counts["a100"].free) == (6, 2)
    assert counts["t4-shared"].free == 7
    assert counts["mig-1g"].free == 6


def test_leases_count_until_their_pod_is_bound() -> None:
    leases = [lease("ada", "", "a100"), lease("ada", "", "a100"), lease("bob", "x", "a100")]
    # ada's two GPUs are being spawned: no pod yet.
    assert cluster_capacity([A100], NODES, [], leases)["a100"].free == 3
    # ada's pod is bound: its requests count, her leases no longer add to them.
    pods = [pod("ada", "a1", {"nvidia.com/gpu": "2"}, holder=("ada", ""))]
    assert cluster_capacity([A100], NODES, pods, leases)["a100"].free == 3
    # bob's pod is bound too.
    pods.append(pod("bob", "a2", {"nvidia.com/gpu": "1"}, holder=("bob", "x")))
    assert cluster_capacity([A100], NODES, pods, leases)["a100"].free == 3


def test_used_never_exceeds_total() -> None:
    pods = [pod("p", "a2", {"nvidia.com/gpu": "5"})]
    leases = [lease("u", str(i), "a100") for i in range(9)]
    counts = cluster_capacity([A100], NODES, pods, leases)["a100"]
    assert counts.used == counts.total and counts.free == 0


CORDON_TAINT = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
NOT_READY_TAINT = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}


def test_cordoned_and_not_ready_nodes_hold_their_gpus_back_with_a_reason() -> None:
    t4 = node(
        "t1",
        {"nvidia.com/gpu.product": "T4-SHARED"},
        {"nvidia.com/gpu.shared": "8"},
        [CORDON_TAINT],
        unschedulable=True,
    )
    counts = cluster_capacity([T4_SHARED], [t4, NODES[4]], [])["t4-shared"]
    assert (counts.total, counts.free, counts.unavailable) == (0, 0, 8)
    assert counts.note("T4") == "the 1 node with T4 GPUs is cordoned"

    a100 = {"nvidia.com/gpu.product": "A100"}
    nodes = [
        NODES[0],
        node("a2", a100, {"nvidia.com/gpu": "2"}, [GPU_TAINT, NOT_READY_TAINT], ready=False),
        node("a3", a100, {"nvidia.com/gpu": "2"}, [GPU_TAINT], unschedulable=True),
    ]
    counts = cluster_capacity([A100], nodes, [])["a100"]
    assert (counts.total, counts.unavailable) == (4, 4)
    assert counts.note("A100") == (
        "2 of the 3 nodes with A100 GPUs are cordoned (1), not ready (1)"
    )
    gone = node("a2", a100, {"nvidia.com/gpu": "2"}, [GPU_TAINT])
    gone["status"]["conditions"] = [{"type": "Ready", "status": "Unknown"}]
    counts = cluster_capacity([A100], [gone], [])["a100"]
    assert counts.note("A100") == "the 1 node with A100 GPUs is unreachable"
    # A taint the type does not tolerate still means the type never runs there.
    assert (
        cluster_capacity([MIG_1G], [NODES[3] | {"spec": {"taints": [GPU_TAINT]}}], [])[
            "mig-1g"
        ].unavailable
        == 0
    )
