"""From the hub's user models and each server's `/api/gpuhub/status` to `policy.ServerView`s.

`running_servers` and `view_from` are pure (plain JSON in, core values out); `read_status` is the
one I/O step, through `HubClient`. A status that cannot be read, or does not look like the
extension's, leaves the view unreadable: `policy.decide` never takes such a server for idle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..idle import BUSY, IDLE, UNKNOWN, Activity
from ..policy import ServerView
from .hubapi import HubAPIError, HubClient

log = logging.getLogger("gpuhub.service")

STATUS_PATH = "api/gpuhub/status"


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


@dataclass(frozen=True)
class StatusResult:
    status: Mapping[str, Any] | None
    error: str | None = None


def check_status(data: Any) -> str | None:
    """Why `data` is not a usable status document (None when it is)."""
    if not isinstance(data, Mapping):
        return "not a JSON object"
    if not isinstance(data.get("gpus"), list) or not isinstance(data.get("kernels"), list):
        return "no `gpus` and `kernels` lists: not gpuhub's server extension"
    if any(not isinstance(g, Mapping) for g in data["gpus"]):
        return "a `gpus` entry is not an object"
    return None


async def read_status(client: HubClient, server: RunningServer, timeout: float) -> StatusResult:
    try:
        data = await client.server_get(server.model, STATUS_PATH, timeout=timeout)
    except HubAPIError as e:
        return StatusResult(None, f"{e.status} {e.message}")
    problem = check_status(data)
    if problem:
        return StatusResult(None, problem)
    return StatusResult(data)


def activity_from(gpu: Mapping[str, Any]) -> Activity:
    """One GPU's activity from its status entry ("unavailable" and anything odd: unknown)."""
    state = gpu.get("state")
    utilization = gpu.get("utilization") if isinstance(gpu.get("utilization"), Mapping) else {}
    fraction = utilization.get("busy_fraction")
    fraction = float(fraction) if isinstance(fraction, (int, float)) else None
    if state == IDLE:
        since = parse_time(gpu.get("idle_since"))
        if since is None:
            return Activity(UNKNOWN, fraction, None)
        return Activity(IDLE, fraction, since)
    if state == BUSY:
        return Activity(BUSY, fraction, None)
    return Activity(UNKNOWN, fraction, None)


def kernels_executing(status: Mapping[str, Any]) -> bool:
    return any(
        isinstance(k, Mapping) and k.get("execution_state") == "busy" for k in status["kernels"]
    )


def view_from(
    server: RunningServer,
    status: Mapping[str, Any] | None,
    *,
    lease_start: float | None = None,
    lease_warned_at: float | None = None,
    snapshot_failures: int = 0,
    last_snapshot_failure: float | None = None,
) -> ServerView:
    """The policy's view of one server. GPUs held come from the hub (the server's options);
    their activity from the server's own status."""
    started = parse_time(server.started)
    readable = status is not None
    activity: tuple[Activity, ...] = ()
    executing = outside = False
    if status is not None:
        activity = tuple(activity_from(g) for g in status["gpus"])
        executing = kernels_executing(status)
        outside = bool(status.get("external_processes"))
    return ServerView(
        user=server.user,
        server=server.server,
        groups=server.groups,
        gpus=server.gpus,
        gpu_type=server.gpu_type,
        gpu_activity=activity,
        kernels_executing=executing,
        outside_gpu_processes=outside,
        last_activity=parse_time(server.model.get("last_activity")),
        started=started,
        status_readable=readable,
        lease_start=lease_start if lease_start is not None else (started if server.gpus else None),
        lease_warned_at=lease_warned_at,
        snapshot_failures=snapshot_failures,
        last_snapshot_failure=last_snapshot_failure,
    )


def idle_gpus(status: Mapping[str, Any] | None) -> int:
    """How many of the GPUs in a status document are idle."""
    if status is None:
        return 0
    return sum(1 for g in status["gpus"] if g.get("state") == IDLE)
