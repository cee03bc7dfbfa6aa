"""The store's `server_pods` table: where each server's pod runs on Kubernetes."""

from __future__ import annotations

from gpuhub.store import Store


def test_set_read_replace_and_remove(tmp_path):
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    store = Store(url)
    assert store.server_pod("ada", "") is None
    store.set_server_pod("ada", "", "jhub", "jupyter-ada", "a100-0")
    store.set_server_pod("ada", "gpu", "jhub", "jupyter-ada--gpu")
    pod = store.server_pod("ada", "")
    assert pod is not None
    assert (pod.namespace, pod.pod, pod.node) == ("jhub", "jupyter-ada", "a100-0")
    assert pod.updated_at.tzinfo is not None
    assert store.server_pod("ada", "gpu").node is None  # type: ignore[union-attr]

    # A restart elsewhere replaces the row; nothing else changes.
    store.set_server_pod("ada", "", "jhub", "jupyter-ada", "a100-1")
    assert store.server_pod("ada", "").node == "a100-1"  # type: ignore[union-attr]
    assert sorted(store.server_pods()) == [("ada", ""), ("ada", "gpu")]

    # Another process sees the same rows.
    other = Store(url)
    assert other.server_pods()[("ada", "gpu")].pod == "jupyter-ada--gpu"

    assert store.remove_server_pod("ada", "") is True
    assert store.remove_server_pod("ada", "") is False
    assert store.server_pod("ada", "") is None
    assert list(store.server_pods()) == [("ada", "gpu")]


def test_a_pod_belongs_to_one_server(tmp_path):
    """A claim left over from a stop that was never recorded gives way to the newer one."""
    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    store.set_server_pod("ada", "", "jhub", "jupyter-ada")
    store.set_server_pod("bob", "", "jhub", "jupyter-ada")
    assert store.server_pod("ada", "") is None
    assert store.server_pod("bob", "").pod == "jupyter-ada"  # type: ignore[union-attr]
    # The same pod name in another namespace is another pod.
    store.set_server_pod("cy", "", "other", "jupyter-ada")
    assert sorted(store.server_pods()) == [("bob", ""), ("cy", "")]
