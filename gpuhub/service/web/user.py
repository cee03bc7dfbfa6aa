"""The user's page (`/services/gpuhub/`) and its JSON API (`api/me...`): their servers and GPUs,
GPU activity, snapshots, quota, queue place, the "GPU again" button and their history."""

from __future__ import annotations

from typing import Any

from tornado import web

from ...core import protocol
from .base import ApiHandler, BaseHandler
from .user_gpu import PAGE_REQUESTS


class UserPage(BaseHandler):
    @web.authenticated
    async def get(self) -> None:
        overview = await self.pages.user_overview(self.user_name)
        self.render_page("user.html", me=overview, page="user")


class GpuAgainForm(BaseHandler):
    """POST `gpu-again` (`server`): restart the server with the GPU it had before its release."""

    @web.authenticated
    async def post(self) -> None:
        server = self.field("server")
        await self.pages.gpu_again(self.user_name, server)
        self.back(
            "",
            "Your server restarts with its GPU (your kernels are snapshotted first). If no GPU is "
            "free, it waits in the queue; its place shows here and on the spawn page.",
        )


def request_fields(kind: Any, seconds: Any) -> tuple[str, float | None]:
    """A page's request, checked by the protocol's own parser: HTTP 400 naming the field."""
    body: dict[str, Any] = {"kind": kind}
    if isinstance(seconds, bool):
        raise web.HTTPError(400, "seconds: must be a number of seconds, not a boolean")
    if seconds not in (None, ""):
        try:
            body["seconds"] = float(seconds)
        except (TypeError, ValueError):
            raise web.HTTPError(400, "seconds: must be a number of seconds") from None
    try:
        request = protocol.parse_request(body, "request")
    except protocol.ProtocolError as e:
        raise web.HTTPError(400, "%s: %s", e.field.removeprefix("request."), e.problem) from None
    if request.kind not in PAGE_REQUESTS:
        raise web.HTTPError(400, "kind: must be one of %s here", ", ".join(PAGE_REQUESTS))
    return request.kind, request.seconds


class GpuRequestForm(BaseHandler):
    """POST `request` (`server`, `kind`: keep (with `seconds`), release, switch-now, not-now,
    leave-queue): what JupyterLab's GPU item offers, for every interface."""

    @web.authenticated
    async def post(self) -> None:
        kind, seconds = request_fields(self.field("kind"), self.field("seconds"))
        result = await self.pages.user_request(self.user_name, self.field("server"), kind, seconds)
        self.back("", result["message"][:1].upper() + result["message"][1:] + ".")


class SnapshotForm(BaseHandler):
    """POST `snapshots/restore-next` or `snapshots/delete` (`key`, `snapshot`)."""

    @web.authenticated
    async def post(self, action: str) -> None:
        key, name = self.field("key"), self.field("snapshot")
        servers = await self.pages.user_servers(self.user_name)
        if action == "delete":
            await self.pages.snapshots.delete(self.user_name, servers, key, name)
            self.back("", f"Snapshot {name} deleted.")
        elif action == "restore-next":
            await self.pages.snapshots.restore_next(self.user_name, servers, key, name)
            self.back("", f"Snapshot {name} comes back the next time its notebook's kernel starts.")
        else:
            await self.pages.snapshots.restore_next(self.user_name, servers, key, None)
            self.back("", "The latest snapshot comes back at the next start, as usual.")


# -- JSON API ------------------------------------------------------------------------------------


class MeApi(ApiHandler):
    """GET `api/me`: everything on the user's page."""

    @web.authenticated
    async def get(self) -> None:
        self.write_json(await self.pages.user_overview(self.user_name))


class MeSnapshotsApi(ApiHandler):
    """GET `api/me/snapshots`."""

    @web.authenticated
    async def get(self) -> None:
        servers = await self.pages.user_servers(self.user_name)
        self.write_json(await self.pages.snapshots.listing(self.user_name, servers))


class MeSnapshotApi(ApiHandler):
    """DELETE `api/me/snapshots/<key>/<snapshot>`; PUT `.../restore-next`."""

    @web.authenticated
    async def delete(self, key: str, name: str, restore_next: str | None = None) -> None:
        if restore_next:
            raise web.HTTPError(405)
        servers = await self.pages.user_servers(self.user_name)
        await self.pages.snapshots.delete(self.user_name, servers, key, name)
        self.set_status(204)
        self.finish()

    @web.authenticated
    async def put(self, key: str, name: str, restore_next: str | None = None) -> None:
        if not restore_next:
            raise web.HTTPError(405)
        servers = await self.pages.user_servers(self.user_name)
        await self.pages.snapshots.restore_next(self.user_name, servers, key, name)
        self.write_json({"key": key, "snapshot": name, "restore_next": True})


class MeRestoreLatestApi(ApiHandler):
    """DELETE `api/me/snapshots/<key>/restore-next`: the latest comes back at the next start."""

    @web.authenticated
    async def delete(self, key: str) -> None:
        servers = await self.pages.user_servers(self.user_name)
        await self.pages.snapshots.restore_next(self.user_name, servers, key, None)
        self.set_status(204)
        self.finish()


class MeRequestApi(ApiHandler):
    """POST `api/me/requests` `{"server": "", "kind": "keep", "seconds": 3600}` (kinds as the
    `request` form's): 200 with the service's answer, 409 when it cannot be done now."""

    @web.authenticated
    async def post(self) -> None:
        body = self.body({"server": str, "kind": str, "seconds": (int, float)})
        kind, seconds = request_fields(body.get("kind"), body.get("seconds"))
        result = await self.pages.user_request(
            self.user_name, body.get("server") or "", kind, seconds
        )
        self.write_json(result)


class MeGpuAgainApi(ApiHandler):
    """POST `api/me/gpu-again` `{"server": ""}`: 202, the restart runs in the background."""

    @web.authenticated
    async def post(self) -> None:
        body = self.body({"server": str})
        await self.pages.gpu_again(self.user_name, body.get("server") or "")
        self.write_json({"server": body.get("server") or "", "status": "starting"}, status=202)
