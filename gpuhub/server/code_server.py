"""VS Code (code-server) defaults for a gpuhub server's user, written into their settings once:
the home folder trusted (no "Restricted Mode" for their own files) and the server's environment
interpreter as the default Python for Python tooling. A setting the user has already chosen is
never changed; a settings file that is not plain JSON (comments, a typo) is left alone."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("gpuhub.server")


def settings_file(home: Path) -> Path:
    """code-server's user settings (its default user data folder)."""
    data = os.environ.get("XDG_DATA_HOME") or str(home / ".local" / "share")
    return Path(data) / "code-server" / "User" / "settings.json"


def defaults(python: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"security.workspace.trust.enabled": False}
    if python:
        out["python.defaultInterpreterPath"] = python
        out["python.terminal.activateEnvironment"] = False  # PATH already has the environment
    return out


def apply_defaults(path: Path, wanted: Mapping[str, Any]) -> bool:
    """Add the `wanted` settings the file lacks (atomically); True when it was changed."""
    current: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text() or "{}")
        except (OSError, ValueError) as e:
            log.info("gpuhub: leaving %s as it is (%s)", path, e)
            return False
        if not isinstance(loaded, dict):
            return False
        current = loaded
    missing = {k: v for k, v in wanted.items() if k not in current}
    if not missing:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.gpuhub")
    staging.write_text(json.dumps({**current, **missing}, indent=2) + "\n")
    os.replace(staging, path)
    return True
