"""REST endpoints of the gpuhub server extension, under `<base_url>/api/gpuhub/`.

All of them are authenticated like the rest of Jupyter Server's API (a token or a login cookie;
behind JupyterHub, a hub token with `access:servers` for this server). Unauthenticated requests
get 403. Bad input gets 400 with a message naming the field. Times are ISO 8601 UTC strings.
"""

from __future__ import annotations

import json
import time
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from ..core import protocol
from ..core.snapshot import is_snapshot_name, iso


class GpuhubHandler(APIHandler):
    auth_resource = "gpuhub"
    # The hub polls these endpoints: that is not the user's activity. (Snapshots and restores
    # still run code in kernels, which Jupyter counts as kernel activity.)
    _track_activity = False

    @property
    def gpuhub(self) -> Any:
        return self.settings["gpuhub_extension"]

    def body_object(self, allowed: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
        """The JSON object in the request body (empty body: {}), checked against `allowed`
        (field -> type); HTTPError 400 naming the field otherwise."""
        raw = self.request.body or b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise web.HTTPError(400, f"body: not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, f"body: must be a JSON object, not {type(body).__name__}")
        for name, value in body.items():
            if name not in allowed:
                raise web.HTTPError(
                    400, f"{name}: unknown field (allowed: {', '.join(sorted(allowed))})"
                )
            if value is not None and not isinstance(value, allowed[name]):
                raise web.HTTPError(400, f"{name}: wrong type {type(value).__name__}")
        return body

    def kernel_id(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise web.HTTPError(400, f"{field}: must be a kernel id (a string)")
        if value not in self.kernel_manager:
            raise web.HTTPError(404, f"{field}: no kernel {value!r} on this server")
        return value


class StatusHandler(GpuhubHandler):
    """`GET /api/gpuhub/status`: what this server's GPUs and kernels are doing.

    ```
    {"version": 1, "now": ISO, "started": ISO,
     "interface": "lab" | "vscode" | null, "environment": "pytorch" | null, "gpu_type": str|null,
     "nvml": {"available": bool, "reason": str, "driver_version": str|null, "simulated": bool,
              "sample_interval_s": float, "sampled_at": ISO|null},
     "rule": {"util_threshold", "mem_util_threshold", "min_busy_s", "window_s", "max_gap_s"},
     "gpus": [{"uuid", "index", "name", "mig": bool, "parent_uuid", "simulated": bool,
               "state": "busy" | "idle" | "unknown" | "unavailable", "reason": str,
               "idle_since": ISO|null, "idle_for_s": float|null,
               "utilization": {"gpu": %|null, "memory": %|null, "busy_fraction": 0..1|null,
                               "window_s": float,
                               "source": "samples"|"rates"|"unsupported"|"error"},
               "memory": {"used": bytes|null, "total": bytes|null},
               "processes": [{"pid", "used_memory", "kernel_id": str|null, "local": bool}],
               "processes_listed": bool}],
     "kernels": [{"id", "name", "execution_state", "last_activity": ISO, "connections",
                  "notebook": path|null, "python": bool, "pid": int|null, "gpus": [uuid],
                  "last_restore": {...}|null}],
     "external_processes": [{"pid", "cmdline", "gpus": [uuid], "seen_by": ["device-file","nvml"]}],
     "busy": bool, "busy_reasons": [str], "last_gpu_activity": ISO|null,
     "service": {"last_report": ISO|null, "error": str|null,
                 "notices": {"release_at": ISO|null, "release_rule", "release_reason",
                             "warn_before_s", "keep_until": ISO|null,
                             "keep": {"allowed", "max_s", "refused"},
                             "released": {"at", "reason"}, "give_back": {"status", "reason"},
                             "queue": {"place", "estimate_s"}, "warnings": [str]}} | null}
    ```

    `state` "unknown" (MIG instances, failed reads, a stalled sampler) and "unavailable" (no
    NVML, or a GPU of this server that NVML does not show) must never be taken for idle.
    `busy` is true while a GPU is busy or (by default) a process outside the kernels holds one
    of the GPUs, e.g. a training script started from a terminal.
    """

    @web.authenticated
    @authorized
    async def get(self) -> None:
        document = await self.gpuhub.status()
        reporter = self.gpuhub.reporter
        document["service"] = reporter.service_view() if reporter is not None else None
        self.finish(json.dumps(document))


class RequestsHandler(GpuhubHandler):
    """`POST /api/gpuhub/requests`: ask the gpuhub service, for this server, to keep its GPU
    (`{"kind": "keep", "seconds": 3600}`), give it back now (`{"kind": "release"}`) or give it
    again after a release (`{"kind": "gpu-again"}`). The server sends the request in its own
    report, with its own token; the service decides within its policy.

    Response 200: `{"ok": bool, "message": str}` (the service's answer; `ok` false: refused, the
    message says why). 400 names a wrong field; 503 when the server reports to no service; 504
    when the service does not answer in time.
    """

    @web.authenticated
    @authorized
    async def post(self) -> None:
        import asyncio

        from .reporter import CommandError

        body = self.body_object({"kind": str, "seconds": (int, float)})
        try:
            request = protocol.parse_request(body)
        except protocol.ProtocolError as e:
            raise web.HTTPError(400, str(e).replace("request.", "", 1)) from None
        reporter = self.gpuhub.reporter
        if reporter is None:
            raise web.HTTPError(503, "this server reports to no gpuhub service")
        try:
            result = await reporter.ask(request)
        except asyncio.TimeoutError:
            raise web.HTTPError(504, "the gpuhub service did not answer in time") from None
        except CommandError as e:
            raise web.HTTPError(e.status, str(e)) from None
        self.finish(json.dumps({"ok": result["ok"], "message": result["message"]}))


class SnapshotHandler(GpuhubHandler):
    """`POST /api/gpuhub/snapshot`: save the variables of the server's Python kernels.

    Body (optional): `{"kernels": [kernel id, ...], "wait": false}`. Without `kernels`, every
    kernel. A kernel running code is not snapshotted ("busy") unless `wait` is true (the request
    then waits for the running cell, up to the snapshot timeout).

    Response 200:
    ```
    {"ok": bool,                   # every requested Python kernel saved
     "snapshots": [{"kernel_id", "key", "notebook": path|null,
                    "status": "saved" | "busy" | "unsupported" | "failed",
                    "error": str (unless saved),
                    "snapshot": name, "path": str, "saved": int, "skipped": int, "bytes": int,
                    "manifest": {... see docs/snapshots.md ...}}]}
    ```
    """

    auth_resource = "kernels"

    @web.authenticated
    @authorized("execute")
    async def post(self) -> None:
        body = self.body_object({"kernels": list, "wait": bool})
        ids = body.get("kernels")
        if ids is not None:
            ids = [self.kernel_id(k, f"kernels[{i}]") for i, k in enumerate(ids)]
        results = await self.gpuhub.snapshots.snapshot_all(ids, bool(body.get("wait")))
        ok = all(r["status"] in ("saved", "unsupported") for r in results)
        self.finish(json.dumps({"ok": ok, "snapshots": results}))


class RestoreHandler(GpuhubHandler):
    """`POST /api/gpuhub/restore`: restore a snapshot into a running kernel.

    Body: `{"kernel_id": id, "snapshot": name|null, "key": key|null}`. `kernel_id` may be left out
    when the server runs exactly one kernel. `snapshot` defaults to the latest one of `key`;
    `key` defaults to the kernel's own (its notebook's). Variables of the same name in the
    kernel are replaced. Response 200:
    ```
    {"ok": bool, "kernel_id", "key", "notebook", "snapshot": name|null,
     "status": "restored" | "partial" | "none" | "busy" | "unsupported" | "failed",
     "restored": [name], "failed": [{"name", "reason"}],
     "skipped_at_snapshot": [{"name", "reason"}], "moved_to_cpu": [name],
     "summary": str, "error": str}
    ```
    """

    auth_resource = "kernels"

    @web.authenticated
    @authorized("execute")
    async def post(self) -> None:
        body = self.body_object({"kernel_id": str, "snapshot": str, "key": str})
        kernel_id = body.get("kernel_id")
        if kernel_id is None:
            running = list(self.kernel_manager.list_kernel_ids())
            if len(running) != 1:
                raise web.HTTPError(
                    400, f"kernel_id: required when the server runs {len(running)} kernels"
                )
            kernel_id = running[0]
        kernel_id = self.kernel_id(kernel_id, "kernel_id")
        name = body.get("snapshot")
        if name is not None and not is_snapshot_name(name):
            raise web.HTTPError(400, f"snapshot: not a snapshot name: {name!r}")
        key = body.get("key")
        if key is not None and (not key or "/" in key or key.startswith(".")):
            raise web.HTTPError(400, f"key: not a snapshot key: {key!r}")
        result = await self.gpuhub.snapshots.restore(kernel_id, name=name, key=key)
        ok = result["status"] in ("restored", "none")
        self.finish(json.dumps({"ok": ok, **result}))


class SnapshotListHandler(GpuhubHandler):
    """`GET /api/gpuhub/snapshots`: the complete snapshots on disk, newest first.

    `{"root": path, "now": ISO, "snapshots": [{"key", "snapshot", "path", "created": ISO,
    "notebook", "kernel_id", "saved": int, "skipped": int, "bytes": int,
    "restore_next": bool}]}` (`restore_next`: chosen to come back at the next start)
    """

    @web.authenticated
    @authorized
    async def get(self) -> None:
        import asyncio

        listing = await asyncio.to_thread(self.gpuhub.snapshots.list)
        self.finish(
            json.dumps(
                {
                    "root": str(self.gpuhub.snapshots.root),
                    "now": iso(time.time()),
                    "snapshots": listing,
                }
            )
        )


class SnapshotItemHandler(GpuhubHandler):
    """`DELETE /api/gpuhub/snapshots/<key>/<snapshot>`: remove one snapshot (204)."""

    auth_resource = "contents"

    @web.authenticated
    @authorized("write")
    async def delete(self, key: str, name: str) -> None:
        import asyncio

        try:
            await asyncio.to_thread(self.gpuhub.snapshots.delete, key, name)
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        except FileNotFoundError as e:
            raise web.HTTPError(404, str(e)) from None
        self.set_status(204)
        self.finish()


class RestoreNextHandler(GpuhubHandler):
    """`PUT /api/gpuhub/snapshots/<key>/<snapshot>/restore-next`: restore that snapshot the next
    time the key's kernel starts, instead of the latest (one time). `DELETE
    /api/gpuhub/snapshots/<key>/restore-next`: back to the latest."""

    auth_resource = "contents"

    @web.authenticated
    @authorized("write")
    async def put(self, key: str, name: str | None = None) -> None:
        if name is None:
            raise web.HTTPError(405)
        await self._restore_next(key, name)
        self.finish(json.dumps({"key": key, "snapshot": name, "restore_next": True}))

    @web.authenticated
    @authorized("write")
    async def delete(self, key: str, name: str | None = None) -> None:
        if name is not None:
            raise web.HTTPError(405)
        await self._restore_next(key, None)
        self.set_status(204)
        self.finish()

    async def _restore_next(self, key: str, name: str | None) -> None:
        import asyncio

        try:
            await asyncio.to_thread(self.gpuhub.snapshots.restore_next, key, name)
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        except FileNotFoundError as e:
            raise web.HTTPError(404, str(e)) from None


def handlers() -> list[tuple[str, type]]:
    return [
        (r"/api/gpuhub/status", StatusHandler),
        (r"/api/gpuhub/snapshot", SnapshotHandler),
        (r"/api/gpuhub/requests", RequestsHandler),
        (r"/api/gpuhub/restore", RestoreHandler),
        (r"/api/gpuhub/snapshots", SnapshotListHandler),
        (r"/api/gpuhub/snapshots/([^/]+)/restore-next", RestoreNextHandler),
        (r"/api/gpuhub/snapshots/([^/]+)/([^/]+)/restore-next", RestoreNextHandler),
        (r"/api/gpuhub/snapshots/([^/]+)/([^/]+)", SnapshotItemHandler),
    ]
