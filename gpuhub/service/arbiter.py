"""A GPU-aware `cull_arbiter_hook` for jupyterhub-idle-culler 2.x, for sites that keep that culler.

The culler asks the hook, for every server inactive past its `--timeout`, whether to stop it. This
hook reads the server's `/api/gpuhub/status` through the proxy and asks `policy.decide` with the
culler's timeout as the server idle timeout: a server is culled only when gpuhub's rules say stop
(no executing kernel, no program holding its GPU, no busy or unknown GPU, status readable). Before
saying yes it snapshots the server's kernels; a failed snapshot means no (retried with backoff at
later passes, as the service does). The culler can only stop servers, so GPU release without a
stop needs the gpuhub service itself.

In the culler's config file (`c.IdleCuller.cull_arbiter_hook`), or when calling
`jupyterhub_idle_culler.cull_idle(..., cull_arbiter=...)`:

    from gpuhub.service.arbiter import make_cull_arbiter
    c.IdleCuller.cull_arbiter_hook = make_cull_arbiter(proxy_url="http://proxy-public")

The culler's token then also needs `access:servers` (status and snapshot) besides its usual
scopes. With `store_url`, each stop is recorded in gpuhub's action history.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any

from ..policy import Demand, Rules, StopServer, decide
from .actions import STOP, SnapshotAborted, SnapshotFailed, check_snapshot
from .hubapi import HubAPIError, HubClient
from .servers import RunningServer, check_status, view_from

log = logging.getLogger("gpuhub.service")

Arbiter = Callable[..., Awaitable[bool]]


def _names(server: Mapping[str, Any]) -> tuple[str, str]:
    full = str(server.get("full_name") or "")
    user, _, name = full.partition("/")
    if not user:  # older hubs: the URL is /user/<name>/<server>/
        parts = [p for p in str(server.get("url") or "").split("/") if p]
        user = parts[1] if len(parts) > 1 else ""
        name = parts[2] if len(parts) > 2 else ""
    return user, name


def make_cull_arbiter(
    *,
    proxy_url: str | None = None,
    api_token: str | None = None,
    status_timeout: float = 10.0,
    snapshot_timeout: float = 900.0,
    snapshot: bool = True,
    snapshot_retry: float = 60.0,
    store_url: str | None = None,
) -> Arbiter:
    """The hook. `proxy_url` defaults to $JUPYTERHUB_PUBLIC_URL's origin, else the origin of
    $JUPYTERHUB_API_URL; `api_token` to $JUPYTERHUB_API_TOKEN (the culler's own)."""
    failures: dict[tuple[str, str, str | None], tuple[int, float]] = {}
    client: dict[str, HubClient] = {}

    def hub_client() -> HubClient:
        if "c" not in client:
            from urllib.parse import urlparse

            base = (
                proxy_url
                or os.environ.get("JUPYTERHUB_PUBLIC_URL")
                or os.environ.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8000")
            )
            parsed = urlparse(base)
            origin = f"{parsed.scheme}://{parsed.netloc}"
            token = api_token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
            client["c"] = HubClient(origin + "/hub/api", token, origin, timeout=status_timeout)
        return client["c"]

    async def cull_arbiter(
        *, inactive: timedelta | None, inactive_limit: float, server: Mapping[str, Any], **_: Any
    ) -> bool:
        if inactive is None:
            return False
        user, name = _names(server)
        running = RunningServer(user, name, frozenset(), server)
        now = time.time()
        try:
            status = await hub_client().server_get(
                server, "api/gpuhub/status", timeout=status_timeout
            )
        except HubAPIError as e:
            log.info("gpuhub arbiter: not culling %s: status unreadable (%s)", running.label, e)
            return False
        if check_status(status) is not None:
            log.info("gpuhub arbiter: not culling %s: no gpuhub status", running.label)
            return False
        run = (user, name, running.started)
        count, last = failures.get(run, (0, None))
        view = view_from(running, status, snapshot_failures=count, last_snapshot_failure=last)
        # the culler's own idea of inactivity, whatever the model's last_activity says
        view = replace(view, last_activity=now - inactive.total_seconds())
        rules = Rules(
            gpu_idle_timeout=float("inf"),
            gpu_idle_timeout_under_demand=float("inf"),
            server_idle_timeout=max(0.0, float(inactive_limit)),
            snapshot_retry=snapshot_retry,
        )
        actions = decide([view], Demand(), now, rules)
        stop = next((a for a in actions if isinstance(a, StopServer)), None)
        if stop is None:
            reason = actions[0].reason if actions else "gpuhub's rules keep it"
            log.info("gpuhub arbiter: not culling %s: %s", running.label, reason)
            return False
        summary: list[dict[str, Any]] = []
        if snapshot and stop.snapshot:
            try:
                result = await hub_client().server_post(
                    server, "api/gpuhub/snapshot", {}, timeout=snapshot_timeout
                )
                summary = check_snapshot(result)
            except SnapshotAborted as e:
                log.info("gpuhub arbiter: not culling %s: %s", running.label, e)
                return False
            except (HubAPIError, SnapshotFailed) as e:
                failures[run] = (count + 1, now)
                log.warning("gpuhub arbiter: not culling %s: snapshot failed: %s", running.label, e)
                return False
        failures.pop(run, None)
        if store_url:
            from ..store import Store

            store = Store.at(store_url)
            record = store.record_action(
                user,
                name,
                STOP,
                stop.rule,
                stop.reason,
                actor="jupyterhub-idle-culler",
                status="done",
                server_started=running.started,
                gpus=running.gpus,
                gpu_type=running.gpu_type,
                user_options=running.user_options,
            )
            store.update_action(record.id, snapshots=summary)
        log.info("gpuhub arbiter: culling %s: %s", running.label, stop.reason)
        return True

    cull_arbiter.snapshots_failed = failures  # type: ignore[attr-defined]
    return cull_arbiter


#: A ready-made hook configured from the environment (see `make_cull_arbiter`).
cull_arbiter_hook = make_cull_arbiter()
