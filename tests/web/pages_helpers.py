"""Helpers for the pages' tests: a real hub whose gpuhub service the hub runs (as in the demo),
people logged in through the hub's OAuth like a browser, forms with their XSRF token, hub tokens
for the JSON API, and notebooks with running kernels."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

import requests

from gpuhub.store import Store
from gpuhub.testing import Hub, execute, wait_for

PREFIX = "/services/gpuhub/"
#: a group of the pages' hub with a weekly GPU-hour budget of 0.5 h (tests/web/conftest.py)
BUDGET_GROUP = "gpu-budget"
XSRF = re.compile(r'name="(?:_xsrf" value|gpuhub-xsrf" content)="([^"]+)"')


@dataclass
class PagesHub:
    hub: Hub

    @property
    def url(self) -> str:
        return self.hub.url

    @property
    def store(self) -> Store:
        return Store.at(f"sqlite:///{self.hub.state_dir / 'gpuhub.sqlite'}")

    def page_url(self, path: str = "") -> str:
        return f"{self.hub.url}{PREFIX}{path}"

    # -- people ----------------------------------------------------------------------------------

    def login(self, name: str) -> requests.Session:
        """A browser-like session: logged in to the hub, then to the service (its OAuth)."""
        session = self.hub.login(name)
        r = session.get(self.page_url(), timeout=60)
        assert r.status_code == 200, (r.status_code, r.text[:500])
        assert r.url == self.page_url(), r.url
        return session

    def get(self, session: requests.Session, path: str = "", **kw: Any) -> requests.Response:
        return session.get(self.page_url(path), timeout=60, **kw)

    def post_form(
        self,
        session: requests.Session,
        path: str,
        data: dict[str, Any] | None = None,
        *,
        from_page: str = "",
        xsrf: bool = True,
        **kw: Any,
    ) -> requests.Response:
        """Submit a form of the page at `from_page` (its XSRF token included), not following
        the redirect."""
        data = dict(data or {})
        if xsrf:
            page = self.get(session, from_page)
            match = XSRF.search(page.text)
            assert match, f"no form on {from_page!r}: {page.status_code} {page.text[:300]}"
            data["_xsrf"] = html.unescape(match.group(1))
        return session.post(
            self.page_url(path), data=data, allow_redirects=False, timeout=120, **kw
        )

    def token(self, name: str) -> str:
        """A hub API token of `name` (the user's own permissions)."""
        self.hub.ensure_user(name)
        r = self.hub.request("POST", f"/users/{name}/tokens", json={"note": "pages test"})
        r.raise_for_status()
        return r.json()["token"]

    def api(self, token: str | None, method: str, path: str, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"token {token}"} if token else {}
        return requests.request(
            method, self.page_url(f"api/{path}"), headers=headers, timeout=120, **kw
        )

    def make_group_member(self, name: str, group: str) -> None:
        self.hub.ensure_user(name)
        if self.hub.request("GET", f"/groups/{group}").status_code == 404:
            self.hub.request("POST", f"/groups/{group}").raise_for_status()
        r = self.hub.request("POST", f"/groups/{group}/users", json={"users": [name]})
        r.raise_for_status()

    # -- servers and kernels ---------------------------------------------------------------------

    def start(self, name: str, server: str = "", **options: Any) -> dict[str, Any]:
        r = self.hub.spawn(name, options, server=server)
        assert r.status_code in (201, 202), r.text
        return self.hub.wait_ready(name, server)

    def server_url(self, name: str, server: str = "") -> str:
        model = self.hub.user(name)["servers"][server]
        return f"{self.hub.url}{model['url']}"

    def open_notebook(self, name: str, path: str, server: str = "") -> str:
        """Open `path` as a notebook (a session with a running kernel); the kernel's id."""
        base = self.server_url(name, server)
        headers = {"Authorization": f"token {self.hub.admin_token}"}
        r = requests.post(
            base + "api/sessions",
            headers=headers,
            json={"path": path, "name": path, "type": "notebook", "kernel": {"name": "python3"}},
            timeout=60,
        )
        r.raise_for_status()
        kernel_id = r.json()["kernel"]["id"]

        def idle() -> bool:
            k = requests.get(base + f"api/kernels/{kernel_id}", headers=headers, timeout=30)
            return k.ok and k.json().get("execution_state") == "idle"

        wait_for(idle, timeout=120, interval=0.5, what="the kernel to start")
        return kernel_id

    def run(self, name: str, kernel_id: str, code: str, server: str = "") -> str:
        return execute(self.server_url(name, server), self.hub.admin_token, kernel_id, code)
