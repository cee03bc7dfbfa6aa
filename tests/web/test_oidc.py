"""Single sign-on end to end: a real OpenID Connect provider process (oidc-provider-mock), the demo
hub configured for it (GPUHUB_DEMO_OIDC_URL), and people logging in through a real browser. The
provider's groups claim becomes JupyterHub groups at each login; its admin group makes hub
admins; the groups decide gpuhub's pages, environments and quotas."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests
from pages_helpers import PREFIX

from gpuhub.oidc import OIDCConfigError, discover, username_from
from gpuhub.testing import RUN_MARKER, Hub, free_port_block, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.browser]

PEOPLE = [
    {"sub": "u-1001", "preferred_username": "olga", "email": "olga@example.org",
     "email_verified": True, "groups": ["hub-admins", "ml-lab"]},
    {"sub": "u-1002", "email": "sam@example.org", "email_verified": True, "groups": ["students"]},
    # at the same provider, claiming olga's name and (unverified) address
    {"sub": "u-666", "preferred_username": "olga", "email": "olga@example.org",
     "email_verified": False, "groups": ["hub-admins"]},
]  # fmt: skip
OLGA, SAM = "olga@example.org", "sam@example.org"


@pytest.fixture(scope="module")
def provider(run_marker, tmp_path_factory):
    port = free_port_block(1)
    log = open(tmp_path_factory.mktemp("oidc") / "provider.log", "w")  # noqa: SIM115
    args = [sys.executable, "-m", "oidc_provider_mock", "--port", str(port)]
    for person in PEOPLE:
        args += ["--user-claims", json.dumps(person)]
    process = subprocess.Popen(
        args,
        env={**os.environ, RUN_MARKER: run_marker},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(url + "/.well-known/openid-configuration", timeout=2).ok
        except requests.RequestException:
            return False

    wait_for(up, timeout=60, interval=0.3, what="the OpenID Connect provider")
    yield url
    process.terminate()
    process.wait(10)
    log.close()


@pytest.fixture(scope="module")
def sso_hub(provider, tmp_path_factory, run_marker):
    hub = Hub(
        tmp_path_factory.mktemp("sso-hub"),
        run_marker,
        env_overrides={
            "GPUHUB_DEMO_OIDC_URL": provider,
            "GPUHUB_DEMO_OIDC_CLIENT_SECRET": "not-so-secret",
            "GPUHUB_DEMO_OIDC_ADMIN_GROUPS": "hub-admins",
            "GPUHUB_DEMO_SERVICE": "managed",
            "GPUHUB_DEMO_GPU_IDLE_TIMEOUT": "100000",
        },
    ).start()
    wait_for(
        lambda: requests.get(f"{hub.url}{PREFIX}health", timeout=5).status_code == 200,
        timeout=60,
        what="the gpuhub service",
    )
    yield hub
    hub.stop()


def sign_in(browser, hub: Hub, sub: str):
    """Log in through the provider: the hub's login button, then the provider's page."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(f"{hub.url}/hub/login")
    page.get_by_role("button", name="Sign in with single sign-on").click()
    page.wait_for_url("**/oauth2/authorize**")
    page.get_by_role("button", name=sub, exact=True).click()
    page.wait_for_url(f"{hub.url}/hub/**")
    return page


def test_discovery_and_user_names():
    with pytest.raises(OIDCConfigError, match="not reachable"):
        discover(f"http://127.0.0.1:{free_port_block(1)}", timeout=2)
    assert username_from(PEOPLE[0]) == OLGA
    for claims in ({"preferred_username": "olga", "sub": "u"}, PEOPLE[2], {}):
        with pytest.raises(ValueError):
            username_from(claims)


def test_login_through_the_provider_groups_and_admins(sso_hub, provider, browser):
    # a students-only environment, as an admin would register it
    from gpuhub.store import Store

    store = Store.at(f"sqlite:///{sso_hub.state_dir / 'gpuhub.sqlite'}")
    store.put_catalog_entry(
        "course",
        {"id": "course", "display_name": "Course kit", "image": "quay.io/gpuhub/pytorch:0.1.0"}
        | {"groups": ["students"], "enabled": True},
        "test",
    )

    olga = sign_in(browser, sso_hub, "u-1001")
    model = sso_hub.user(OLGA)
    assert model["admin"] is True  # in the provider's hub-admins group
    assert sorted(model["groups"]) == ["hub-admins", "ml-lab"]
    olga.goto(f"{sso_hub.url}/hub/home")
    olga.get_by_role("link", name="GPU admin").click()
    olga.wait_for_url(f"**{PREFIX}admin")
    assert olga.get_by_role("heading", name="Every GPU").count() == 1

    sam = sign_in(browser, sso_hub, "u-1002")
    model = sso_hub.user(SAM)
    assert model["admin"] is False and model["groups"] == ["students"]
    sam.goto(f"{sso_hub.url}/hub/spawn")
    assert sam.get_by_label("Course kit").count() == 1  # the group's environment
    sam.goto(f"{sso_hub.url}{PREFIX}")
    assert "(group students)" in sam.locator("#gpuhub-quota").inner_text()  # the group's quota
    assert sam.goto(f"{sso_hub.url}{PREFIX}admin").status == 403

    # the provider moves sam to the GPU admins: the next login says so
    r = requests.put(
        f"{provider}/users/u-1002",
        json={
            "email": SAM,
            "email_verified": True,
            "groups": ["students", "gpuhub-admins"],
        },
        timeout=10,
    )
    assert r.status_code < 300, r.text
    sam.context.clear_cookies()
    sam = sign_in(browser, sso_hub, "u-1002")
    assert sorted(sso_hub.user(SAM)["groups"]) == ["gpuhub-admins", "students"]
    assert sso_hub.user(SAM)["admin"] is False  # a gpuhub admin, not a hub admin
    assert sam.goto(f"{sso_hub.url}{PREFIX}admin").status == 200
    olga.goto(f"{sso_hub.url}/hub/spawn")
    assert olga.get_by_label("Course kit").count() == 0


def test_a_name_claimed_with_an_unverified_address_is_refused(sso_hub, browser):
    """u-666 at the same provider claims olga's preferred_username and her (unverified) e-mail
    address, and is in the provider's admin group: the hub lets them in as nobody."""
    page = sign_in(browser, sso_hub, "u-666")
    assert "login refused: the provider has not verified the e-mail address" in page.content()
    assert sso_hub.request("GET", "/users/olga").status_code == 404
    users = [u["name"] for u in sso_hub.request("GET", "/users").json()]
    assert "u-666" not in users and "olga" not in users
    page.goto(f"{sso_hub.url}/hub/home")
    assert "/hub/login" in page.url  # no session
