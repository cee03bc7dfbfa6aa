"""Where servers report to the service, and how commands reach them (`gpuhub.core.protocol`).

- `ServerAuthenticator`: who sent a report. The report's token is shown to the hub
  (`GET /hub/api/user` with that token alone, never with the service's): its owner must be a user,
  and its scopes must reach the named server of that user (and, by default, this service). The
  answer is cached for a while under a hash of the token.
- `ReportBoard`: the latest checked status of every server, the commands waiting for each, and
  the futures of commands under way. A command is delivered to the server it was sent to, only in
  the answer to that server's own report; a result counts only from that same server.
- `ReportHandler`: `POST api/v1/servers/report`. Authenticates before it reads the body, refuses
  bodies over `protocol.MAX_REPORT_BYTES` unread, answers 400 naming the field for anything the
  parser refuses, and holds the answer up to `wait` seconds until a command comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from ..core import protocol
from ..core.protocol import Command, CommandResult, ProtocolError, Report, ServerStatus
from ..expiring import ExpiringCache
from .refusals import RefusalLimiter, peer_address

log = logging.getLogger("gpuhub.service")

Key = tuple[str, str]  # (user, server name)
SERVER_NAME = re.compile(r"^[^/?#\x00-\x1f]{0,255}$")


class AuthError(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        self.status = status
        #: seconds after which the same request may succeed (a 429's `Retry-After`)
        self.retry_after = retry_after
        super().__init__(message)


@dataclass(frozen=True)
class Identity:
    """Who a token belongs to, as the hub says: a user or a service, and the token's scopes."""

    kind: str
    name: str
    scopes: frozenset[str]

    @property
    def user(self) -> str:
        return self.name


def reaches_server(scopes: Iterable[str], user: str, server: str) -> bool:
    """Whether `scopes` (expanded, as the hub lists them for a token) give access to `user`'s
    server `server`."""
    wanted = {
        "access:servers",
        f"access:servers!user={user}",
        f"access:servers!server={user}/{server}",
    }
    return any(s in wanted for s in scopes)


def reaches_service(scopes: Iterable[str], service: str) -> bool:
    return any(s in ("access:services", f"access:services!service={service}") for s in scopes)


