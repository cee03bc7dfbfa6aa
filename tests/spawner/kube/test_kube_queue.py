"""The fair GPU wait queue on Kubernetes, with a real JupyterHub and the emulated cluster:
more users than GPUs, first come first served, cancel, and a hub restart while queued."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from k8s_emulator import KubeEmulator
from k8s_emulator.hub import GPU_TAINT, KubeHub
from k8s_envtest.backends import BACKENDS, start_cluster

from gpuhub.store import Store
from gpuhub.testing import wait_for

pytestmark = pytest.mark.slow

A100 = {"interface": "jupyterlab", "environment": "pytorch", "gpus": 1, "gpu_type": "a100"}


@pytest.fixture(scope="module", params=BACKENDS)
def emulator(request, tmp_path_factory, run_marker) -> Iterator[KubeEmulator]:  # type: ignore[no-untyped-def]
    """A cluster with two A100 GPUs and a CPU node (emulated, or a real control plane)."""
    em = start_cluster(request.param, tmp_path_factory.mktemp("cluster"))
    em.add_node(
        "a100-0",
        {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        {"nvidia.com/gpu": 2},
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
        spawner_config={"queue_poll_interval": 0.5, "queue_stale_after": 3},
    ).start()
    yield hub
    hub.stop_all_servers()
    hub.stop()


def queue(hub: KubeHub) -> list[str]:
    store = Store.at(f"sqlite:///{hub.state_dir / 'gpuhub.sqlite'}")
    return [e.user for e in store.queue()]


def pods(emulator: KubeEmulator) -> set[str]:
    return {p["metadata"]["name"] for p in emulator.list("pods")}


def queue_message(hub: KubeHub, name: str, timeout: float = 30) -> str:
    """The first queue message on `name`'s spawn progress."""
    with hub.request("GET", f"/users/{name}/server/progress", stream=True, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                message = json.loads(line[5:]).get("message", "")
                if "in line" in message:
                    return message
    raise AssertionError(f"no queue message for {name}")


def pending(hub: KubeHub, name: str) -> bool:
    return (hub.user(name)["servers"].get("") or {}).get("pending") == "spawn"


def test_three_users_for_two_gpus(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    for name in ("ada", "bo"):
        assert kube_hub.spawn(name, A100).status_code in (201, 202)
        kube_hub.wait_ready(name)
    assert kube_hub.spawn("cy", A100).status_code == 202
    wait_for(lambda: queue(kube_hub) == ["cy"], 20, what="cy in the queue")
    message = queue_message(kube_hub, "cy")
    assert message.startswith(
        "Waiting for a free NVIDIA A100 80GB (whole GPU) GPU: 1st in line of 1"
    )
    assert "Stop the server to leave the queue" in message
    # Waiting in gpuhub's queue, not as a Pending pod in the scheduler's.
    assert "jupyter-cy" not in pods(emulator)
    assert pending(kube_hub, "cy")


def test_first_come_first_served_and_cancel(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    assert kube_hub.spawn("dan", A100).status_code == 202
    wait_for(lambda: queue(kube_hub) == ["cy", "dan"], 20, what="dan behind cy")
    assert "2nd in line of 2" in queue_message(kube_hub, "dan")
    # dan gives up: stopping the pending spawn leaves the queue.
    kube_hub.stop_server("dan")
    wait_for(lambda: queue(kube_hub) == ["cy"], 20, what="dan out of the queue")
    assert "" not in kube_hub.user("dan")["servers"]
    assert kube_hub.spawn("eve", A100).status_code == 202
    wait_for(lambda: queue(kube_hub) == ["cy", "eve"], 20, what="eve behind cy")


def test_the_freed_gpu_goes_to_the_head(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    kube_hub.stop_server("ada")
    model = kube_hub.wait_ready("cy", timeout=60)
    assert model["ready"]
    pod = emulator.pod("jhub", "jupyter-cy")
    assert pod is not None and pod["spec"]["nodeName"] == "a100-0"
    assert queue(kube_hub) == ["eve"]
    assert pending(kube_hub, "eve")
    assert "1st in line of 1" in queue_message(kube_hub, "eve")


def test_hub_restart_while_queued_keeps_the_place(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    kube_hub.stop()
    assert queue(kube_hub) == ["eve"], "the queue survives the hub"
    kube_hub.start()
    # bo's and cy's servers survived the restart; eve's spawn did not.
    assert kube_hub.user("bo")["servers"][""]["ready"]
    assert "" not in kube_hub.user("eve")["servers"]
    # fay asks after the restart, eve comes back for the same GPU: eve keeps her place.
    assert kube_hub.spawn("fay", A100).status_code == 202
    wait_for(lambda: "fay" in queue(kube_hub), 20, what="fay in the queue")
    assert kube_hub.spawn("eve", A100).status_code == 202
    assert "1st in line of 2" in queue_message(kube_hub, "eve")
    assert "2nd in line of 2" in queue_message(kube_hub, "fay")
    kube_hub.stop_server("bo")
    kube_hub.wait_ready("eve", timeout=60)
    assert pending(kube_hub, "fay") and queue(kube_hub) == ["fay"]
    for name in ("cy", "eve", "fay"):
        kube_hub.stop_server(name)
    assert queue(kube_hub) == []
    assert emulator.failures == []


def gpu_limit(emulator: KubeEmulator, name: str) -> str | None:
    pod = emulator.pod("jhub", f"jupyter-{name}")
    assert pod is not None
    return (
        (pod["spec"]["containers"][0].get("resources") or {})
        .get("limits", {})
        .get("nvidia.com/gpu")
    )


def test_start_on_cpu_keeps_the_place_and_the_switch_takes_the_gpu(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    """`when_no_gpu: start-on-cpu` on Kubernetes: a pod without a GPU at once, the place kept
    across a hub restart, and the switch (what the gpuhub service does at the turn: stop, start
    with the waiting options) takes the GPU and ends the request."""
    store = Store.at(f"sqlite:///{kube_hub.state_dir / 'gpuhub.sqlite'}")
    for name in ("gil", "hal"):
        assert kube_hub.spawn(name, A100).status_code in (201, 202)
        kube_hub.wait_ready(name)
    wanted = {**A100, "when_no_gpu": "start-on-cpu"}
    assert kube_hub.spawn("ivy", wanted).status_code in (201, 202)
    model = kube_hub.wait_ready("ivy", timeout=60)
    assert model["user_options"]["gpus"] == 0 and gpu_limit(emulator, "ivy") is None
    [entry] = store.queue()
    assert (entry.user, entry.on_cpu, entry.user_options["gpus"]) == ("ivy", True, 1)

    kube_hub.stop()
    kube_hub.start()
    assert kube_hub.user("ivy")["servers"][""]["ready"]
    [entry] = store.queue()
    assert entry.user == "ivy" and entry.on_cpu, "the place survives the hub"

    # the turn: a GPU frees up, the service marks the switch and restarts the server
    kube_hub.stop_server("gil")
    store.update_queue_entry("ivy", "", on_cpu=False)
    kube_hub.stop_server("ivy")
    assert [e.user for e in store.queue()] == ["ivy"], "the switch's stop keeps the request"
    assert kube_hub.spawn("ivy", dict(entry.user_options)).status_code in (201, 202)
    model = kube_hub.wait_ready("ivy", timeout=60)
    assert model["user_options"]["gpus"] == 1 and gpu_limit(emulator, "ivy") == "1"
    assert store.queue() == []

    # stopping a server that runs on CPU ends its request (nobody waits for nothing)
    assert kube_hub.spawn("jo", wanted).status_code in (201, 202)
    kube_hub.wait_ready("jo", timeout=60)
    assert [e.user for e in store.queue()] == ["jo"]
    kube_hub.stop_server("jo")
    assert store.queue() == []
    for name in ("hal", "ivy"):
        kube_hub.stop_server(name)
    assert emulator.failures == []
