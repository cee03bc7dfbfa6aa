"""Snapshots of the server's kernels: which kernels, under which key, when to restore.

The saving and loading themselves run inside each kernel (`kernel_side.py`); this module picks
the kernels, derives each one's key from its notebook, runs one operation per kernel at a time,
lists what is on disk, and restores a notebook's latest snapshot when its kernel starts again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import snapshot_files
from ..core import snapshot as core
from . import kernels

log = logging.getLogger(__name__)

KERNEL_ACTIONS = "https://events.jupyter.org/jupyter_server/kernel_actions/v1"


@dataclass(frozen=True)
class SnapshotSettings:
    root: str
    limit_bytes: int | None
    reserve_bytes: int
    keep: int
    timeout_s: float
    restore_timeout_s: float
    auto_restore: bool
    kernel_ready_timeout_s: float = 120.0
    session_wait_s: float = 10.0


class SnapshotManager:
    def __init__(self, kernel_manager: Any, session_manager: Any, settings: SnapshotSettings):
        self.km = kernel_manager
        self.sessions = session_manager
        self.settings = settings
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        #: one kernel client per kernel, kept between requests
        self.clients = kernels.KernelClients()
        #: kernel id -> the last restore report (automatic or requested)
        self.restores: dict[str, dict[str, Any]] = {}

    @property
    def root(self) -> Path:
        return Path(os.path.expanduser(self.settings.root))

    # -- kernels --------------------------------------------------------------------------------

    def kernel(self, kernel_id: str) -> Any | None:
        try:
            return self.km.get_kernel(kernel_id)
        except KeyError:
            return None

    def is_python(self, kernel_id: str) -> bool:
        kernel = self.kernel(kernel_id)
        try:
            return kernel.kernel_spec.language.lower() == "python"
        except Exception:
            return False

    async def notebooks(self) -> dict[str, str]:
        """kernel id -> the path of the notebook (or file) it runs for."""
        out = {}
        for session in await self.sessions.list_sessions():
            kernel = session.get("kernel") or {}
            if kernel.get("id") and session.get("path"):
                out[kernel["id"]] = session["path"]
        return out

    async def key(self, kernel_id: str, wait: float = 0.0) -> tuple[str, str | None]:
        """(snapshot key, notebook path) for a kernel; waits up to `wait` seconds for its
        session to be recorded (a kernel starts before its session is saved)."""
        deadline = time.monotonic() + wait
        while True:
            notebook = (await self.notebooks()).get(kernel_id)
            if notebook or time.monotonic() >= deadline:
                return core.snapshot_key(notebook, kernel_id), notebook
            await asyncio.sleep(0.25)

    def _config(self, key: str, kernel_id: str, notebook: str | None) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "key": key,
            "kernel_id": kernel_id,
            "notebook": notebook,
            "limit": self.settings.limit_bytes or None,
            "reserve": self.settings.reserve_bytes,
            "keep": self.settings.keep,
        }

    def _lock(self, kernel_id: str) -> asyncio.Lock:
        return self._locks.setdefault(kernel_id, asyncio.Lock())

    # -- snapshot -------------------------------------------------------------------------------

    async def snapshot_all(
        self, kernel_ids: list[str] | None = None, wait: bool = False
    ) -> list[dict[str, Any]]:
        ids = list(self.km.list_kernel_ids()) if kernel_ids is None else kernel_ids
        results = await asyncio.gather(*(self.snapshot(k, wait) for k in ids))
        return list(results)

    async def snapshot(self, kernel_id: str, wait: bool = False) -> dict[str, Any]:
        """Snapshot one kernel. The result's `status` is "saved", "busy" (running code: the
        request would queue behind it; pass `wait`), "unsupported" (not Python) or "failed"."""
        base: dict[str, Any] = {"kernel_id": kernel_id}
        kernel = self.kernel(kernel_id)
        if kernel is None:
            return {**base, "status": "failed", "error": "no such kernel"}
        key, notebook = await self.key(kernel_id)
        base.update(key=key, notebook=notebook)
        if not self.is_python(kernel_id):
            return {**base, "status": "unsupported", "error": "not a Python kernel"}
        if not wait and not await _settles_idle(kernel):
            return {
                **base,
                "status": "busy",
                "error": "the kernel is running code; a snapshot would wait for it to finish",
            }
        config = self._config(key, kernel_id, notebook)
        async with self._lock(kernel_id):
            try:
                result = await self.clients.command(
                    kernel_id, kernel, config, kernels.call("run_snapshot"), self.settings.timeout_s
                )
            except kernels.KernelCommandError as e:
                return {**base, "status": "failed", "error": str(e)}
        if not isinstance(result, dict):
            return {**base, "status": "failed", "error": "the kernel returned no result"}
        if result.get("status") != "saved":
            return {**base, "status": "failed", "error": result.get("error", "unknown error")}
        manifest = {k: v for k, v in result.items() if k not in ("status", "path")}
        return {
            **base,
            "status": "saved",
            "snapshot": result.get("name"),
            "path": result.get("path"),
            "saved": len(result.get("saved", ())),
            "skipped": len(result.get("skipped", ())),
            "bytes": result.get("total_bytes", 0),
            "manifest": manifest,
        }

    # -- restore --------------------------------------------------------------------------------

    async def restore(
        self,
        kernel_id: str,
        name: str | None = None,
        key: str | None = None,
        notify: bool = True,
        auto: bool = False,
    ) -> dict[str, Any]:
        """Restore snapshot `name` (default: the latest) of `key` (default: the kernel's own)
        into the kernel. `status`: "restored", "none" (nothing to restore), "busy", "skipped"
        (automatic restore after cells already ran), "unsupported" or "failed"."""
        base: dict[str, Any] = {"kernel_id": kernel_id}
        kernel = self.kernel(kernel_id)
        if kernel is None:
            return {**base, "status": "failed", "error": "no such kernel"}
        own_key, notebook = await self.key(kernel_id, self.settings.session_wait_s if auto else 0)
        key = key or own_key
        base.update(key=key, notebook=notebook)
        if not self.is_python(kernel_id):
            return {**base, "status": "unsupported", "error": "not a Python kernel"}
        if not auto and not await _settles_idle(kernel):
            return {
                **base,
                "status": "busy",
                "error": "the kernel is running code; restore when it is idle",
            }
        chosen = None
        if auto:
            latest = await asyncio.to_thread(self._latest, key)
            # A snapshot the user chose for the next start comes back instead of the latest.
            chosen = await asyncio.to_thread(snapshot_files.read_restore_next, self.root / key)
            if chosen is not None:
                name = chosen
            elif latest is None or latest <= (
                await asyncio.to_thread(self._restored_mark, key) or ""
            ):  # names sort by time: only a snapshot newer than the last restored one
                # the magics only: nothing to restore
                await self._quiet_run(kernel_id, self._config(key, kernel_id, notebook))
                result = {**base, "status": "none", "snapshot": None}
                self.restores[kernel_id] = {
                    **result,
                    "at": core.iso(time.time()),
                    "automatic": True,
                }
                return result
            else:
                name = latest
        config = self._config(key, kernel_id, notebook)
        function = "run_auto_restore" if auto else "run_restore"
        code = kernels.call(function, name, notify)
        async with self._lock(kernel_id):
            try:
                report = await self.clients.command(
                    kernel_id, kernel, config, code, self.settings.restore_timeout_s
                )
            except kernels.KernelCommandError as e:
                return {**base, "status": "failed", "error": str(e)}
        status = _restore_status(report)
        result = {**base, "status": status, **(report or {})}
        self.restores[kernel_id] = {**result, "at": core.iso(time.time()), "automatic": auto}
        if auto and status in ("restored", "partial"):
            # After a chosen snapshot, the latest counts as dealt with too.
            done = latest if chosen is not None else report.get("snapshot")
            await asyncio.to_thread(self._mark_restored, key, done, kernel_id)
        if chosen is not None and status != "skipped":
            await asyncio.to_thread(snapshot_files.set_restore_next, self.root, key, None)
        return result

    async def _quiet_run(self, kernel_id: str, config: dict[str, Any]) -> None:
        """Load (or configure) the helpers in a kernel: its magics work from then on."""
        kernel = self.kernel(kernel_id)
        if kernel is None:
            return
        try:
            async with self._lock(kernel_id):
                await self.clients.command(kernel_id, kernel, config, "None", 60)
        except kernels.KernelCommandError as e:
            log.warning("gpuhub: could not load the snapshot helpers into a kernel: %s", e)

    def _latest(self, key: str) -> str | None:
        try:
            return core.latest(os.listdir(self.root / key))
        except OSError:
            return None

    def _restored_mark(self, key: str) -> str | None:
        try:
            return json.loads((self.root / key / core.RESTORED_MARK).read_text()).get("snapshot")
        except (OSError, ValueError, AttributeError):
            return None

    def _mark_restored(self, key: str, name: str | None, kernel_id: str) -> None:
        path = self.root / key / core.RESTORED_MARK
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"snapshot": name, "kernel_id": kernel_id, "at": time.time()}))
        os.replace(tmp, path)

    # -- kernel events --------------------------------------------------------------------------

    async def on_kernel_event(self, logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        """jupyter_server's kernel action events: restore on start, helpers after restart."""
        if data.get("status") != "success" or not data.get("kernel_id"):
            return
        action = data.get("action")
        if action == "start":
            task = asyncio.create_task(self._started(data["kernel_id"], restore=True))
        elif action == "restart":
            self.clients.forget(data["kernel_id"])
            task = asyncio.create_task(self._started(data["kernel_id"], restore=False))
        else:
            if action == "shutdown":
                self.clients.forget(data["kernel_id"])
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _started(self, kernel_id: str, restore: bool) -> None:
        deadline = time.monotonic() + self.settings.kernel_ready_timeout_s
        while kernel_id not in self.km and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # registered once the kernel is ready
        if kernel_id not in self.km or not self.is_python(kernel_id):
            return
        try:
            if restore and self.settings.auto_restore:
                result = await self.restore(kernel_id, auto=True)
                if result["status"] not in ("none", "unsupported"):
                    log.info(
                        "gpuhub: automatic restore into kernel %s: %s",
                        kernel_id,
                        result.get("summary") or result.get("error") or result["status"],
                    )
            else:
                key, notebook = await self.key(kernel_id, self.settings.session_wait_s)
                await self._quiet_run(kernel_id, self._config(key, kernel_id, notebook))
        except Exception:
            log.exception("gpuhub: preparing kernel %s for snapshots failed", kernel_id)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.clients.close()

    # -- listing --------------------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        """Every complete snapshot on disk, newest first, with its manifest summary."""
        return snapshot_files.list_folder(self.root)

    def delete(self, key: str, name: str) -> None:
        """Remove snapshot `name` of `key` (`ValueError`, `FileNotFoundError`)."""
        snapshot_files.delete(self.root, key, name)

    def restore_next(self, key: str, name: str | None) -> None:
        """Restore snapshot `name` of `key` the next time the key's kernel starts (None: the
        latest, as usual)."""
        snapshot_files.set_restore_next(self.root, key, name)


async def _settles_idle(kernel: Any, within: float = 2.0) -> bool:
    """False when the kernel is running code: still busy after `within` seconds (a status
    message of a request that just finished may take a moment to arrive)."""
    deadline = time.monotonic() + within
    while getattr(kernel, "execution_state", None) == "busy":
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)  # a request right after a cell: its "idle" is on its way
    return True


def _restore_status(report: Any) -> str:
    if not isinstance(report, dict):
        return "failed"
    if report.get("error"):
        return "failed"
    if report.get("skipped_reason"):
        return "skipped"
    if report.get("snapshot") is None:
        return "none"
    return "partial" if report.get("failed") else "restored"
