"""A real JupyterHub with GPUKubeSpawner against the emulated cluster and, where its binaries
are, a real control plane with the documented RBAC: spawn, progress, stop, restart, and a home
that survives them; the single-user servers are real processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from k8s_envtest.backends import BACKENDS, add_standard_nodes, start_cluster

from gpuhub.store import Store
from gpuhub.testing import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=BACKENDS)
def emulator(request, tmp_path_factory, run_marker) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    cluster = start_cluster(request.param, tmp_path_factory.mktemp("cluster"))
    add_standard_nodes(cluster)
    yield cluster
    cluster.stop()


def user_pod(emulator, name: str) -> dict | None:  # type: ignore[no-untyped-def]
    pods = [
        p
        for p in emulator.list("pods")
        if p["metadata"]["annotations"].get("gpuhub.io/user") == name
        and "deletionTimestamp" not in p["metadata"]
    ]
    return pods[0] if pods else None


def store(kube_hub) -> Store:  # type: ignore[no-untyped-def]
    return Store.at(f"sqlite:///{kube_hub.state_dir / 'gpuhub.sqlite'}")


def test_spawn_with_a_gpu_shows_progress_and_reaches_the_server(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    options = {"interface": "jupyterlab", "environment": "pytorch", "gpus": 1, "gpu_type": "a100"}
    r = kube_hub.spawn("ada", options)
    assert r.status_code in (201, 202), r.text
    events = kube_hub.progress("ada")
    assert events[-1].get("ready"), events
    messages = " ".join(e.get("message", "") for e in events)
    assert "Successfully assigned jhub/jupyter-ada to a100-0" in messages
    assert "Started container notebook" in messages

    pod = user_pod(emulator, "ada")
    assert pod is not None
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": "1"}
    assert pod["metadata"]["labels"]["gpuhub.io/gpu-type"] == "a100"
    assert [lease.gpu_type for lease in store(kube_hub).leases("ada")] == ["a100"]

    # The hub really reaches the server: write a file into the home volume.
    r = kube_hub.server_request(
        "PUT",
        "ada",
        "api/contents/notes.txt",
        json={"type": "file", "format": "text", "content": "kept"},
    )
    assert r.status_code in (200, 201), r.text
    claim = emulator.claim_dir("jhub", "claim-ada")
    assert (claim / "notes.txt").read_text() == "kept"


def test_stop_keeps_the_home_and_frees_the_gpu(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    kube_hub.stop_server("ada")
    wait_for(
        lambda: (
            user_pod(emulator, "ada") is None
            and not any(p["metadata"]["name"] == "jupyter-ada" for p in emulator.list("pods"))
        ),
        30,
        what="ada's pod to go",
    )
    claims = [c["metadata"]["name"] for c in emulator.list("persistentvolumeclaims")]
    assert claims == ["claim-ada"]
    assert store(kube_hub).leases("ada") == []


def test_restart_without_gpu_finds_the_files(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    r = kube_hub.spawn("ada", {"interface": "vscode", "environment": "tensorflow", "gpus": 0})
    assert r.status_code in (201, 202), r.text
    kube_hub.wait_ready("ada", timeout=120)
    pod = user_pod(emulator, "ada")
    assert pod is not None
    assert pod["spec"]["nodeName"] == "cpu-0"  # no GPU toleration: GPU nodes are out
    assert "nvidia.com/gpu" not in (pod["spec"]["containers"][0].get("resources") or {}).get(
        "limits", {}
    )
    r = kube_hub.server_request("GET", "ada", "api/contents/notes.txt")
    assert r.status_code == 200 and r.json()["content"] == "kept"
    assert kube_hub.user("ada")["servers"][""]["url"] == "/user/ada/"
    kube_hub.stop_server("ada")


def test_a_forged_option_never_reaches_the_api_server(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    before = len(emulator.requests)
    r = kube_hub.spawn(
        "eve", {"environment": "pytorch", "gpus": 1, "gpu_type": "a100", "image": "evil"}
    )
    assert r.status_code == 400
    assert "image" in r.json()["message"]
    writes = [req for req in emulator.requests[before:] if req[0] in ("POST", "DELETE")]
    assert writes == []


def test_filled_in_options_survive_a_hub_restart(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    """A request without a GPU type gets the default one; after a hub restart the REST model
    (what the gpuhub service reads) still says which, as do the spawner state and the pod."""
    r = kube_hub.spawn("gus", {"gpus": 1})
    assert r.status_code in (201, 202), r.text
    kube_hub.wait_ready("gus", timeout=120)
    expected = {
        "interface": "jupyterlab",
        "environment": "pytorch",
        "gpus": 1,
        "gpu_type": "t4-shared",
    }
    assert kube_hub.user("gus")["servers"][""]["user_options"] == expected
    kube_hub.stop()
    kube_hub.start()
    model = kube_hub.user("gus")["servers"][""]
    assert model["ready"]
    assert model["user_options"] == expected
    assert model["state"]["selection"] == expected
    pod = user_pod(emulator, "gus")
    assert pod is not None
    assert pod["metadata"]["labels"]["gpuhub.io/gpu-type"] == "t4-shared"
    kube_hub.stop_server("gus")
