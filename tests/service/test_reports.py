"""The report endpoint against a real HTTP hub stand-in for `GET /hub/api/user` (which answers for
a token as JupyterHub does): who may report for which server, bounds, bad input, commands."""

from __future__ import annotations

import asyncio
import json

import pytest
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from gpuhub.core import protocol
from gpuhub.service.refusals import RefusalLimiter
from gpuhub.service.reports import ReportBoard, ReportHandler, ServerAuthenticator

TOKENS = {
    # a server token of ada's default server, with access to the service
    "ada-server": {
        "kind": "user",
        "name": "ada",
        "scopes": [
            "access:servers!server=ada/",
            "users:activity!user=ada",
            "access:services!service=gpuhub",
        ],
    },
    # a server token without access to the service
    "ada-no-service": {"kind": "user", "name": "ada", "scopes": ["access:servers!server=ada/"]},
    # bob's server token
    "bob-server": {
        "kind": "user",
        "name": "bob",
        "scopes": ["access:servers!server=bob/", "access:services!service=gpuhub"],
    },
    "culler": {"kind": "service", "name": "idle-culler", "scopes": ["access:services"]},
}


class UserHandler(web.RequestHandler):
    def get(self) -> None:
        self.application.settings["asked"].append(self.request.headers.get("Authorization"))
        token = (self.request.headers.get("Authorization") or "").partition(" ")[2]
        model = TOKENS.get(token)
        if model is None:
            self.set_status(403)
            self.finish({"status": 403, "message": "not allowed"})
            return
        self.finish(model)


def status(executing: bool = False) -> dict:
    return {
        "version": 1,
        "gpus": [{"uuid": "GPU-1", "state": "idle", "idle_since": "2026-01-01T10:00:00Z"}],
        "kernels": [{"id": "k1", "execution_state": "busy" if executing else "idle"}],
        "external_processes": [],
        "busy": executing,
        "busy_reasons": [],
    }


@pytest.fixture
def env():
    async def make(refusals: RefusalLimiter | None = None):
        board = ReportBoard(max_per_user=2)
        asked: list = []
        hub = web.Application([(r"/hub/api/user", UserHandler)], asked=asked)
        sockets = bind_sockets(0, "127.0.0.1")
        hub_server = HTTPServer(hub)
        hub_server.add_sockets(sockets)
        api = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/hub/api"
        auth = ServerAuthenticator(api, "gpuhub", ttl=60, refusals=refusals)
        app = web.Application(
            [(r"/report", ReportHandler, {"board": board, "auth": auth, "max_hold": 5})]
        )
        sockets2 = bind_sockets(0, "127.0.0.1")
        # as the service's own server: forwarding headers read (for its logs)
        server = HTTPServer(app, xheaders=True, max_body_size=4 * 1024 * 1024)
        server.add_sockets(sockets2)
        base = f"http://127.0.0.1:{sockets2[0].getsockname()[1]}/report"
        return board, asked, base, (hub_server, server)

    return make


async def post(base, token, body, server="", wait=0, raw=None):
    client = AsyncHTTPClient()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"token {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    r = await client.fetch(
        HTTPRequest(
            f"{base}?server={server}&wait={wait}",
            method="POST",
            body=data,
            headers=headers,
            request_timeout=30,
        ),
        raise_error=False,
    )
    return r.code, (json.loads(r.body) if r.body else None)


def test_a_server_reports_with_its_own_token_and_gets_commands(env):
    async def go():
        board, asked, base, servers = await env()
        code, answer = await post(base, "ada-server", {"version": 1, "status": status()})
        assert code == 200 and answer["commands"] == []
        report = board.latest(("ada", ""), 60)
        assert report is not None and not report.status.kernels_executing
        # a command waits for ada's next report, which is held until it comes
        held = asyncio.ensure_future(
            post(base, "ada-server", {"version": 1, "status": status(True)}, wait=5)
        )
        await asyncio.sleep(0.3)
        request = asyncio.ensure_future(board.request(("ada", ""), protocol.SNAPSHOT, {}, 10))
        code, answer = await held
        assert code == 200 and [c["kind"] for c in answer["commands"]] == ["snapshot"]
        command = answer["commands"][0]
        # bob cannot answer ada's command
        result = {"id": command["id"], "ok": True, "data": {"forged": True}}
        code, _ = await post(
            base, "bob-server", {"version": 1, "status": status(), "results": [result]}
        )
        assert code == 200 and not request.done()
        result["data"] = {"ok": True, "snapshots": []}
        await post(base, "ada-server", {"version": 1, "status": status(), "results": [result]})
        done = await request
        assert done.ok and done.data == {"ok": True, "snapshots": []}
        # the token was shown to the hub once (then cached), and only that token
        assert set(asked) <= {"token ada-server", "token bob-server"}
        assert asked.count("token ada-server") == 1
        for s in servers:
            s.stop()

    asyncio.run(go())


