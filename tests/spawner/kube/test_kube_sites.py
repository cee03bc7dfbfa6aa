"""GPUKubeSpawner as sites run it, with a real JupyterHub and the emulated cluster: pods packed by
Zero to JupyterHub's user-scheduler as configured in helm-values/, claims that take a moment to
bind, a cordoned node that queues spawns instead of refusing them, a queue message said once, a
cancelled queued spawn that says so, and a home claim per named server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from k8s_emulator import KubeEmulator
from k8s_emulator.hub import GPU_TAINT, KubeHub
from k8s_emulator.scheduling import ScoringStrategy
from k8s_envtest.backends import BACKENDS, start_cluster

from gpuhub import paths
from gpuhub.store import Store
from gpuhub.testing import wait_for

pytestmark = pytest.mark.slow

A100 = {"interface": "jupyterlab", "environment": "pytorch", "gpus": 1, "gpu_type": "a100"}
T4 = {"interface": "jupyterlab", "environment": "pytorch", "gpus": 1, "gpu_type": "t4-shared"}
CPU = {"interface": "jupyterlab", "environment": "pytorch", "gpus": 0}
USER_SCHEDULER = "jhub-user-scheduler"
A100_LABELS = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


def user_scheduler() -> ScoringStrategy:
    """The user-scheduler's scoring exactly as helm-values/gpuhub.yaml configures it."""
    return ScoringStrategy.from_plugin_config(user_scheduler_plugin_config())


def user_scheduler_plugin_config() -> list[dict[str, Any]]:
    values = yaml.safe_load((paths.config_dir().parent / "helm-values" / "gpuhub.yaml").read_text())
    return values["scheduling"]["userScheduler"]["pluginConfig"]


@pytest.fixture(scope="module", params=BACKENDS)
def emulator(request, tmp_path_factory, run_marker) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """Two empty 4-GPU A100 nodes, a time-sliced T4 node and a CPU node; the default scheduler
    and the user-scheduler of the Helm values (a real kube-scheduler where envtest has one)."""
    settings = {"bind_delay": 1.0} if request.param == "emulated" else {}
    em = start_cluster(
        request.param,
        tmp_path_factory.mktemp("cluster"),
        scheduler_profiles={USER_SCHEDULER: user_scheduler_plugin_config()},
        **settings,
    )
    for name in ("a100-0", "a100-1"):
        em.add_node(name, A100_LABELS, {"nvidia.com/gpu": 4}, [GPU_TAINT])
    em.add_node(
        "t4-0",
        {"nvidia.com/gpu.product": "Tesla-T4-SHARED"},
        {"nvidia.com/gpu.shared": 4},
        [GPU_TAINT],
    )
    em.add_node("cpu-0")
    yield em
    em.stop()


@pytest.fixture(scope="module")
def kube_hub(tmp_path_factory, run_marker, emulator) -> Iterator[KubeHub]:  # type: ignore[no-untyped-def]
    hub = KubeHub(
        tmp_path_factory.mktemp("kubehub"),
        run_marker,
        emulator=emulator,
        spawner_config={
            "scheduler_name": USER_SCHEDULER,
            "queue_poll_interval": 0.5,
            "capacity_publish_interval": 0.5,
        },
    ).start()
    yield hub
    hub.stop_all_servers()
    hub.stop()


def node_of(emulator: KubeEmulator, pod_name: str) -> str | None:
    pod = emulator.pod("jhub", pod_name)
    return pod["spec"].get("nodeName") if pod else None


def events_of(emulator: KubeEmulator, pod_name: str) -> list[dict[str, Any]]:
    return [e for e in emulator.list("events") if e["involvedObject"]["name"] == pod_name]


class Progress:
    """A spawn's progress stream, read in a thread until it ends."""

    def __init__(self, hub: KubeHub, name: str, server: str = "") -> None:
        self.events: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._read, args=(hub, name, server), daemon=True)
        self.thread.start()

    def _read(self, hub: KubeHub, name: str, server: str) -> None:
        path = f"/users/{name}/servers/{server}/progress"
        with hub.request("GET", path, stream=True, timeout=120) as r:
            for line in r.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    event = json.loads(line[5:])
                    self.events.append(event)
                    if event.get("ready") or event.get("failed"):
                        return

    def messages(self) -> list[str]:
        return [e.get("message", "") for e in self.events]

    def end(self, timeout: float = 60) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), self.events
        return self.events[-1]


