"""GPUKubeSpawner records where each server's pod runs (for the GPU activity read from the
cluster's metrics), against a real JupyterHub and the emulated cluster."""

from __future__ import annotations

import pytest

from gpuhub.store import Store

pytestmark = pytest.mark.slow


def test_the_pod_of_a_running_server_is_recorded_until_it_stops(kube_hub, emulator) -> None:  # type: ignore[no-untyped-def]
    store = Store.at(f"sqlite:///{kube_hub.state_dir / 'gpuhub.sqlite'}")
    options = {"interface": "jupyterlab", "environment": "pytorch", "gpus": 1, "gpu_type": "a100"}
    r = kube_hub.spawn("ada", options)
    assert r.status_code in (201, 202), r.text
    kube_hub.wait_ready("ada", timeout=120)

    pod = store.server_pod("ada", "")
    assert pod is not None
    assert (pod.namespace, pod.pod) == ("jhub", "jupyter-ada")
    in_cluster = [p for p in emulator.list("pods") if p["metadata"]["name"] == "jupyter-ada"]
    assert [p["metadata"]["namespace"] for p in in_cluster] == ["jhub"]
    assert pod.node == in_cluster[0]["spec"]["nodeName"]
    assert pod.node is not None and pod.node.startswith("a100-")

    kube_hub.stop_server("ada")
    assert store.server_pod("ada", "") is None
