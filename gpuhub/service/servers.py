"""From the hub's user models, each server's own report and the trusted GPU readings to
`policy.ServerView`s (pure).

The GPUs a server holds come from the hub (its options); whether they are busy or idle from the
trusted activity source (`gpuhub.activity`); what only the server knows (a kernel executing, a
program outside the kernels holding a GPU) from its latest report (`gpuhub.core.protocol`). A server
without a recent report is "unreadable": `policy.decide` never takes it for idle, and only the
maximum GPU lease ends its lease.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..core.decide import ServerView
from ..core.idle import Activity
from ..core.protocol import ServerStatus

log = logging.getLogger("gpuhub.service")


def parse_time(value: Any) -> float | None:
    """Unix seconds from an ISO 8601 string (the hub's and the extension's), None if unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class RunningServer:
    """One ready server as the hub lists it."""

    user: str
    server: str
    groups: frozenset[str]
    model: Mapping[str, Any] = field(hash=False, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.user, self.server)

    @property
    def label(self) -> str:
        return f"{self.user}/{self.server}" if self.server else self.user

    @property
    def started(self) -> str | None:
        """The server's `started` as the hub reports it: identifies this run of the server."""
        value = self.model.get("started")
        return value if isinstance(value, str) else None

    @property
    def user_options(self) -> dict[str, Any]:
        options = self.model.get("user_options")
        return dict(options) if isinstance(options, Mapping) else {}

    @property
    def gpus(self) -> int:
        value = self.user_options.get("gpus", 0)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    @property
    def gpu_type(self) -> str | None:
        value = self.user_options.get("gpu_type")
        return value if self.gpus and isinstance(value, str) and value else None


def running_servers(users: Iterable[Mapping[str, Any]]) -> list[RunningServer]:
    """The ready servers (not pending) of the users the hub listed, in a stable order."""
    out = []
    for user in users:
        name = user.get("name")
        servers = user.get("servers")
        if not isinstance(name, str) or not isinstance(servers, Mapping):
            continue
        groups = frozenset(g for g in user.get("groups") or () if isinstance(g, str))
        for server_name, model in servers.items():
            if not isinstance(model, Mapping) or not model.get("ready") or model.get("pending"):
                continue
            out.append(RunningServer(name, str(server_name), groups, model))
    return sorted(out, key=lambda s: s.key)


def view_from(
    server: RunningServer,
    report: ServerStatus | None,
    activity: tuple[Activity, ...] = (),
    *,
    lease_start: float | None = None,
    lease_warned_at: float | None = None,
    snapshot_failures: int = 0,
    last_snapshot_failure: float | None = None,
    kept_until: float | None = None,
) -> ServerView:
    """The policy's view of one server: `report` is its latest report (None: none recent),
    `activity` one trusted reading per GPU it holds."""
    started = parse_time(server.started)
    return ServerView(
        user=server.user,
        server=server.server,
        groups=server.groups,
        gpus=server.gpus,
        gpu_type=server.gpu_type,
        gpu_activity=activity,
        kernels_executing=report.kernels_executing if report is not None else False,
        outside_gpu_processes=report.outside_gpu_processes if report is not None else False,
        last_activity=parse_time(server.model.get("last_activity")),
        started=started,
        status_readable=report is not None,
        lease_start=lease_start if lease_start is not None else (started if server.gpus else None),
        lease_warned_at=lease_warned_at,
        snapshot_failures=snapshot_failures,
        last_snapshot_failure=last_snapshot_failure,
        kept_until=kept_until,
    )
