"""Choosing which snapshot comes back at the next start, and deleting snapshots, with a real
jupyter server and real kernels (the REST API the hub's pages use), plus the folder rules."""

from __future__ import annotations

import json
import time

import pytest

from gpuhub import snapshot_files as files
from gpuhub.core import snapshot as core


def wait_restore_checked(server, kernel_id: str) -> dict:
    def checked():
        kernels = server.status()["kernels"]
        return next(k for k in kernels if k["id"] == kernel_id)["last_restore"]

    return server.wait_for(checked, timeout=120, interval=0.5)


def snapshot(server) -> dict:
    r = server.post("/api/gpuhub/snapshot", {})
    assert r.status_code == 200 and r.json()["ok"], r.text
    [saved] = r.json()["snapshots"]
    return saved


@pytest.mark.slow
def test_a_chosen_older_snapshot_comes_back_once_and_deleted_ones_are_gone(
    jupyter_server, scenario, gpu
):
    env = {"GPUHUB_FAKE_NVML": str(scenario([gpu("GPU-0")]))}
    first = jupyter_server(env=env)
    kernel = first.open_notebook("exp.ipynb")
    wait_restore_checked(first, kernel)
    first.run_ok(kernel, "x = 'first'")
    older = snapshot(first)
    time.sleep(0.01)
    first.run_ok(kernel, "x = 'second'")
    newer = snapshot(first)
    key = older["key"]
    assert newer["key"] == key and newer["snapshot"] > older["snapshot"]

    base = f"/api/gpuhub/snapshots/{key}"
    r = first.request("PUT", f"{base}/{older['snapshot']}/restore-next")
    assert r.status_code == 200 and r.json()["restore_next"], r.text
    listing = {s["snapshot"]: s for s in first.get("/api/gpuhub/snapshots").json()["snapshots"]}
    assert listing[older["snapshot"]]["restore_next"] is True
    assert listing[newer["snapshot"]]["restore_next"] is False
    # bad input is refused naming the field; no such snapshot is a 404; no token, no access
    assert first.request("PUT", f"{base}/not-a-name/restore-next").status_code == 400
    escaping = f"/api/gpuhub/snapshots/..%2F/{older['snapshot']}/restore-next"
    assert first.request("PUT", escaping).status_code == 400
    missing = "20000101T000000.000000Z"
    assert first.request("PUT", f"{base}/{missing}/restore-next").status_code == 404
    assert first.request("DELETE", f"{base}/{missing}").status_code == 404
    assert first.request("DELETE", f"{base}/{newer['snapshot']}", token=None).status_code == 403
    first.stop()

    second = jupyter_server(env=env)
    kernel = second.open_notebook("exp.ipynb")
    restore = wait_restore_checked(second, kernel)
    assert restore["status"] == "restored" and restore["snapshot"] == older["snapshot"], restore
    assert second.run_ok(kernel, "print(x)")["stdout"].strip().splitlines()[-1] == "first"
    listing = second.get("/api/gpuhub/snapshots").json()["snapshots"]
    assert not any(s["restore_next"] for s in listing)  # chosen for one start only

    r = second.request("DELETE", f"{base}/{newer['snapshot']}")
    assert r.status_code == 204, r.text
    listing = second.get("/api/gpuhub/snapshots").json()["snapshots"]
    assert [s["snapshot"] for s in listing] == [older["snapshot"]]
    second.stop()

    # the latest (now the older one) was dealt with: a third start restores nothing
    third = jupyter_server(env=env)
    kernel = third.open_notebook("exp.ipynb")
    assert wait_restore_checked(third, kernel)["status"] == "none"
    # back to the latest: unpinning is accepted even when nothing is pinned
    assert third.request("DELETE", f"{base}/restore-next").status_code == 204


def make_snapshot(root, key: str, name: str, notebook: str = "a.ipynb") -> None:
    folder = root / key / name
    folder.mkdir(parents=True)
    manifest = {
        "format": core.FORMAT,
        "key": key,
        "name": name,
        "created": 1_700_000_000.0,
        "notebook": notebook,
        "kernel_id": "k1",
        "saved": [],
        "skipped": [],
    }
    (folder / core.MANIFEST).write_text(json.dumps(manifest))


def test_folder_rules(tmp_path):
    root = tmp_path / "snapshots"
    a, b = "20260101T000000.000000Z", "20260102T000000.000000Z"
    make_snapshot(root, "nb-1", a)
    make_snapshot(root, "nb-1", b)
    (root / "nb-1" / ".tmp-20260103T000000.000000Z-1-x").mkdir()  # half-written: not listed
    assert [e["snapshot"] for e in files.list_folder(root)] == [b, a]
    files.set_restore_next(root, "nb-1", a)
    assert files.read_restore_next(root / "nb-1") == a
    assert [e["restore_next"] for e in files.list_folder(root)] == [False, True]
    files.delete(root, "nb-1", a)  # deleting the chosen one unpins it
    assert files.read_restore_next(root / "nb-1") is None
    assert [e["snapshot"] for e in files.list_folder(root)] == [b]
    for bad_key in ("", "..", "../x", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="key"):
            files.delete(root, bad_key, b)
    with pytest.raises(ValueError, match="snapshot"):
        files.set_restore_next(root, "nb-1", "../../etc")
    with pytest.raises(FileNotFoundError):
        files.delete(root, "nb-1", a)
    with pytest.raises(FileNotFoundError):
        files.set_restore_next(root, "nb-2", b)
    assert files.list_folder(tmp_path / "none") == []
