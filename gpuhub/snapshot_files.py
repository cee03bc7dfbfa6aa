"""Snapshot folders on disk: list them, delete one, choose the one restored at the next start.

The layout is `gpuhub.snapshot`'s: `<root>/<key>/<name>/manifest.json`. Choosing a snapshot for
the next start writes `<root>/<key>/restore-next.json` (`{"snapshot": name}`): when the key's
notebook kernel next starts, the server extension restores that snapshot instead of the latest,
then removes the file. Used by the server extension (its REST API) and by the hub service's
pages where the service sees the homes (local backend, no server running).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from . import snapshot as core

RESTORE_NEXT = core.RESTORE_NEXT


def check_key(key: str) -> str:
    """A snapshot key as a folder name; `ValueError` for anything that could leave the root."""
    if not key or "/" in key or "\\" in key or key.startswith(".") or len(key) > 255:
        raise ValueError(f"key: not a snapshot key: {key!r}")
    return key


def check_name(name: str) -> str:
    if not core.is_snapshot_name(name):
        raise ValueError(f"snapshot: not a snapshot name: {name!r}")
    return name


def read_pin(folder: Path) -> str | None:
    """The snapshot of a key's folder chosen for the next start, if any."""
    try:
        value = json.loads((folder / RESTORE_NEXT).read_text()).get("snapshot")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and core.is_snapshot_name(value) else None


def list_folder(root: Path) -> list[dict[str, Any]]:
    """Every complete snapshot under `root`, newest first, with its manifest's summary."""
    out: list[dict[str, Any]] = []
    try:
        keys = sorted(os.listdir(root))
    except OSError:
        return out
    for key in keys:
        folder = root / key
        if key.startswith(".") or not folder.is_dir():
            continue
        try:
            names = core.complete_snapshots(os.listdir(folder))
        except OSError:
            continue
        pinned = read_pin(folder)
        for name in names:
            entry: dict[str, Any] = {
                "key": key,
                "snapshot": name,
                "path": str(folder / name),
                "restore_next": name == pinned,
            }
            try:
                manifest = core.manifest_from_json((folder / name / core.MANIFEST).read_text())
            except (OSError, ValueError) as e:
                entry["error"] = f"unreadable manifest: {e}"
            else:
                entry.update(
                    created=core.iso(manifest.created),
                    notebook=manifest.notebook,
                    kernel_id=manifest.kernel_id,
                    saved=len(manifest.saved),
                    skipped=len(manifest.skipped),
                    bytes=manifest.total_bytes,
                )
            out.append(entry)
    out.sort(key=lambda e: e["snapshot"], reverse=True)
    return out


def delete(root: Path, key: str, name: str) -> None:
    """Remove one snapshot (renamed out of sight first: a listing never sees half of it).
    `FileNotFoundError` when there is no such snapshot."""
    folder = root / check_key(key) / check_name(name)
    if not (folder / core.MANIFEST).exists():
        raise FileNotFoundError(f"no snapshot {name} of {key}")
    doomed = folder.with_name(core.temp_prefix(name, os.getpid()) + "deleted")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    if read_pin(folder.parent) == name:
        (folder.parent / RESTORE_NEXT).unlink(missing_ok=True)


def pin(root: Path, key: str, name: str | None) -> None:
    """Restore snapshot `name` of `key` at the next start of its kernel (None: the latest, as
    usual). `FileNotFoundError` when there is no such snapshot."""
    folder = root / check_key(key)
    target = folder / RESTORE_NEXT
    if name is None:
        target.unlink(missing_ok=True)
        return
    if not (folder / check_name(name) / core.MANIFEST).exists():
        raise FileNotFoundError(f"no snapshot {name} of {key}")
    tmp = folder / f".{RESTORE_NEXT}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"snapshot": name, "at": time.time()}))
    os.replace(tmp, target)
