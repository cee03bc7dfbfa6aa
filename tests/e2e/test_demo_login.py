"""The demo's login fails closed: with an empty GPUHUB_DEMO_PASSWORD nobody logs in (an empty
password is not a password), and the hub says so when it starts."""

from __future__ import annotations

import asyncio

import requests

from gpuhub.demo import DemoAuthenticator
from gpuhub.testing import Hub


def test_an_empty_demo_password_refuses_every_login(tmp_path, run_marker):
    hub = Hub(tmp_path, run_marker, env_overrides={"GPUHUB_DEMO_PASSWORD": ""}).start()
    try:
        for password in ("", " ", hub.password):
            session = requests.Session()
            session.get(f"{hub.url}/hub/login", timeout=30)
            r = session.post(
                f"{hub.url}/hub/login",
                data={
                    "username": "mallory",
                    "password": password,
                    "_xsrf": session.cookies.get("_xsrf", ""),
                },
                timeout=30,
            )
            assert r.status_code == 403, (password, r.status_code)
            assert "jupyterhub-session-id" not in session.cookies
            assert hub.request("GET", "/users/mallory").status_code == 404
        log = hub.log()
        assert "GPUHUB_DEMO_PASSWORD is empty: every login is refused" in log
        assert "DemoAuthenticator has no password (GPUHUB_DEMO_PASSWORD is empty)" in log
    finally:
        hub.stop()


def test_the_authenticator_itself_fails_closed():
    empty = DemoAuthenticator(password="")
    assert asyncio.run(empty.authenticate(None, {"username": "ada", "password": ""})) is None
    demo = DemoAuthenticator(password="s3cret")
    assert asyncio.run(demo.authenticate(None, {"username": "ada", "password": ""})) is None
    user = asyncio.run(demo.authenticate(None, {"username": "ada", "password": "s3cret"}))
    assert user["name"] == "ada"
