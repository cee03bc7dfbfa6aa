"""A user's kernel snapshots, as the pages list, delete and choose them for the next start.

Snapshots live in the user's home (`~/.gpuhub/snapshots/<key>/<name>/`, see `gpuhub.core.snapshot`).
While one of the user's servers runs, the pages send it a command (`core.protocol`: the server
lists, deletes or chooses snapshots for its own user and reports the result; no credential goes
to the server). While none runs, and only where the service sees the homes
(`GpuhubPages.snapshot_home_template`, the local backend), the pages read the folder themselves
with the same on-disk rules; the user may have planted
links there, so only the home itself is trusted and nothing below it is followed
(`gpuhub.snapshot_files`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ... import snapshot_files as files
from ...core import protocol
from ..reports import CommandTimeout, ReportBoard
from . import views
from .config import GpuhubPages


class SnapshotError(Exception):
    """A snapshot operation that cannot be done; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def check_key(key: str) -> str:
    try:
        return files.check_key(key)
    except ValueError as e:
        raise SnapshotError(400, str(e)) from e


def check_name(name: str) -> str:
    try:
        return files.check_name(name)
    except ValueError as e:
        raise SnapshotError(400, str(e)) from e


def _entry(item: Mapping[str, Any], server: str | None) -> dict[str, Any]:
    created = views.parse_time(item.get("created"))
    size = item.get("bytes") if isinstance(item.get("bytes"), int) else None
    return {
        "key": str(item.get("key") or ""),
        "snapshot": str(item.get("snapshot") or ""),
        "notebook": item.get("notebook") if isinstance(item.get("notebook"), str) else None,
        "kernel_id": item.get("kernel_id") if isinstance(item.get("kernel_id"), str) else None,
        "created": views.iso(created),
        "created_text": views.fmt_time(created),
        "saved": item.get("saved") if isinstance(item.get("saved"), int) else None,
        "skipped": item.get("skipped") if isinstance(item.get("skipped"), int) else None,
        "bytes": size,
        "size": views.fmt_bytes(size),
        "restore_next": bool(item.get("restore_next")),
        "error": item.get("error") if isinstance(item.get("error"), str) else None,
        "server": server,
    }


def _in_folder(operation: Any, *args: Any) -> None:
    try:
        operation(*args)
    except ValueError as e:
        raise SnapshotError(400, str(e)) from e
    except FileNotFoundError as e:
        raise SnapshotError(404, str(e)) from e


class SnapshotAccess:
    def __init__(self, board: ReportBoard, settings: GpuhubPages) -> None:
        self.board = board
        self.settings = settings

    def home(self, user: str) -> Path | None:
        """The user's home on the service's machine (None: not visible from here)."""
        template = self.settings.snapshot_home_template
        if not template:
            return None
        if not user or "/" in user or "\0" in user or user in (".", ".."):
            raise SnapshotError(400, f"user: not a user name for a home folder: {user!r}")
        return Path(template.replace("{username}", user))

    @staticmethod
    def running(servers: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
        for name in sorted(servers):
            model = servers[name]
            if isinstance(model, Mapping) and model.get("ready"):
                return name, model
        return None

    async def listing(self, user: str, servers: Mapping[str, Any]) -> dict[str, Any]:
        running = self.running(servers)
        if running is not None:
            name, _model = running
            try:
                data = await self._command(user, name, protocol.SNAPSHOTS_LIST, {})
                items = protocol.parse_snapshot_listing(data)
            except (SnapshotError, protocol.ProtocolError) as e:
                return {
                    "available": False,
                    "source": "server",
                    "items": [],
                    "note": f"Your snapshots cannot be listed right now ({e}).",
                }
            return {
                "available": True,
                "source": "server",
                "server": name,
                "items": [_entry(i, name) for i in items],
                "note": "",
            }
        home = self.home(user)
        if home is not None:
            root = home / self.settings.snapshot_dir
            try:
                items = await asyncio.to_thread(files.list_folder, root, home)
            except ValueError as e:
                return {
                    "available": False,
                    "source": "home",
                    "items": [],
                    "note": f"Your snapshots cannot be listed: {e}",
                }
            return {
                "available": True,
                "source": "home",
                "items": [_entry(i, None) for i in items],
                "note": "",
            }
        return {
            "available": False,
            "source": None,
            "items": [],
            "note": "Start one of your servers to see your snapshots: they live in its home.",
        }

    async def delete(self, user: str, servers: Mapping[str, Any], key: str, name: str) -> None:
        running = self.running(servers)
        if running is not None:
            args = {"key": check_key(key), "name": check_name(name)}
            await self._command(user, running[0], protocol.SNAPSHOTS_DELETE, args)
            return
        home = self._home_or_refuse(user)
        root = home / self.settings.snapshot_dir
        await asyncio.to_thread(_in_folder, files.delete, root, key, name, home)

    async def restore_next(
        self, user: str, servers: Mapping[str, Any], key: str, name: str | None
    ) -> None:
        running = self.running(servers)
        if running is not None:
            args = {"key": check_key(key), "name": None if name is None else check_name(name)}
            await self._command(user, running[0], protocol.SNAPSHOTS_RESTORE_NEXT, args)
            return
        home = self._home_or_refuse(user)
        root = home / self.settings.snapshot_dir
        await asyncio.to_thread(_in_folder, files.set_restore_next, root, key, name, home)

    def _home_or_refuse(self, user: str) -> Path:
        home = self.home(user)
        if home is None:
            raise SnapshotError(409, "start one of your servers first: your snapshots live there")
        return home

    async def _command(self, user: str, server: str, kind: str, args: dict[str, Any]) -> Any:
        """Have the user's running server carry out `kind`; its result's data, or
        `SnapshotError` with the status to answer."""
        try:
            result = await self.board.request(
                (user, server), kind, args, self.settings.status_timeout
            )
        except CommandTimeout as e:
            raise SnapshotError(504, f"the server did not answer: {e}") from e
        if not result.ok:
            data = result.data if isinstance(result.data, Mapping) else {}
            status = data.get("status") if data.get("status") in (400, 404, 409) else 502
            raise SnapshotError(status, result.error or "the server could not do it")
        return result.data
