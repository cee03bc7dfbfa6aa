"""The one client of the JupyterHub REST API that the gpuhub service uses. It never calls a
single-user server: servers report to the service (`gpuhub.core.protocol`), so the service's token
never travels to one.

- Lists users with ready servers page by page (`GET /users?state=ready`, JupyterHub 2+
  pagination: `Accept: application/jupyterhub-pagination+json`); after the first page, the rest
  are fetched concurrently.
- Bounds concurrency: at most `concurrency` requests to the hub at once.
- Every request has a connect and a request timeout. Requests that are safe to repeat (GET,
  DELETE of a server) are retried on connection errors, timeouts and 5xx answers, with
  exponential backoff; a start (POST) is never repeated blindly.

Errors end as `HubAPIError` carrying the status (599 for connection errors and timeouts) and the
hub's message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

log = logging.getLogger("gpuhub.service")

PAGINATION = "application/jupyterhub-pagination+json"


class HubAPIError(Exception):
    """A request to the hub or to a server that did not succeed."""

    def __init__(self, method: str, url: str, status: int, message: str) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.message = message
        super().__init__(f"{method} {url}: {status} {message}")

    @property
    def retriable(self) -> bool:
        return self.status >= 500 or self.status == 429


@dataclass(frozen=True)
class Response:
    status: int
    body: Any  # parsed JSON, or None for an empty body
    headers: Mapping[str, str]


def _message(response: HTTPResponse | None, error: Exception) -> str:
    if response is not None and response.body:
        text = response.body.decode("utf-8", "replace")
        try:
            data = json.loads(text)
        except ValueError:
            return text[:300]
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])[:300]
        return text[:300]
    return str(error)[:300]


def _parse(body: bytes) -> Any:
    if not body or not body.strip():
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


class HubClient:
    """Talks to the hub's REST API at `api_url` with the service's `token`."""

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 10,
        page_size: int = 200,
        user_agent: str = "gpuhub-service",
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.concurrency = max(1, concurrency)
        self.page_size = max(1, page_size)
        self.user_agent = user_agent
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: AsyncHTTPClient | None = None
        self._hub_slots: asyncio.Semaphore | None = None

    # -- plumbing --------------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        """Clients and semaphores belong to one event loop; make them for the running one."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self.close()
            self._loop = loop
            self._client = AsyncHTTPClient(force_instance=True, max_clients=self.concurrency)
            self._hub_slots = asyncio.Semaphore(self.concurrency)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None
        self._loop = None

    async def _fetch(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        timeout: float | None = None,
        retries: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        self._ensure_loop()
        assert self._client is not None and self._hub_slots
        slots = self._hub_slots
        attempts = 1 + (self.retries if retries is None else retries)
        payload = None if body is None else json.dumps(body)
        error: HubAPIError | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            request = HTTPRequest(
                url,
                method=method,
                headers={
                    "Authorization": f"token {self.token}",
                    "Accept": "application/json",
                    **({"Content-Type": "application/json"} if payload is not None else {}),
                    **(headers or {}),
                },
                body=payload,
                connect_timeout=self.connect_timeout,
                request_timeout=timeout or self.timeout,
                allow_nonstandard_methods=True,
                follow_redirects=False,
                user_agent=self.user_agent,
            )
            async with slots:
                try:
                    response = await self._client.fetch(request, raise_error=False)
                except Exception as e:  # connection refused, DNS, TLS ...
                    error = HubAPIError(method, url, 599, f"{type(e).__name__}: {e}")
                    log.debug("gpuhub: %s (attempt %d of %d)", error, attempt + 1, attempts)
                    continue
            if response.code < 400 and response.error is None:
                return Response(response.code, _parse(response.body), dict(response.headers))
            if response.code == 599 or isinstance(response.error, HTTPClientError):
                status = response.code
            else:
                status = response.code or 599
            error = HubAPIError(method, url, status, _message(response, response.error))
            if not error.retriable:
                raise error
            log.debug("gpuhub: %s (attempt %d of %d)", error, attempt + 1, attempts)
        assert error is not None
        raise error

    def hub_url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        url = f"{self.api_url}/{path.lstrip('/')}"
        if params:
            url += "?" + urlencode(params)
        return url

    async def api(self, method: str, path: str, **kwargs: Any) -> Response:
        params = kwargs.pop("params", None)
        return await self._fetch(method, self.hub_url(path, params), **kwargs)

    # -- users and servers -----------------------------------------------------------------------

    async def ready_users(self) -> list[dict[str, Any]]:
        """Every user with at least one ready server, with their servers (paginated)."""
        first = await self.api(
            "GET",
            "/users",
            params={"state": "ready", "offset": 0, "limit": self.page_size},
            headers={"Accept": PAGINATION},
        )
        if isinstance(first.body, list):  # a hub without pagination
            return first.body
        if not isinstance(first.body, dict) or not isinstance(first.body.get("items"), list):
            raise HubAPIError("GET", self.hub_url("/users"), 502, "unexpected user list")
        items: list[dict[str, Any]] = list(first.body["items"])
        page = first.body.get("_pagination") or {}
        limit = int(page.get("limit") or len(items) or self.page_size)
        total = int(page.get("total") or len(items))
        if page.get("next") and limit > 0:
            offsets = range(int(page.get("offset") or 0) + limit, total, limit)
            pages = await asyncio.gather(
                *(
                    self.api(
                        "GET",
                        "/users",
                        params={"state": "ready", "offset": o, "limit": limit},
                        headers={"Accept": PAGINATION},
                    )
                    for o in offsets
                )
            )
            for response in pages:
                body = response.body if isinstance(response.body, dict) else {}
                items.extend(body.get("items") or [])
        seen: dict[str, dict[str, Any]] = {}
        for user in items:  # a user may shift between pages while they are read
            if isinstance(user, dict) and isinstance(user.get("name"), str):
                seen[user["name"]] = user
        return list(seen.values())

    @staticmethod
    def server_path(user: str, server: str) -> str:
        return f"/users/{quote(user, safe='')}/servers/{quote(server, safe='')}"

    async def user(self, name: str) -> dict[str, Any] | None:
        try:
            response = await self.api("GET", f"/users/{quote(name, safe='')}")
        except HubAPIError as e:
            if e.status == 404:
                return None
            raise
        return response.body if isinstance(response.body, dict) else None

    async def server_model(self, user: str, server: str) -> dict[str, Any] | None:
        """The server's model, or None when the hub runs no such server."""
        model = await self.user(user)
        if model is None:
            return None
        servers = model.get("servers") or {}
        return servers.get(server)

    async def stop_server(self, user: str, server: str) -> int:
        """Ask the hub to stop the server: 204 stopped, 202 stopping; 404-like: not running."""
        try:
            response = await self.api("DELETE", self.server_path(user, server))
        except HubAPIError as e:
            if e.status == 404 or (e.status == 400 and "not running" in e.message.lower()):
                return 204
            raise
        return response.status

    async def start_server(self, user: str, server: str, user_options: Mapping[str, Any]) -> int:
        """Ask the hub to start the server with `user_options`: 201 started, 202 starting."""
        response = await self.api(
            "POST",
            self.server_path(user, server),
            body={"user_options": dict(user_options)},
            retries=0,
            timeout=max(self.timeout, 30.0),
        )
        return response.status

    async def wait_for_server(
        self, user: str, server: str, want: str, timeout: float, interval: float = 0.5
    ) -> dict[str, Any] | None:
        """Wait until the server is `want` ("stopped" or "ready"); returns its last model.

        Raises `TimeoutError` after `timeout` seconds, `RuntimeError` when a start ends
        without the server running.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        model: dict[str, Any] | None = None
        while True:
            try:
                model = await self.server_model(user, server)
            except HubAPIError as e:
                log.info("gpuhub: waiting for %s/%s: %s", user, server, e)
            else:
                if want == "stopped" and model is None:
                    return None
                if want == "ready":
                    if model is not None and model.get("ready"):
                        return model
                    if model is None or not model.get("pending"):
                        raise RuntimeError(f"the server of {user} did not start: {model}")
            if loop.time() >= deadline:
                raise TimeoutError(f"{user}/{server} not {want} after {timeout:.0f} s")
            await asyncio.sleep(interval)
