"""The JupyterHub scopes the gpuhub service's token holds, each with why it is needed, and the
scopes of the servers' own tokens.

Used by the demo configuration and documented in docs/operations.md and docs/security.md. Nothing
else: the service cannot create or delete users, change groups or roles, read tokens or spawner
state, and cannot reach any single-user server (`access:servers` is not among its scopes: servers
report to the service instead, `gpuhub.core.protocol`).
"""

from __future__ import annotations

from typing import Any

#: scope -> why the service needs it
SCOPES: dict[str, str] = {
    "list:users": "list the users who have ready servers (GET /users?state=ready, paginated)",
    "read:users:groups": "know each user's groups, for the maximum GPU lease of their group",
    "read:users:activity": "read each server's last activity (the server idle timeout)",
    "read:servers": "read each server's model: its URL, start time and user options (the GPUs "
    "it holds, the interface and environment to restart it with)",
    "start:servers": "restart a server without its GPU (release), or with it (GPU again)",
    "delete:servers": "stop a server (before restarting it without GPU, or when idle)",
}

#: Before JupyterHub 6, starting and stopping were one scope.
LEGACY: dict[str, str] = {
    "servers": "start and stop servers (JupyterHub < 6 has no start:servers / delete:servers)",
}


def scopes(jupyterhub_version: str | None = None) -> list[str]:
    """The scopes for the installed JupyterHub (or the one of `jupyterhub_version`)."""
    if jupyterhub_version is None:
        import jupyterhub

        jupyterhub_version = jupyterhub.__version__
    major = int(jupyterhub_version.split(".")[0])
    if major >= 6:
        return list(SCOPES)
    return [s for s in SCOPES if s not in ("start:servers", "delete:servers")] + list(LEGACY)


def service_role(service: str = "gpuhub", jupyterhub_version: str | None = None) -> dict[str, Any]:
    """A `c.JupyterHub.load_roles` entry granting the service exactly its scopes."""
    return {
        "name": f"{service}-service",
        "description": "gpuhub service: release idle GPUs, snapshot and stop idle servers",
        "scopes": scopes(jupyterhub_version),
        "services": [service],
    }


def server_token_scopes(service: str = "gpuhub") -> list[str]:
    """`Spawner.server_token_scopes` for gpuhub: JupyterHub's default server scopes, and access to
    the gpuhub service so that the server can report to it with its own token."""
    return ["users:activity!user", "access:servers!server", f"access:services!service={service}"]
