"""A GPU-aware `cull_arbiter_hook` for jupyterhub-idle-culler 2.x, for sites that keep that culler.

The culler asks the hook, for every server inactive past its `--timeout`, whether to stop it. The
hook asks the gpuhub service (`POST <service>/api/v1/arbiter` with the culler's own token, which
needs `access:services!service=gpuhub`; the culler's token never reaches a user's server). The
service answers with `policy.decide` on what it knows of the server (its latest report, the
trusted GPU readings) and the culler's timeout as the server idle timeout: a server is culled only
when gpuhub's rules say stop (no executing kernel, no program holding its GPU, no busy or unknown
GPU, a recent report). Before saying yes the service has the server snapshot its kernels; a failed
snapshot means no (retried with backoff at later passes). The culler can only stop servers, so GPU
release without a stop needs the gpuhub service's own cycle.

In the culler's config file (`c.IdleCuller.cull_arbiter_hook`), or when calling
`jupyterhub_idle_culler.cull_idle(..., cull_arbiter=...)`:

    from gpuhub.service.arbiter import make_cull_arbiter
    c.IdleCuller.cull_arbiter_hook = make_cull_arbiter(service_url="http://hub:10101/services/gpuhub/")

Each stop the service agrees to is recorded in gpuhub's action history.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any

from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from ..core import protocol
from ..core.decide import Demand, Rules, StopServer, decide
from ..store import ActionStatus
from .refusals import peer_address
from .reports import AuthError, bearer_token
from .servers import RunningServer, view_from
from .stopping import SnapshotAborted, StopPlan

log = logging.getLogger("gpuhub.service")

Arbiter = Callable[..., Awaitable[bool]]
STOP = "stop"


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
    service_url: str | None = None,
    api_token: str | None = None,
    timeout: float = 960.0,
) -> Arbiter:
    """The hook. `service_url` defaults to $GPUHUB_SERVICE_URL, else the gpuhub service's prefix
    at the origin of $JUPYTERHUB_API_URL; `api_token` to $JUPYTERHUB_API_TOKEN (the culler's
    own). `timeout` covers a snapshot of the server's kernels."""
    client: dict[str, AsyncHTTPClient] = {}

    def url() -> str:
        if service_url:
            return service_url
        if os.environ.get("GPUHUB_SERVICE_URL"):
            return os.environ["GPUHUB_SERVICE_URL"]
        from urllib.parse import urlparse

        parsed = urlparse(os.environ.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api"))
        return f"{parsed.scheme}://{parsed.netloc}/services/gpuhub/"

    async def cull_arbiter(
        *, inactive: timedelta | None, inactive_limit: float, server: Mapping[str, Any], **_: Any
    ) -> bool:
        if inactive is None:
            return False
        user, name = _names(server)
        if "c" not in client:
            client["c"] = AsyncHTTPClient(force_instance=True)
        token = api_token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
        body = {
            "user": user,
            "server": name,
            "started": server.get("started"),
            "inactive_s": inactive.total_seconds(),
            "inactive_limit_s": float(inactive_limit),
        }
        request = HTTPRequest(
            url().rstrip("/") + "/" + protocol.ARBITER_PATH,
            method="POST",
            body=json.dumps(body),
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
            request_timeout=timeout,
            follow_redirects=False,
        )
        try:
            response = await client["c"].fetch(request, raise_error=False)
            answer = json.loads(response.body or b"{}") if response.code == 200 else {}
        except Exception as e:
            log.info("gpuhub arbiter: not culling %s/%s: %s", user, name, e)
            return False
        cull = answer.get("cull") is True if isinstance(answer, dict) else False
        reason = answer.get("reason") if isinstance(answer, dict) else None
        log.info(
            "gpuhub arbiter: %s %s/%s: %s",
            "culling" if cull else "not culling",
            user,
            name,
            reason or f"the gpuhub service answered {response.code}",
        )
        return cull

    return cull_arbiter


#: A ready-made hook configured from the environment (see `make_cull_arbiter`).
cull_arbiter_hook = make_cull_arbiter()


class ArbiterHandler(web.RequestHandler):
    """`POST <prefix>api/v1/arbiter`: whether the culler may stop a server (see the module)."""

    def check_xsrf_cookie(self) -> None:  # token-authenticated API
        return

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = self._reason
        exc = kwargs.get("exc_info")
        if exc and isinstance(exc[1], web.HTTPError) and exc[1].log_message:
            message = exc[1].log_message
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": message}))

    async def post(self) -> None:
        service = self.settings["gpuhub_service"]
        token = bearer_token(self.request.headers.get("Authorization"))
        if token is None:
            raise web.HTTPError(401, "the culler's token is needed")
        try:
            caller = await service.server_auth.caller(token, peer_address(self.request))
        except AuthError as e:
            raise web.HTTPError(e.status, str(e)) from None
        if caller.kind != "service" or caller.name not in service.arbiter_services:
            raise web.HTTPError(403, "only the configured culler services may ask")
        body = _body(self.request.body)
        user, name = body["user"], body["server"]
        model = await service.client.server_model(user, name)
        if model is None or not model.get("ready"):
            self.finish({"cull": False, "reason": "not a ready server"})
            return
        running = RunningServer(user, name, frozenset(), model)
        decision, reason = await decide_cull(
            service, running, body["inactive_s"], body["inactive_limit_s"]
        )
        self.finish({"cull": decision, "reason": reason})


def _body(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise web.HTTPError(400, "body: not valid JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPError(400, "body: must be an object")
    for field in ("user", "server"):
        if not isinstance(data.get(field), str):
            raise web.HTTPError(400, f"{field}: must be a string")
    for field in ("inactive_s", "inactive_limit_s"):
        value = data.get(field)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise web.HTTPError(400, f"{field}: must be a number of seconds >= 0")
    return data


async def decide_cull(
    service: Any, running: RunningServer, inactive_s: float, inactive_limit_s: float
) -> tuple[bool, str]:
    """The service's answer for one server: gpuhub's rules with the culler's timeout, then a
    snapshot before a yes."""
    now = time.time()
    report = service.report_of(running)
    devices = {t.key: t.devices for t in service.targets}.get(running.key)
    activity = service.gpu_activity(running, devices, now)
    run = (running.user, running.server, running.started)
    count, last = service.ledger.snapshot_failures(run)
    view = view_from(running, report, activity, snapshot_failures=count, last_snapshot_failure=last)
    view = replace(view, last_activity=now - inactive_s)
    rules = Rules(
        gpu_idle_timeout=float("inf"),
        gpu_idle_timeout_under_demand=float("inf"),
        server_idle_timeout=max(0.0, inactive_limit_s),
        max_gpu_lease_default=None,
        snapshot_retry=service.snapshot_retry,
        snapshot_retry_max=service.snapshot_retry_max,
    )
    actions = decide([view], Demand(), now, rules)
    stop = next((a for a in actions if isinstance(a, StopServer)), None)
    if stop is None:
        return False, actions[0].reason if actions else "gpuhub's rules keep it"
    if service.executor.busy(running.key):
        return False, "an action on this server is under way"
    row = service.ledger.record(
        user=running.user,
        server=running.server,
        kind=STOP,
        rule=stop.rule,
        reason=stop.reason,
        actor="jupyterhub-idle-culler",
        status=ActionStatus.SNAPSHOTTING,
        server_started=running.started,
        gpus=running.gpus,
        gpu_type=running.gpu_type,
        user_options=running.user_options,
    )
    outcome = await service.executor.sequence.run(
        row, running, StopPlan(snapshot=stop.snapshot, culler_stops=True)
    )
    if isinstance(outcome.error, SnapshotAborted):
        return False, str(outcome.error)
    if outcome.error is not None:
        return False, f"snapshot failed: {outcome.error}"
    return True, stop.reason
