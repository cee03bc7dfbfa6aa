"""The server's side of `core.protocol`: report this server's status to the gpuhub service with
the server's own `JUPYTERHUB_API_TOKEN`, and carry out the commands the answer brings, for this
server's own user (snapshot the kernels, write a notice, list/delete/choose snapshots).

The report is held by the service until a command comes (at most `hold` seconds); a change that
matters for a release (a kernel starts or stops executing, a program outside the kernels opens a
GPU) is reported at once, without waiting for the held answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import posixpath
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from ..core import protocol
from ..core.protocol import Command, CommandResult

log = logging.getLogger("gpuhub.server")

StatusFn = Callable[[], Awaitable[dict[str, Any]]]


def bounded_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """The status cut to the protocol's bounds (long command lines, many kernels or processes)."""
    doc = dict(status)
    doc["kernels"] = list(doc.get("kernels") or [])[: protocol.MAX_KERNELS]
    doc["gpus"] = list(doc.get("gpus") or [])[: protocol.MAX_GPUS]
    doc["busy_reasons"] = [
        str(r)[: protocol.MAX_STRING]
        for r in list(doc.get("busy_reasons") or [])[: protocol.MAX_REASONS]
    ]
    doc["external_processes"] = [
        {**p, "cmdline": str(p.get("cmdline") or "")[: protocol.MAX_STRING]}
        for p in list(doc.get("external_processes") or [])[: protocol.MAX_PROCESSES]
    ]
    return doc


def signature(status: Mapping[str, Any]) -> tuple[Any, ...]:
    """What in a status makes a report urgent when it changes: work in progress, and the GPUs
    as the server sees them (their first reading, a change of state)."""
    executing = sorted(
        str(k.get("id")) for k in status.get("kernels") or () if k.get("execution_state") == "busy"
    )
    outside = sorted(int(p.get("pid") or 0) for p in status.get("external_processes") or ())
    gpus = tuple(
        (str(g.get("uuid")), str(g.get("name")), str(g.get("state")), bool(g.get("simulated")))
        for g in status.get("gpus") or ()
    )
    return (tuple(executing), tuple(outside), bool(status.get("busy")), gpus)


