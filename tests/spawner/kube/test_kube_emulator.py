"""The emulated cluster does what a real API server, scheduler and attach/detach controller do
where gpuhub depends on it: claims bind after a moment, a ReadWriteOnce volume attaches to one
node at a time, a claim in use outlives its deletion, a pod naming no running scheduler waits."""

from __future__ import annotations

import time
from typing import Any

from k8s_emulator import KubeEmulator

from gpuhub.testing import wait_for

TOLERATE_GPU = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def claim(name: str, modes: tuple[str, ...] = ("ReadWriteOnce",)) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "lab"},
        "spec": {"accessModes": list(modes), "resources": {"requests": {"storage": "1Gi"}}},
    }


def pod(name: str, node: str, claim_name: str, scheduler: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [{"name": "c", "image": "busybox", "args": ["sleep", "60"]}],
        "nodeSelector": {"kubernetes.io/hostname": node},
        "tolerations": TOLERATE_GPU,
        "volumes": [{"name": "home", "persistentVolumeClaim": {"claimName": claim_name}}],
    }
    if scheduler:
        spec["schedulerName"] = scheduler
    return {"metadata": {"name": name, "namespace": "lab"}, "spec": spec}


def events(emulator: KubeEmulator, name: str) -> list[tuple[str, str]]:
    return [
        (e["reason"], e["message"])
        for e in emulator.list("events")
        if e["involvedObject"]["name"] == name and e["metadata"]["namespace"] == "lab"
    ]


def test_a_readwriteonce_volume_attaches_to_one_node_at_a_time(emulator: KubeEmulator) -> None:
    emulator.call(emulator.create, "persistentvolumeclaims", claim("shared"))
    emulator.call(emulator.create, "pods", pod("first", "a100-0", "shared"))
    emulator.call(emulator.schedule)
    wait_for(
        lambda: (emulator.pod("lab", "first") or {}).get("status", {}).get("phase") == "Running",
        10,
        what="the first pod",
    )
    assert any(
        "unbound immediate PersistentVolumeClaims" in m for _r, m in events(emulator, "first")
    )
    emulator.call(emulator.create, "pods", pod("second", "a100-1", "shared"))
    emulator.call(emulator.schedule)
    wait_for(
        lambda: any(r == "FailedAttachVolume" for r, _m in events(emulator, "second")),
        10,
        what="the Multi-Attach error",
    )
    [(_, message)] = [e for e in events(emulator, "second") if e[0] == "FailedAttachVolume"]
    assert message.startswith('Multi-Attach error for volume "pvc-')
    assert message.endswith("Volume is already used by pod(s) first")
    time.sleep(0.5)
    assert emulator.pod("lab", "second")["status"]["phase"] == "Pending"  # ContainerCreating

    # Deleting the claim in use only marks it (pvc-protection); it goes with its last pod.
    import requests

    requests.delete(
        f"{emulator.url}/api/v1/namespaces/lab/persistentvolumeclaims/shared", timeout=5
    )
    claims = {c["metadata"]["name"]: c for c in emulator.list("persistentvolumeclaims")}
    assert "deletionTimestamp" in claims["shared"]["metadata"]
    # The first pod goes: the volume attaches to the second node, which then runs its pod.
    emulator.call(emulator.terminate, emulator.pod("lab", "first"), 0)
    wait_for(
        lambda: (emulator.pod("lab", "second") or {}).get("status", {}).get("phase") == "Running",
        10,
        what="the second pod after the detach",
    )
    emulator.call(emulator.terminate, emulator.pod("lab", "second"), 0)
    wait_for(
        lambda: (
            "shared" not in {c["metadata"]["name"] for c in emulator.list("persistentvolumeclaims")}
        ),
        10,
        what="the claim to go with its last pod",
    )
    assert emulator.failures == []


def test_a_pod_for_a_scheduler_that_does_not_run_waits(emulator: KubeEmulator) -> None:
    emulator.call(emulator.create, "pods", pod("orphan", "cpu-0", "none", scheduler="nobody"))
    emulator.call(emulator.schedule)
    time.sleep(0.3)
    assert not emulator.pod("lab", "orphan")["spec"].get("nodeName")
    assert events(emulator, "orphan") == []
    emulator.call(emulator.terminate, emulator.pod("lab", "orphan"), 0)


def test_scheduler_messages_read_like_kube_schedulers(emulator: KubeEmulator) -> None:
    big = pod("big", "a100-0", "none")
    del big["spec"]["volumes"]
    big["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "8"}}
    emulator.call(emulator.create, "pods", big)
    emulator.call(emulator.schedule)
    wait_for(lambda: events(emulator, "big"), 5, what="the scheduler's verdict")
    [(reason, message)] = events(emulator, "big")
    assert reason == "FailedScheduling"
    assert message == (
        "0/5 nodes are available: 1 Insufficient nvidia.com/gpu, "
        "4 node(s) didn't match Pod's node affinity/selector. preemption: 0/5 nodes are "
        "available: 1 No preemption victims found for incoming pod, 4 Preemption is not "
        "helpful for scheduling.."
    )
    emulator.call(emulator.terminate, emulator.pod("lab", "big"), 0)