class ServerAuthenticator:
    """Checks report tokens with the hub; answers cached (`ttl` for good ones, `bad_ttl` for
    refused ones), at most `max_entries` of them."""

    def __init__(
        self,
        api_url: str,
        service_name: str,
        *,
        require_service_scope: bool = True,
        ttl: float = 300.0,
        bad_ttl: float = 10.0,
        timeout: float = 10.0,
        max_entries: int = 20000,
        refusals: RefusalLimiter | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.service_name = service_name
        self.require_service_scope = require_service_scope
        self.ttl = ttl
        self.bad_ttl = bad_ttl
        self.timeout = timeout
        self.max_entries = max_entries
        self._cache: ExpiringCache[str, Identity | AuthError] = ExpiringCache(ttl, max_entries)
        #: sources whose unknown tokens are refused without asking the hub, for a while
        self.refusals = refusals if refusals is not None else RefusalLimiter()
        self._client: AsyncHTTPClient | None = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _ask_hub(self, token: str) -> Identity:
        if self._client is None:
            self._client = AsyncHTTPClient(force_instance=True, max_clients=20)
        request = HTTPRequest(
            self.api_url + "/user",
            headers={"Authorization": f"token {token}", "Accept": "application/json"},
            request_timeout=self.timeout,
            connect_timeout=self.timeout,
            follow_redirects=False,
        )
        response = await self._client.fetch(request, raise_error=False)
        if response.code in (401, 403):
            raise AuthError(403, "the hub does not accept this token")
        if response.code != 200:
            raise AuthError(503, f"the hub could not check the token ({response.code})")
        try:
            model = json.loads(response.body or b"{}")
        except ValueError:
            raise AuthError(503, "the hub's answer about the token is not JSON") from None
        kind = model.get("kind") if isinstance(model, dict) else None
        name = model.get("name") if isinstance(model, dict) else None
        scopes = model.get("scopes") if isinstance(model, dict) else None
        if (
            kind not in ("user", "service")
            or not isinstance(name, str)
            or not isinstance(scopes, list)
        ):
            raise AuthError(403, "the hub's answer about the token names no user or service")
        return Identity(kind, name, frozenset(s for s in scopes if isinstance(s, str)))

    async def identify(self, token: str, server: str, source: str | None = None) -> Identity:
        """The user whose server `server` sent `token` (from the address `source`); `AuthError`
        (403) otherwise."""
        found = await self.caller(token, source)
        if found.kind != "user":
            raise AuthError(403, "only a user's server may report")
        if not reaches_server(found.scopes, found.user, server):
            raise AuthError(403, f"this token does not reach the server {found.user}/{server}")
        if self.require_service_scope and not reaches_service(found.scopes, self.service_name):
            raise AuthError(
                403,
                f"this token lacks access:services!service={self.service_name} "
                "(see Spawner.server_token_scopes in docs/security.md)",
            )
        return found

    async def caller(self, token: str, source: str | None = None) -> Identity:
        """Who `token` belongs to (cached); `AuthError` when the hub does not know it, or (429)
        when `source` had too many tokens refused lately to have another one looked up."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(digest)
        if cached is not None:
            found = cached
        else:
            wait = self.refusals.retry_after(source)
            if wait > 0:
                raise AuthError(
                    429,
                    f"too many refused tokens from {source}; try again in {math.ceil(wait)} s",
                    retry_after=math.ceil(wait),
                )
            try:
                found = await self._ask_hub(token)
            except AuthError as e:
                found = e
                if e.status == 403:
                    self.refusals.refused(source)
            except Exception as e:  # the hub unreachable: not cached
                raise AuthError(503, f"the hub could not check the token ({e})") from None
            if not (isinstance(found, AuthError) and found.status >= 500):
                ttl = self.bad_ttl if isinstance(found, AuthError) else self.ttl
                self._cache.put(digest, found, ttl=ttl)
        if isinstance(found, AuthError):
            raise found
        return found


@dataclass(frozen=True)
class ServerReport:
    status: ServerStatus
    received_at: float  # Unix seconds


class CommandTimeout(Exception):
    """The server did not carry the command out in time (it is not reporting, or busy)."""


class ReportBoard:
    """Latest reports, waiting commands and their results, for every server (bounded)."""

    def __init__(self, *, max_per_user: int = 16, max_servers: int = 100000) -> None:
        self.max_per_user = max_per_user
        self.max_servers = max_servers
        self.reports: dict[Key, ServerReport] = {}
        self._pending: dict[Key, list[Command]] = {}
        self._futures: dict[str, tuple[Key, asyncio.Future]] = {}
        self._wake: dict[Key, asyncio.Event] = {}
        self._per_user: dict[str, set[str]] = {}
        self._generation: dict[Key, int] = {}
        self.refused = 0

    # -- reports ---------------------------------------------------------------------------------

    def accept(self, user: str, report: Report, now: float | None = None) -> bool:
        """Keep the report's status and take its results; False when the user already has
        `max_per_user` other servers on the board, or the board is full."""
        key = (user, report.server)
        names = self._per_user.setdefault(user, set())
        if key not in self.reports and (
            len(names) >= self.max_per_user or len(self.reports) >= self.max_servers
        ):
            self.refused += 1
            return False
        names.add(report.server)
        self.reports[key] = ServerReport(report.status, time.time() if now is None else now)
        self._generation[key] = self._generation.get(key, 0) + 1
        for result in report.results:
            self._resolve(key, result)
        return True

    def latest(
        self, key: Key, max_age: float, not_before: float | None = None
    ) -> ServerReport | None:
        """The report of `key` received in the last `max_age` seconds (and not before
        `not_before`, the start of the server's current run), else None."""
        report = self.reports.get(key)
        if report is None:
            return None
        if time.time() - report.received_at > max_age:
            return None
        if not_before is not None and report.received_at < not_before:
            return None
        return report

    def prune(self, keep: Iterable[Key]) -> None:
        """Forget the reports of servers that are not running (the hub's list)."""
        keep = set(keep)
        for key in [k for k in self.reports if k not in keep]:
            del self.reports[key]
            self._generation.pop(key, None)
            names = self._per_user.get(key[0])
            if names is not None:
                names.discard(key[1])
                if not names:
                    del self._per_user[key[0]]

    # -- commands --------------------------------------------------------------------------------

    async def request(
        self, key: Key, kind: str, args: Mapping[str, Any], timeout: float
    ) -> CommandResult:
        """Send a command to the server `key` and wait for its result (`CommandTimeout`)."""
        command = Command(secrets.token_hex(12), kind, dict(args))
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._futures[command.id] = (key, future)
        self._pending.setdefault(key, []).append(command)
        self._event(key).set()
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise CommandTimeout(
                f"the server did not carry out the {kind} within {timeout:g} s"
            ) from None
        finally:
            self._futures.pop(command.id, None)
            pending = self._pending.get(key)
            if pending and command in pending:
                pending.remove(command)
                if not pending:
                    del self._pending[key]

    def _resolve(self, key: Key, result: CommandResult) -> None:
        entry = self._futures.get(result.id)
        if entry is None or entry[0] != key:  # unknown, or another server's command
            return
        if not entry[1].done():
            entry[1].set_result(result)

    def _event(self, key: Key) -> asyncio.Event:
        event = self._wake.get(key)
        if event is None:
            event = self._wake[key] = asyncio.Event()
        return event

    def generation(self, key: Key) -> int:
        """How many reports of `key` were accepted: identifies the latest one."""
        return self._generation.get(key, 0)

    async def commands_for(
        self, key: Key, hold: float, generation: int | None = None
    ) -> list[Command]:
        """The commands waiting for `key` (delivered once), waiting up to `hold` seconds for one.
        A held report that a newer one (`generation`) overtook gets none: they go to the newer."""
        if not self._pending.get(key) and hold > 0:
            event = self._event(key)
            event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), hold)
        if generation is not None and generation != self._generation.get(key):
            return []
        commands = self._pending.pop(key, [])
        if not self._pending.get(key):
            self._wake.pop(key, None)
        return commands

    def close(self) -> None:
        """End every held report (the service stops)."""
        for event in self._wake.values():
            event.set()

    def wake(self, key: Key) -> None:
        """End a held report of `key` (a newer one came)."""
        event = self._wake.get(key)
        if event is not None:
            event.set()


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    return None