class Reporter:
    """Reports every `hold` seconds at the latest, carries out commands, reports their results."""

    def __init__(
        self,
        *,
        service_url: str,
        token: str,
        server_name: str,
        status: StatusFn,
        snapshots: Any,
        contents_manager: Any,
        hold: float = 30.0,
        request_timeout: float = 20.0,
        retry_max: float = 60.0,
    ) -> None:
        self.service_url = service_url
        self.token = token
        self.server_name = server_name
        self.status = status
        self.snapshots = snapshots
        self.contents = contents_manager
        self.hold = hold
        self.request_timeout = request_timeout
        self.retry_max = retry_max
        self.changed = asyncio.Event()
        self.last_signature: tuple[Any, ...] | None = None
        self.last_report_ok: float | None = None
        self.last_error: str | None = None
        #: what the service told this server in its last answer (checked): the foreseen release,
        #: keep, the last release, the progress of a "GPU again" (JupyterLab shows them)
        self.notices: dict[str, Any] = {}
        self._requests: list[tuple[protocol.UserRequest, asyncio.Future]] = []
        self._client = AsyncHTTPClient(force_instance=True, max_clients=4)

    def service_view(self) -> dict[str, Any]:
        """This server's link to the service, as `GET /api/gpuhub/status` shows it."""
        return {
            "last_report": protocol.iso(self.last_report_ok),
            "error": self.last_error,
            "notices": self.notices,
        }

    async def ask(self, request: protocol.UserRequest, timeout: float = 60.0) -> dict[str, Any]:
        """Send the user's `request` in a report now, and return the service's result
        (`{"id", "ok", "message"}`); `asyncio.TimeoutError` when no answer comes in time."""
        if len(self._requests) >= protocol.MAX_REQUESTS:
            raise CommandError(429, "too many requests under way; try again shortly")
        request = protocol.UserRequest(secrets.token_hex(8), request.kind, request.seconds)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._requests.append((request, future))
        self.changed.set()
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._requests = [(r, f) for r, f in self._requests if f is not future]

    def note_status(self, status: Mapping[str, Any]) -> None:
        """Called by the sampler with the current status: report at once if it matters."""
        if self.last_signature is not None and signature(status) != self.last_signature:
            self.changed.set()

    async def run_forever(self) -> None:
        results: list[CommandResult] = []
        backoff = 1.0
        while True:
            try:
                commands = await self.report(results)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("gpuhub: report to the gpuhub service failed: %s", self.last_error)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), backoff)
                backoff = min(backoff * 2, self.retry_max)
                continue
            backoff = 1.0
            results = [await self.execute(c) for c in commands]

    async def report(self, results: list[CommandResult]) -> list[Command]:
        status = bounded_status(await self.status())
        self.last_signature = signature(status)
        self.changed.clear()
        asked = [(r, f) for r, f in self._requests if not f.done()][: protocol.MAX_REQUESTS]
        document: dict[str, Any] = {
            "version": protocol.VERSION,
            "status": status,
            "results": [r.to_json() for r in results],
        }
        if asked:
            document["requests"] = [r.to_json() for r, _ in asked]
        body = json.dumps(document)
        wait = 0.0 if results or asked else self.hold
        request = HTTPRequest(
            protocol.report_url(self.service_url, self.server_name, wait),
            method="POST",
            body=body,
            headers={
                "Authorization": f"token {self.token}",
                "Content-Type": "application/json",
            },
            request_timeout=wait + self.request_timeout,
            connect_timeout=self.request_timeout,
            follow_redirects=False,
        )
        fetch = asyncio.ensure_future(self._client.fetch(request, raise_error=False))
        changed = asyncio.ensure_future(self.changed.wait())
        # a report carrying the user's requests is answered at once: its answer is awaited
        watch = {fetch} if asked else {fetch, changed}
        try:
            done, _ = await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            changed.cancel()
            raise
        if fetch not in done:
            # something changed while the answer was held: report again now (the service ends the
            # held answer when the new report comes; its commands come with the new answer)
            fetch.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
            return []
        changed.cancel()
        try:
            response = fetch.result()
            if response.code != 200:
                text = (response.body or b"")[:300].decode("utf-8", "replace")
                raise RuntimeError(f"{response.code} {text or response.reason}")
            answer = json.loads(response.body)
            commands, _hold = protocol.parse_commands(answer)
            notices, request_results = protocol.parse_answer_notices(answer)
        except Exception as e:
            for _, future in asked:
                if not future.done():
                    future.set_exception(CommandError(502, f"the gpuhub service: {e}"))
            raise
        self.last_report_ok = time.time()
        self.last_error = None
        self.notices = notices
        by_id = {r["id"]: r for r in request_results}
        for r, future in asked:
            if not future.done():
                future.set_result(
                    by_id.get(r.id)
                    or {"id": r.id, "ok": False, "message": "the service did not answer it"}
                )
        return commands

    # -- commands --------------------------------------------------------------------------------

    async def execute(self, command: Command) -> CommandResult:
        handler = {
            protocol.SNAPSHOT: self._snapshot,
            protocol.NOTICE: self._notice,
            protocol.SNAPSHOTS_LIST: self._list,
            protocol.SNAPSHOTS_DELETE: self._delete,
            protocol.SNAPSHOTS_RESTORE_NEXT: self._restore_next,
        }[command.kind]
        try:
            data = await handler(command.args)
        except CommandError as e:
            return CommandResult(command.id, False, str(e), {"status": e.status})
        except Exception as e:
            log.exception("gpuhub: command %s failed", command.kind)
            return CommandResult(command.id, False, f"{type(e).__name__}: {e}", {"status": 500})
        return CommandResult(command.id, True, None, data)

    async def _snapshot(self, args: Mapping[str, Any]) -> dict[str, Any]:
        wait = args.get("wait") is True
        deadline = args.get("deadline_s")
        deadline = float(deadline) if isinstance(deadline, (int, float)) and deadline > 0 else 0.0
        if wait and deadline:
            await self._wait_idle(deadline)
        results = await self.snapshots.snapshot_all(None, False)
        keep = (
            "kernel_id",
            "key",
            "notebook",
            "status",
            "error",
            "snapshot",
            "saved",
            "skipped",
            "bytes",
        )
        entries = [{k: r.get(k) for k in keep if r.get(k) is not None} for r in results]
        ok = all(r["status"] in ("saved", "unsupported") for r in results)
        return {"ok": ok, "snapshots": entries}

    async def _wait_idle(self, deadline: float) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            status = await self.status()
            if not any(k.get("execution_state") == "busy" for k in status.get("kernels") or ()):
                return
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))

    async def _notice(self, args: Mapping[str, Any]) -> dict[str, Any]:
        path = args.get("path")
        text = args.get("text")
        if not isinstance(path, str) or not isinstance(text, str):
            raise CommandError(400, "notice: path and text must be strings")
        path = posixpath.normpath(path.lstrip("/"))
        if path.startswith("..") or path in ("", "."):
            raise CommandError(400, f"notice: not a path in the home folder: {path!r}")
        if len(text.encode()) > protocol.MAX_NOTICE_BYTES:
            raise CommandError(400, "notice: text too long")
        from jupyter_core.utils import ensure_async

        model = {"type": "file", "format": "text", "content": text}
        await ensure_async(self.contents.save(model, path))
        return {"path": path}

    async def _list(self, args: Mapping[str, Any]) -> dict[str, Any]:
        listing = await asyncio.to_thread(self.snapshots.list)
        return {"snapshots": listing[: protocol.MAX_SNAPSHOT_ENTRIES]}

    async def _delete(self, args: Mapping[str, Any]) -> dict[str, Any]:
        key, name = args.get("key"), args.get("name")
        if not isinstance(key, str) or not isinstance(name, str):
            raise CommandError(400, "key and name must be strings")
        await self._files(self.snapshots.delete, key, name)
        return {"key": key, "snapshot": name}

    async def _restore_next(self, args: Mapping[str, Any]) -> dict[str, Any]:
        key, name = args.get("key"), args.get("name")
        if not isinstance(key, str) or (name is not None and not isinstance(name, str)):
            raise CommandError(400, "key must be a string, name a string or null")
        await self._files(self.snapshots.restore_next, key, name)
        return {"key": key, "snapshot": name, "restore_next": name is not None}

    @staticmethod
    async def _files(operation: Any, *args: Any) -> None:
        try:
            await asyncio.to_thread(operation, *args)
        except ValueError as e:
            raise CommandError(400, str(e)) from None
        except FileNotFoundError as e:
            raise CommandError(404, str(e)) from None

    def close(self) -> None:
        self._client.close()


class CommandError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)
