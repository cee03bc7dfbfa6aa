"""The user's page (`/services/gpuhub/`) and its JSON API (`api/me...`): their servers and GPUs,
GPU activity, snapshots, quota, queue place, the "GPU again" button and their history."""

from __future__ import annotations

from tornado import web

from .base import ApiHandler, BaseHandler


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


class MeGpuAgainApi(ApiHandler):
    """POST `api/me/gpu-again` `{"server": ""}`: 202, the restart runs in the background."""

    @web.authenticated
    async def post(self) -> None:
        body = self.body({"server": str})
        await self.pages.gpu_again(self.user_name, body.get("server") or "")
        self.write_json({"server": body.get("server") or "", "status": "starting"}, status=202)
