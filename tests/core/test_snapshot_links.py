"""Snapshot folders reached from outside a user's server (the service's pages) never follow a
link the user planted: ada cannot list, choose or delete bob's snapshots, nor make gpuhub read
or write any other file, by linking parts of her own snapshot folder elsewhere."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from gpuhub import snapshot_files as files
from gpuhub.core import snapshot as core

REL = ".gpuhub/snapshots"
A, B = "20260101T000000.000000Z", "20260102T000000.000000Z"


def make_snapshot(root: Path, key: str, name: str, notebook: str) -> Path:
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
    return folder


@pytest.fixture
def homes(tmp_path):
    """Two homes: bob has a secret snapshot, ada (hostile) has one of her own."""
    ada, bob = tmp_path / "home" / "ada", tmp_path / "home" / "bob"
    make_snapshot(bob / REL, "nb-1", A, "bob-secret.ipynb")
    make_snapshot(ada / REL, "own", B, "ada.ipynb")
    return ada, bob


def ada_sees(ada: Path) -> list[dict]:
    return files.list_folder(ada / REL, ada)


def bob_intact(bob: Path) -> None:
    assert (bob / REL / "nb-1" / A / core.MANIFEST).is_file()
    assert not (bob / REL / "nb-1" / core.RESTORE_NEXT).exists()


def test_ada_sees_only_her_own_snapshots(homes):
    ada, bob = homes
    assert [(e["key"], e["snapshot"], e["notebook"]) for e in ada_sees(ada)] == [
        ("own", B, "ada.ipynb")
    ]
    files.set_restore_next(ada / REL, "own", B, ada)
    assert ada_sees(ada)[0]["restore_next"]
    files.delete(ada / REL, "own", B, ada)
    assert ada_sees(ada) == []
    bob_intact(bob)


@pytest.mark.parametrize("linked", [".gpuhub", ".gpuhub/snapshots"])
def test_a_linked_folder_on_the_way_to_the_root_is_refused(homes, linked):
    ada, bob = homes
    target = ada / linked
    os.rename(target, target.with_name(target.name + ".mine"))
    target.symlink_to(bob / linked)
    with pytest.raises(files.UnsafePath, match=rf"~/{linked}: refused, it is a symbolic link"):
        ada_sees(ada)
    with pytest.raises(files.UnsafePath, match="symbolic link"):
        files.set_restore_next(ada / REL, "nb-1", A, ada)
    with pytest.raises(files.UnsafePath, match="symbolic link"):
        files.delete(ada / REL, "nb-1", A, ada)
    bob_intact(bob)


def test_a_linked_key_folder_is_left_out_and_refused(homes):
    ada, bob = homes
    (ada / REL / "nb-1").symlink_to(bob / REL / "nb-1")
    assert [e["key"] for e in ada_sees(ada)] == ["own"]
    for call in (
        lambda: files.set_restore_next(ada / REL, "nb-1", A, ada),
        lambda: files.set_restore_next(ada / REL, "nb-1", None, ada),
        lambda: files.delete(ada / REL, "nb-1", A, ada),
    ):
        with pytest.raises(files.UnsafePath, match="nb-1: refused, it is a symbolic link"):
            call()
    bob_intact(bob)


def test_a_linked_snapshot_folder_is_listed_as_refused_and_never_touched(homes):
    ada, bob = homes
    (ada / REL / "own" / A).symlink_to(bob / REL / "nb-1" / A)
    listed = {e["snapshot"]: e for e in ada_sees(ada)}
    assert "bob-secret.ipynb" not in json.dumps(listed)
    assert "own/" + A + ": refused, it is a symbolic link" in listed[A]["error"]
    with pytest.raises(files.UnsafePath, match="symbolic link"):
        files.set_restore_next(ada / REL, "own", A, ada)
    with pytest.raises(files.UnsafePath, match="symbolic link"):
        files.delete(ada / REL, "own", A, ada)
    bob_intact(bob)
    assert (ada / REL / "own" / A).is_symlink()


@pytest.mark.parametrize("target", ["bob", "/etc/passwd"])
def test_a_linked_manifest_is_never_read(homes, target):
    ada, bob = homes
    folder = ada / REL / "own" / A
    folder.mkdir()
    link = bob / REL / "nb-1" / A / core.MANIFEST if target == "bob" else Path(target)
    (folder / core.MANIFEST).symlink_to(link)
    [entry] = [e for e in ada_sees(ada) if e["snapshot"] == A]
    assert "manifest.json: refused, it is a symbolic link" in entry["error"]
    assert "notebook" not in entry
    with pytest.raises(files.UnsafePath, match=r"manifest\.json: refused"):
        files.set_restore_next(ada / REL, "own", A, ada)
    with pytest.raises(files.UnsafePath, match=r"manifest\.json: refused"):
        files.delete(ada / REL, "own", A, ada)
    bob_intact(bob)


def test_a_fifo_as_manifest_does_not_hang_the_listing(homes):
    ada, _ = homes
    folder = ada / REL / "own" / A
    folder.mkdir()
    os.mkfifo(folder / core.MANIFEST)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(ada_sees(ada)), daemon=True)
    worker.start()
    worker.join(10)
    assert result, "the listing hung on a FIFO"
    [entry] = [e for e in result[0] if e["snapshot"] == A]
    assert "not a plain folder or file" in entry["error"]


def test_a_linked_pin_file_is_replaced_not_written_through(homes, tmp_path):
    ada, bob = homes
    victim = tmp_path / "victim.json"
    victim.write_text(json.dumps({"snapshot": A}))
    (ada / REL / "own" / core.RESTORE_NEXT).symlink_to(victim)
    assert not ada_sees(ada)[0]["restore_next"]  # the link is not read
    files.set_restore_next(ada / REL, "own", B, ada)
    assert json.loads(victim.read_text()) == {"snapshot": A}
    assert not (ada / REL / "own" / core.RESTORE_NEXT).is_symlink()
    (ada / REL / "own" / core.RESTORE_NEXT).unlink()
    (ada / REL / "own" / core.RESTORE_NEXT).symlink_to(victim)
    files.set_restore_next(ada / REL, "own", None, ada)  # unpinning removes the link only
    assert victim.exists() and not (ada / REL / "own" / core.RESTORE_NEXT).exists()
    bob_intact(bob)


def test_the_snapshot_folder_setting_stays_inside_the_home(homes):
    ada, bob = homes
    for outside in (ada / ".." / "bob" / REL, bob / REL):
        with pytest.raises(ValueError):
            files.list_folder(outside, ada)
