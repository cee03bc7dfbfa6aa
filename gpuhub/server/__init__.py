"""gpuhub's Jupyter Server extension (`gpuhub.server`): GPU activity from NVML at
`/api/gpuhub/status`, and kernel snapshots (`/api/gpuhub/snapshot`, `/api/gpuhub/restore`).

Enabled by `etc/jupyter/jupyter_server_config.d/gpuhub.json`, installed with the package.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import GpuhubExtension

    return [{"module": "gpuhub.server.app", "app": GpuhubExtension}]
