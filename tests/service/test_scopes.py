"""The service's token can do what the service needs and nothing else: it opens no user's
server."""

from __future__ import annotations

import pytest
import requests

from gpuhub.service import scopes

pytestmark = pytest.mark.slow


def call(sh, method: str, path: str, **kwargs) -> requests.Response:
    headers = {"Authorization": f"token {sh.token}"}
    return requests.request(method, f"{sh.hub.api}{path}", headers=headers, timeout=30, **kwargs)


def test_service_token_has_only_its_scopes(service_hub):
    sh = service_hub
    sh.start("scoped-sue", gpus=0)

    me = call(sh, "GET", "/user").json()
    assert me["kind"] == "service" and me["name"] == "gpuhub"
    granted = set(me["scopes"])
    for scope in scopes.scopes():
        assert scope in granted or any(g.startswith(scope + "!") for g in granted), scope
    for scope in (
        "admin:users",
        "admin:servers",
        "admin:server_state",
        "tokens",
        "groups",
        "admin:auth_state",
        "proxy",
        "shutdown",
        "read:tokens",
        "users",
    ):
        assert scope not in granted, scope

    # what it needs
    listing = call(sh, "GET", "/users", params={"state": "ready"})
    assert listing.status_code == 200
    [user] = [u for u in listing.json() if u["name"] == "scoped-sue"]
    server = user["servers"][""]
    assert server["user_options"]["gpus"] == 0 and server["ready"]
    assert "state" not in server, "spawner state needs admin:server_state"
    assert user.get("auth_state") is None
    # the service never reaches a user's server: its token opens none (servers report to it)
    assert not any(g.startswith("access:servers") for g in granted)
    status = requests.get(
        f"{sh.hub.url}{server['url']}api/gpuhub/status",
        headers={"Authorization": f"token {sh.token}"},
        timeout=30,
        allow_redirects=False,
    )
    assert status.status_code in (302, 403), status.status_code

    # what it must not do
    refused = [
        ("POST", "/users/intruder", {}),
        ("DELETE", "/users/scoped-sue", {}),
        ("PATCH", "/users/scoped-sue", {"json": {"admin": True}}),
        ("POST", "/users/scoped-sue/tokens", {"json": {}}),
        ("GET", "/users/scoped-sue/tokens", {}),
        ("POST", "/groups/new-group", {}),
        ("POST", "/groups/staff/users", {"json": {"users": ["scoped-sue"]}}),
        ("GET", "/proxy", {}),
        ("POST", "/shutdown", {}),
        ("GET", "/services", {}),
        ("POST", "/roles", {"json": {}}),
    ]
    for method, path, kwargs in refused:
        r = call(sh, method, path, **kwargs)
        assert r.status_code in (403, 404, 405), f"{method} {path}: {r.status_code} {r.text[:200]}"
        assert r.status_code != 200
    assert sh.hub.request("GET", "/users/intruder").status_code == 404
    assert sh.hub.user("scoped-sue")["admin"] is False
    sh.hub.stop_server("scoped-sue")
