"""VS Code (code-server) defaults for a gpuhub server's user, written into their settings once:
the home folder trusted (no "Restricted Mode" for their own files) and the server's environment
interpreter as the default Python for Python tooling, and terminals that keep the environment first
on PATH. A setting the user has already chosen is
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


PROFILE = "gpuhub environment"


def defaults(python: str | None, shell_command: list[str] | None = None) -> dict[str, Any]:
    """The settings gpuhub adds. `shell_command`: the terminal that puts the environment first
    on PATH again after the login shell's /etc/profile (`gpuhub.server.terminals`)."""
    out: dict[str, Any] = {"security.workspace.trust.enabled": False}
    if python:
        out["python.defaultInterpreterPath"] = python
        out["python.terminal.activateEnvironment"] = False  # PATH already has the environment
    if shell_command:
        out["terminal.integrated.profiles.linux"] = {
            PROFILE: {"path": shell_command[0], "args": shell_command[1:]}
        }
        out["terminal.integrated.defaultProfile.linux"] = PROFILE
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