def test_a_new_home_claim_binds_and_the_progress_shows_the_wait(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    """As on a real API server: the claim gets the default storage class and the pvc-protection
    finalizer, binds after a moment, and the scheduler's warning meanwhile reaches the page."""
    assert kube_hub.spawn("ada", CPU).status_code in (201, 202)
    events = kube_hub.progress("ada")
    assert events[-1].get("ready"), events
    messages = " ".join(e.get("message", "") for e in events)
    assert "pod has unbound immediate PersistentVolumeClaims" in messages
    claim = next(
        c for c in emulator.list("persistentvolumeclaims") if c["metadata"]["name"] == "claim-ada"
    )
    assert claim["spec"]["storageClassName"] == "standard"
    assert claim["metadata"]["finalizers"] == ["kubernetes.io/pvc-protection"]
    assert claim["status"]["phase"] == "Bound"
    pod = emulator.pod("jhub", "jupyter-ada")
    assert pod is not None and pod["spec"]["schedulerName"] == USER_SCHEDULER
    added = {t["key"] for t in pod["spec"]["tolerations"] if t.get("tolerationSeconds") == 300}
    assert added == {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}


def test_named_servers_get_a_home_claim_each_and_both_run(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    """ada's default server runs on the CPU node; her named server with a GPU runs on a GPU
    node with its own claim, so no volume has to attach to two nodes."""
    assert kube_hub.spawn("ada", T4, server="train").status_code in (201, 202)
    kube_hub.wait_ready("ada", "train", timeout=120)
    claims = sorted(c["metadata"]["name"] for c in emulator.list("persistentvolumeclaims"))
    assert claims == ["claim-ada", "claim-ada--train"]
    assert node_of(emulator, "jupyter-ada") == "cpu-0"
    assert node_of(emulator, "jupyter-ada--train") == "t4-0"
    assert not [
        e for e in events_of(emulator, "jupyter-ada--train") if e["reason"] == "FailedAttachVolume"
    ]
    kube_hub.stop_server("ada", "train")
    kube_hub.stop_server("ada")


def test_four_one_gpu_spawns_pack_onto_one_node(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    """The user-scheduler of the Helm values fills one GPU node before it touches the next, so
    the cluster autoscaler can remove the other one."""
    users = ["p1", "p2", "p3", "p4"]
    for name in users:
        assert kube_hub.spawn(name, A100).status_code in (201, 202)
        kube_hub.wait_ready(name, timeout=120)
    nodes = {node_of(emulator, f"jupyter-{name}") for name in users}
    assert nodes == {"a100-0"}, nodes
    for name in users:
        kube_hub.stop_server(name)


def test_the_default_scheduler_would_spread_them() -> None:
    """The control: kube-scheduler's default profile (LeastAllocated on CPU and memory) puts
    the same four pods two and two, leaving no node empty."""
    from k8s_emulator.scheduling import score

    allocatable = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "4"}
    # What the Helm values guarantee each server (kube-scheduler picks at random among nodes
    # that score the same; with requests this size the scores differ).
    resources = {"requests": {"cpu": "1", "memory": "4G"}, "limits": {"nvidia.com/gpu": "1"}}
    pod = {"spec": {"containers": [{"resources": resources}]}}
    placed: dict[str, list[dict[str, Any]]] = {"a100-0": [], "a100-1": []}
    for strategy, expected in ((ScoringStrategy(), [2, 2]), (user_scheduler(), [4, 0])):
        placed = {"a100-0": [], "a100-1": []}
        for _ in range(4):
            scores = {n: score(strategy, allocatable, pods, pod) for n, pods in placed.items()}
            best = max(scores.values())
            placed[next(n for n, s in scores.items() if s == best)].append(pod)
        assert [len(p) for p in placed.values()] == expected


def test_a_cordoned_node_queues_the_spawn_and_says_why(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    emulator.cordon("t4-0")
    try:
        r = kube_hub.spawn("cy", T4)
        assert r.status_code == 202, r.text
        progress = Progress(kube_hub, "cy")
        wait_for(lambda: any("in line" in m for m in progress.messages()), 30, what="queued")
        [message] = [m for m in progress.messages() if "in line of" in m]
        assert message.endswith(
            "The 1 node with NVIDIA T4 (time-sliced share) GPUs is cordoned."
        ), message
        assert "jupyter-cy" not in {p["metadata"]["name"] for p in emulator.list("pods")}
        # The hub publishes it for the gpuhub service and its pages too.
        store = Store.at(f"sqlite:///{kube_hub.state_dir / 'gpuhub.sqlite'}")
        wait_for(lambda: store.measured_capacity()["t4-shared"].unavailable == 4, 10, what="counts")
        assert "cordoned" in store.measured_capacity()["t4-shared"].note
    finally:
        emulator.cordon("t4-0", False)
    assert progress.end(120).get("ready"), progress.events
    kube_hub.stop_server("cy")


def test_a_type_no_node_ever_offered_is_refused(kube_hub) -> None:  # type: ignore[no-untyped-def]
    options = {**A100, "gpu_type": "a100-mig-1g"}
    r = kube_hub.spawn("dee", options)
    assert r.status_code == 400, r.text
    assert "the pool has 0 of type 'a100-mig-1g'" in r.json()["message"]


def test_the_queue_message_is_said_once_and_a_cancel_says_cancelled(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    """hal holds a T4 share, so each look at the queue computes a new estimated wait; the page
    hears the message once all the same. Stopping the queued spawn ends its stream as
    cancelled, not as "Server ready"."""
    assert kube_hub.spawn("hal", T4).status_code in (201, 202)
    kube_hub.wait_ready("hal", timeout=120)
    emulator.cordon("t4-0")
    try:
        assert kube_hub.spawn("eve", T4).status_code == 202
        progress = Progress(kube_hub, "eve")
        wait_for(lambda: any("in line" in m for m in progress.messages()), 30, what="queued")
        time.sleep(4)  # eight looks at the queue
        kube_hub.stop_server("eve")
        last = progress.end()
    finally:
        emulator.cordon("t4-0", False)
    assert len([m for m in progress.messages() if "in line of" in m]) == 1, progress.messages()
    assert last.get("failed") and not last.get("ready"), progress.events
    assert "cancelled" in last["message"].lower(), last
    assert not any("Server ready" in m for m in progress.messages())
    assert "" not in kube_hub.user("eve")["servers"]
    kube_hub.stop_server("hal")
    assert emulator.failures == []