@web.stream_request_body
class ReportHandler(web.RequestHandler):
    """`POST <prefix>api/v1/servers/report?server=NAME&wait=SECONDS` (see `core.protocol`)."""

    def initialize(
        self,
        board: ReportBoard,
        auth: ServerAuthenticator,
        max_hold: float,
        requests: Any = None,
    ) -> None:
        self.board = board
        self.auth = auth
        self.max_hold = max_hold
        #: `gpuhub.service.requests.UserRequests`: carries out the user's requests in a report
        #: (for that server only) and gives the server's notices
        self.requests = requests
        self.identity: Identity | None = None
        self.retry_after: int | None = None  # a 429's Retry-After
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False

    def check_xsrf_cookie(self) -> None:  # token-authenticated API, never cookies
        return

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "application/json")
        if status_code == 429 and self.retry_after is not None:
            self.set_header("Retry-After", str(self.retry_after))
        message = self._reason
        exc = kwargs.get("exc_info")
        if exc and isinstance(exc[1], web.HTTPError) and exc[1].log_message:
            message = exc[1].log_message
        self.finish(json.dumps({"status": status_code, "message": message}))

    async def prepare(self) -> None:
        if self.request.method != "POST":
            raise web.HTTPError(405, "only POST")
        # A body over the limit is read and dropped (never parsed), so that a proxy in between
        # passes the 413 on; bodies over the server's own limit end the connection.
        length = self.request.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > protocol.MAX_REPORT_BYTES):
            self.too_large = True
        token = bearer_token(self.request.headers.get("Authorization"))
        if token is None:
            raise web.HTTPError(401, "a report needs the server's token")
        server = self.get_query_argument("server", "")
        if not SERVER_NAME.match(server):
            raise web.HTTPError(400, "server: not a server name")
        try:
            self.identity = await self.auth.identify(token, server, peer_address(self.request))
        except AuthError as e:
            self.retry_after = e.retry_after
            raise web.HTTPError(e.status, str(e)) from None
        self.server_name = server

    def data_received(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.too_large or self.size > protocol.MAX_REPORT_BYTES:
            self.too_large = True
            self.chunks = []
            return
        self.chunks.append(chunk)

    async def post(self) -> None:
        assert self.identity is not None
        if self.too_large:
            raise web.HTTPError(413, f"body: at most {protocol.MAX_REPORT_BYTES} bytes")
        try:
            wait = float(self.get_query_argument("wait", "0"))
        except ValueError:
            raise web.HTTPError(400, "wait: not a number of seconds") from None
        if not 0 <= wait < float("inf"):
            raise web.HTTPError(400, "wait: not a number of seconds")
        try:
            report = protocol.parse_report(b"".join(self.chunks), self.server_name)
        except ProtocolError as e:
            raise web.HTTPError(400, str(e)) from None
        key = (self.identity.user, report.server)
        self.board.wake(key)  # an older report still held ends now
        if not self.board.accept(self.identity.user, report):
            raise web.HTTPError(429, "too many servers of this user report")
        generation = self.board.generation(key)
        results: list[Any] = []
        if report.requests and self.requests is not None:
            # the user's requests act on this server only: the one the token reaches
            results = await self.requests.handle(key[0], key[1], report.requests)
            wait = 0.0
        commands = await self.board.commands_for(key, min(wait, self.max_hold), generation)
        answer: dict[str, Any] = {
            "version": protocol.VERSION,
            "commands": [c.to_json() for c in commands],
            "hold": self.max_hold,
        }
        if self.requests is not None:
            answer["notices"] = self.requests.answer(key)
            answer["request_results"] = [r.to_json() for r in results]
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(answer))

    def on_connection_close(self) -> None:
        # a held report whose server went away: its commands stay for the next report
        return