def test_reports_that_are_refused(env):
    async def go():
        board, _asked, base, servers = await env()
        ok = {"version": 1, "status": status()}
        # no token, an unknown token, a token of another user's server
        assert (await post(base, None, ok))[0] == 401
        assert (await post(base, "forged", ok))[0] == 403
        code, answer = await post(base, "bob-server", ok, server="")
        assert code == 200  # bob's own default server
        code, answer = await post(base, "ada-server", ok, server="other")
        assert code == 403 and "ada/other" in answer["message"]
        # a token without access to the service, a service's token
        assert (await post(base, "ada-no-service", ok))[0] == 403
        assert (await post(base, "culler", ok))[0] == 403
        # malformed, non-finite, wrong types, oversized: 400/413 naming the field
        code, answer = await post(base, "ada-server", None, raw=b"{not json")
        assert code == 400 and "body" in answer["message"]
        bad = {"version": 1, "status": {**status(), "gpus": "all of them"}}
        code, answer = await post(base, "ada-server", bad)
        assert code == 400 and "status.gpus" in answer["message"]
        raw = json.dumps(ok).replace('"busy": false', '"busy": false, "x": Infinity').encode()
        code, answer = await post(base, "ada-server", None, raw=raw)
        assert code == 400 and "Infinity" in answer["message"]
        idle = {**status()["gpus"][0], "idle_for_s": 1e400}
        code, _ = await post(
            base, "ada-server", {"version": 1, "status": {**status(), "gpus": [idle]}}
        )
        assert code == 400
        huge = {"version": 1, "status": {**status(), "busy_reasons": ["x" * 1000] * 1000}}
        code, _ = await post(base, "ada-server", huge)
        assert code == 413
        many = {
            "version": 1,
            "status": {**status(), "kernels": [{"id": str(i)} for i in range(300)]},
        }
        code, answer = await post(base, "ada-server", many)
        assert code == 400 and "status.kernels" in answer["message"]
        # nothing of these reached the board
        assert board.latest(("ada", ""), 60) is None
        for s in servers:
            s.stop()

    asyncio.run(go())


def test_one_user_cannot_fill_the_board(env):
    async def go():
        _board, _asked, base, servers = await env()
        wide = {
            "kind": "user",
            "name": "eve",
            "scopes": ["access:servers!user=eve", "access:services"],
        }
        TOKENS["eve-user"] = wide
        try:
            ok = {"version": 1, "status": status()}
            codes = [(await post(base, "eve-user", ok, server=f"s{i}"))[0] for i in range(4)]
        finally:
            del TOKENS["eve-user"]
        assert codes == [200, 200, 429, 429]
        for s in servers:
            s.stop()

    asyncio.run(go())


def test_random_tokens_do_not_become_requests_to_the_hub(env):
    """A server spraying made-up tokens gets a few of them looked up, then 429 without the hub
    being asked, while tokens the service already knows keep working."""

    async def go():
        clock = [1000.0]
        limiter = RefusalLimiter(max_refusals=5, window=60.0, clock=lambda: clock[0])
        _board, asked, base, servers = await env(limiter)
        ok = {"version": 1, "status": status()}
        assert (await post(base, "ada-server", ok))[0] == 200  # known from now on
        asked.clear()
        codes = [(await post(base, f"guess-{i}", ok))[0] for i in range(20)]
        assert codes[:5] == [403] * 5 and set(codes[5:]) == {429}
        assert len(asked) == 5  # the hub heard of 5 guesses, not 20
        client = AsyncHTTPClient()
        r = await client.fetch(
            HTTPRequest(
                f"{base}?server=&wait=0",
                method="POST",
                body=json.dumps(ok).encode(),
                headers={"Authorization": "token guess-x"},
            ),
            raise_error=False,
        )
        assert r.code == 429 and 0 < int(r.headers["Retry-After"]) <= 60
        assert "too many refused tokens" in json.loads(r.body)["message"]
        # a sender cannot pose as new addresses: forwarding headers do not count
        for i in range(5):
            forged = {"X-Forwarded-For": f"10.9.9.{i}", "X-Real-Ip": f"10.8.8.{i}"}
            r = await client.fetch(
                HTTPRequest(
                    f"{base}?server=&wait=0",
                    method="POST",
                    body=json.dumps(ok).encode(),
                    headers={"Authorization": f"token forged-{i}", **forged},
                ),
                raise_error=False,
            )
            assert r.code == 429
        assert len(asked) == 5
        # the known token still reports, without asking the hub
        assert (await post(base, "ada-server", ok))[0] == 200
        # a real token first seen now waits with the guesses (same address) ...
        assert (await post(base, "bob-server", ok))[0] == 429
        # ... until the window has passed
        clock[0] += 61
        assert (await post(base, "bob-server", ok))[0] == 200
        for s in servers:
            s.stop()

    asyncio.run(go())
