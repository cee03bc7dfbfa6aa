"""gpuhub's pages and their JSON API against a real hub and the real service (run by the hub):
who may see what, CSRF, the environment catalogue at runtime, group quotas, registering users."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PYTORCH_PYTHON = str(Path(__file__).resolve().parents[2] / ".envs" / "pytorch" / "bin" / "python")
HOSTILE = "<img src=x onerror=alert(1)>"


def test_pages_need_the_hub_login_and_the_api_a_token(pages):
    import requests

    r = requests.get(pages.page_url(), allow_redirects=False, timeout=30)
    assert r.status_code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"]
    r = pages.api(None, "GET", "me")
    assert r.status_code == 403 and r.json()["status"] == 403
    r = pages.api("not-a-token", "GET", "me")
    assert r.status_code == 403


def test_a_non_admin_is_refused_on_admin_pages_and_api(pages):
    ada = pages.login("ada")
    for path in ("admin", "admin/environments", "admin/quotas", "admin/users"):
        r = pages.get(ada, path)
        assert r.status_code == 403, path
        assert "This page is for gpuhub admins." in r.text
    # a form posted anyway (with a valid XSRF token from ada's own page)
    r = pages.post_form(
        ada, "admin/release", {"user": "bob", "server": "", "reason": "x"}, from_page=""
    )
    assert r.status_code == 403
    token = pages.token("ada")
    for method, path, body in [
        ("GET", "admin/gpus", None),
        ("GET", "admin/queue", None),
        ("GET", "admin/actions", None),
        ("GET", "admin/environments", None),
        ("POST", "admin/environments", {"id": "evil", "image": "quay.io/x/y:1"}),
        ("PUT", "admin/quotas/researchers", {"max_gpus": 100}),
        ("POST", "admin/release", {"user": "bob", "reason": "x"}),
        ("POST", "admin/users/import", None),
    ]:
        r = pages.api(token, method, path, json=body)
        assert r.status_code == 403, (method, path, r.text)
        assert r.headers["Content-Type"].startswith("application/json")
    assert pages.store.catalog_entries() == []
    assert pages.api(token, "GET", "me").status_code == 200


def test_user_api_shows_quota_and_an_empty_history(pages):
    pages.hub.login("student-lin")  # the demo's login puts students in their group
    token = pages.token("student-lin")
    me = pages.api(token, "GET", "me").json()
    assert me["user"] == "student-lin" and me["groups"] == ["students"]
    assert me["quota"]["gpus"] == {"used": 0, "limit": 1, "source": "group students", "full": False}
    assert me["servers"] == [] and me["queue"] == [] and me["history"] == []
    # no server runs: the demo's service reads the homes itself
    assert me["snapshots"] == {"available": True, "source": "home", "items": [], "note": ""}


def test_forms_and_cookie_api_calls_need_the_xsrf_token(pages):
    grace = pages.login("admin-grace")
    r = pages.post_form(
        grace, "admin/quotas", {"group": "nope", "max_gpus": "1", "max_servers": ""}, xsrf=False
    )
    assert r.status_code == 403
    r = grace.put(pages.page_url("api/admin/quotas/nope"), json={"max_gpus": 1}, timeout=30)
    assert r.status_code == 403
    assert all(q.group != "nope" for q in pages.store.group_quotas())
    r = pages.post_form(
        grace,
        "admin/quotas",
        {"group": "nope", "max_gpus": "1", "max_servers": ""},
        from_page="admin/quotas",
    )
    assert r.status_code == 302, r.text
    assert [q.max_gpus for q in pages.store.group_quotas() if q.group == "nope"] == [1]
    pages.store.delete_group_quota("nope")


def test_admin_manages_environments_and_the_spawn_form_follows(pages):
    grace = pages.login("admin-grace")  # a hub admin
    lin = pages.hub.login("student-lin")

    # validation: the field is named, nothing is stored, the form keeps what was typed
    bad = {
        "mode": "create",
        "id": "jax",
        "display_name": "JAX",
        "image": "evil.example.com/miner:latest",
        "interfaces": ["jupyterlab"],
    }
    r = pages.post_form(grace, "admin/environments", bad, from_page="admin/environments/new")
    assert r.status_code == 400
    assert "registry &#39;evil.example.com&#39; is not allowed" in r.text
    assert 'value="evil.example.com/miner:latest"' in r.text
    assert pages.store.catalog_entries() == []

    # a new environment, with a hostile name, for the students only
    good = {
        **bad,
        "image": "quay.io/gpuhub/jax:0.4",
        "display_name": HOSTILE,
        "description": "JAX <b>with</b> XLA",
        "local_python": PYTORCH_PYTHON,
        "groups": "students",
        "enabled": "on",
    }
    r = pages.post_form(grace, "admin/environments", good, from_page="admin/environments/new")
    assert r.status_code == 302, r.text
    listing = pages.get(grace, "admin/environments").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in listing and HOSTILE not in listing

    # the spawn page shows it to a student at once (no hub restart), as text
    spawn = lin.get(f"{pages.url}/hub/spawn", timeout=60).text
    assert 'id="environment-jax"' in spawn
    assert "&lt;img src=x onerror=alert(1)&gt;" in spawn and HOSTILE not in spawn
    assert "JAX &lt;b&gt;with&lt;/b&gt; XLA" in spawn
    # ... and not to someone outside the group
    ada_spawn = pages.hub.login("ada").get(f"{pages.url}/hub/spawn", timeout=60).text
    assert 'id="environment-jax"' not in ada_spawn

    # creating it twice is a conflict; the JSON API says the same as the page
    token = pages.token("admin-grace")
    r = pages.api(
        token, "POST", "admin/environments", json={"id": "jax", "image": "quay.io/gpuhub/x"}
    )
    assert r.status_code == 409 and "exists already" in r.json()["message"]
    r = pages.api(token, "PUT", "admin/environments/jax", json={"image": "not an image"})
    assert r.status_code == 400 and r.json()["message"].startswith("image: ")
    r = pages.api(token, "GET", "admin/environments/jax")
    assert r.json()["display_name"] == HOSTILE and r.json()["groups"] == ["students"]

    # disabled: gone from the spawn page, and a spawn asking for it is refused naming the field
    r = pages.post_form(grace, "admin/environments/jax/disable", from_page="admin/environments")
    assert r.status_code == 302
    assert 'id="environment-jax"' not in lin.get(f"{pages.url}/hub/spawn", timeout=60).text
    r = pages.hub.spawn("student-lin", {"environment": "jax"})
    assert r.status_code == 400 and "environment" in r.json()["message"]

    # a file environment changed here, then back to the file
    r = pages.api(token, "POST", "admin/environments/tensorflow/disable")
    assert r.status_code == 200 and r.json()["enabled"] is False
    envs = {e["id"]: e for e in pages.api(token, "GET", "admin/environments").json()}
    assert envs["tensorflow"]["origin"] == "changed here" and not envs["tensorflow"]["enabled"]
    assert 'id="environment-tensorflow"' not in lin.get(f"{pages.url}/hub/spawn", timeout=60).text
    assert pages.api(token, "DELETE", "admin/environments/tensorflow").status_code == 204
    assert 'id="environment-tensorflow"' in lin.get(f"{pages.url}/hub/spawn", timeout=60).text
    assert pages.api(token, "DELETE", "admin/environments/tensorflow").status_code == 404

    # removing the added one
    r = pages.post_form(grace, "admin/environments/jax/reset", from_page="admin/environments")
    assert r.status_code == 302
    assert pages.api(token, "GET", "admin/environments/jax").status_code == 404


def test_a_gpuhub_admin_cannot_make_servers_run_what_the_site_did_not_choose(pages):
    """A gpuhub admin (below a hub admin) tries to make every user's next server run their own
    image, interpreter or environment variables, or to replace the file's default environment."""
    oscar = pages.hub.login("ops-oscar")  # (the demo's login sets groups: admin group after)
    pages.make_group_member("ops-oscar", "gpuhub-admins")
    token = pages.token("ops-oscar")
    attempts = [
        ("POST", "admin/environments", {"id": "x", "image": "docker.io/evil/miner:1"}, "image"),
        ("POST", "admin/environments", {"id": "x", "image": "quay.io/evil/miner:1"}, "image"),
        ("POST", "admin/environments", {"id": "x", "image": "ghcr.io/evil/miner:1"}, "image"),
        ("POST", "admin/environments", {"id": "x", "local": {"python": "/bin/sh"}}, "local.python"),
        (
            "POST",
            "admin/environments",
            {"id": "x", "local": {"python": PYTORCH_PYTHON, "env": {"LD_PRELOAD": "/tmp/e.so"}}},
            "local.env",
        ),
        ("PUT", "admin/environments/pytorch", {"image": "quay.io/gpuhub/evil:1"}, "id"),
        ("PUT", "admin/environments/pytorch", {"local": {"python": PYTORCH_PYTHON}}, "id"),
    ]
    for method, path, body, field in attempts:
        r = pages.api(token, method, path, json=body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["message"].startswith(f"{field}: "), (body, r.json())
    assert pages.store.catalog_entries() == []
    # the page says where images and interpreters may come from
    form = pages.get(oscar, "admin/environments/new").text
    assert "Allowed registries: quay.io/gpuhub, nvcr.io/nvidia." in form
    assert f"<code>{os.path.normpath(PYTORCH_PYTHON)}</code>" in form
    # what is allowed: the site's registry, the file's interpreter
    ok = {"id": "x", "image": "quay.io/gpuhub/x:1", "local": {"python": PYTORCH_PYTHON}}
    r = pages.api(token, "POST", "admin/environments", json=ok)
    assert r.status_code == 201, r.text
    assert pages.api(token, "DELETE", "admin/environments/x").status_code == 204


def test_a_gpuhub_admin_group_member_manages_but_cannot_register_users(pages):
    # (the demo's login sets groups from the name: the admin group is added after it)
    olga = pages.hub.login("ops-olga")
    pages.make_group_member("ops-olga", "gpuhub-admins")
    assert pages.get(olga, "admin").status_code == 200
    assert pages.get(olga, "admin/environments").status_code == 200
    # registering users takes the hub's own admin rights, which olga does not have
    r = pages.post_form(
        olga, "admin/users", {"text": "username,groups\nzed,zoo\n"}, from_page="admin/users"
    )
    assert r.status_code == 403 and "admin rights" in r.text
    assert pages.hub.request("GET", "/users/zed").status_code == 404


def test_group_quota_edited_at_runtime_applies_to_the_next_spawn(pages):
    grace = pages.login("admin-grace")
    r = pages.post_form(
        grace,
        "admin/quotas",
        {"group": "researchers", "max_gpus": "lots", "max_servers": ""},
        from_page="admin/quotas",
    )
    assert r.status_code == 400 and "max_gpus" in r.text
    r = pages.post_form(
        grace,
        "admin/quotas",
        {"group": "researchers", "max_gpus": "0", "max_servers": ""},
        from_page="admin/quotas",
    )
    assert r.status_code == 302
    quotas = pages.api(pages.token("admin-grace"), "GET", "admin/quotas").json()
    [researchers] = [q for q in quotas["groups"] if q["group"] == "researchers"]
    assert researchers["max_gpus"] == 0 and researchers["configured"]["max_gpus"] == 2
    pages.hub.login("quentin")  # a researcher (the demo's default group)
    r = pages.hub.spawn("quentin", {"gpus": 1})
    if r.status_code in (201, 202):
        pages.hub.stop_server("quentin")
    assert r.status_code == 403 and "allowed to group researchers" in r.json()["message"]
    r = pages.post_form(
        grace,
        "admin/quotas",
        {"group": "researchers", "action": "reset"},
        from_page="admin/quotas",
    )
    assert r.status_code == 302
    assert all(q.group != "researchers" for q in pages.store.group_quotas())


def pages_tokens(pages, name: str) -> list[dict]:
    """`name`'s OAuth tokens for the pages (the hub's token list says their scopes)."""
    tokens = pages.hub.request("GET", f"/users/{name}/tokens").json()["api_tokens"]
    return [t for t in tokens if (t.get("oauth_client") or "").endswith("gpuhub")]


def allow_registering(pages, session) -> None:
    r = pages.get(session, "admin/users/authorize")  # the hub's OAuth again, with more scopes
    assert r.status_code == 200 and r.url == pages.page_url("admin/users"), r.url
    assert "carries your hub admin rights for registering users" in r.text


def test_a_hub_admin_token_with_few_scopes_is_no_gpuhub_admin(pages):
    pages.hub.login("admin-hal")
    assert pages.hub.user("admin-hal")["admin"] is True
    r = pages.hub.request(
        "POST",
        "/users/admin-hal/tokens",
        json={"note": "metrics script", "scopes": ["read:metrics", "access:services"]},
    )
    r.raise_for_status()
    narrow = r.json()["token"]
    for method, path in (("GET", "admin/gpus"), ("GET", "admin/environments")):
        r = pages.api(narrow, method, path)
        assert r.status_code == 403, (path, r.text)
    r = pages.api(narrow, "PUT", "admin/quotas/students", json={"max_gpus": 9})
    assert r.status_code == 403
    assert pages.api(narrow, "GET", "me").json()["user"] == "admin-hal"
    # the same person with a token that carries their rights is one
    assert pages.api(pages.token("admin-hal"), "GET", "admin/gpus").status_code == 200


def test_the_pages_ask_for_the_fewest_scopes_and_more_only_to_register(pages):
    hal = pages.login("admin-hal")  # a hub admin opens the pages
    assert pages.get(hal, "admin").status_code == 200  # a gpuhub admin
    [token] = pages_tokens(pages, "admin-hal")
    assert "admin-ui" in token["scopes"]
    assert not {"admin:users", "admin:groups", "groups", "tokens"} & set(token["scopes"]), token
    page = pages.get(hal, "admin/users").text
    assert "Allow registering users" in page
    r = pages.post_form(
        hal, "admin/users", {"text": "username\nnew-zed\n"}, from_page="admin/users"
    )
    assert r.status_code == 403 and "does not carry them" in r.text
    assert pages.hub.request("GET", "/users/new-zed").status_code == 404

    allow_registering(pages, hal)
    scopes = set().union(*(t["scopes"] for t in pages_tokens(pages, "admin-hal")))
    assert {"admin:users", "admin:groups", "groups"} <= scopes
    # a gpuhub admin who is no hub admin asks and gets nothing more
    otto = pages.hub.login("ops-otto")  # (the demo's login sets groups: admin group after)
    pages.make_group_member("ops-otto", "gpuhub-admins")
    r = pages.get(otto, "admin/users/authorize")
    assert r.status_code == 200 and "Allow registering users" in r.text
    assert not any("admin:users" in t["scopes"] for t in pages_tokens(pages, "ops-otto"))


def test_csv_import_into_a_privileged_group_needs_a_confirmation(pages, tmp_path):
    grace = pages.login("admin-grace")
    allow_registering(pages, grace)
    csv = "username,groups\npriv-pat,gpuhub-admins lab-p\n"
    r = pages.post_form(grace, "admin/users", {"text": csv}, from_page="admin/users")
    assert r.status_code == 400
    assert (
        "privileged groups: gpuhub-admins (bound to the hub role &#39;gpuhub-admins&#39;)" in r.text
    )
    assert pages.hub.request("GET", "/users/priv-pat").status_code == 404
    # a dry run says so without refusing
    form = {"text": csv, "dry_run": "on"}
    r = pages.post_form(grace, "admin/users", form, from_page="admin/users")
    assert r.status_code == 200 and 'id="gpuhub-privileged-groups"' in r.text
    # the API: refused, naming the group; confirmed: done
    token = pages.token("admin-grace")
    r = pages.api(token, "POST", "admin/users/import", data=csv)
    assert r.status_code == 400 and r.json()["message"].startswith("groups: ")
    assert r.json()["privileged_groups"] == {
        "gpuhub-admins": "bound to the hub role 'gpuhub-admins'"
    }
    assert pages.hub.request("GET", "/users/priv-pat").status_code == 404
    form = {"text": csv, "allow_privileged_groups": "on"}
    r = pages.post_form(grace, "admin/users", form, from_page="admin/users")
    assert r.status_code == 200, r.text
    assert "priv-pat" in pages.hub.request("GET", "/groups/gpuhub-admins").json()["users"]
    pages.hub.request("DELETE", "/groups/gpuhub-admins/users", json={"users": ["priv-pat"]})
    # the shell says the same, and takes --allow-privileged-groups
    path = tmp_path / "admins.csv"
    path.write_text("username,groups\npriv-quin,gpuhub-admins\n")
    env = {
        **os.environ,
        "JUPYTERHUB_API_TOKEN": pages.hub.admin_token,
        "JUPYTERHUB_API_URL": pages.hub.api,
    }
    command = [sys.executable, "-m", "gpuhub.cli", "users", "import", str(path)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "privileged groups: gpuhub-admins" in out.stderr, out
    assert pages.hub.request("GET", "/users/priv-quin").status_code == 404
    out = subprocess.run(
        [*command, "--allow-privileged-groups"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "privileged group gpuhub-admins" in out.stdout, out
    pages.hub.request("DELETE", "/groups/gpuhub-admins/users", json={"users": ["priv-quin"]})


def test_csv_registration_on_the_page_through_the_api_and_from_the_shell(pages, tmp_path):
    grace = pages.login("admin-grace")
    allow_registering(pages, grace)
    # bad lines: every one reported, nothing created
    r = pages.post_form(
        grace,
        "admin/users",
        {"text": "username,groups\nnew-ann,lab-a\nbad name,lab-a\nnew-ann,lab-b\n"},
        from_page="admin/users",
    )
    assert r.status_code == 400
    assert "line 3: username: &#39;bad name&#39; is not a user name" in r.text
    assert "line 4: username: &#39;new-ann&#39; is already on line 2" in r.text
    assert pages.hub.request("GET", "/users/new-ann").status_code == 404

    # an upload: users and groups created, the page says what changed
    csv = "username,groups\nnew-ann,lab-a lab-b\nnew-bo,lab-b\nada,lab-a\n"
    r = pages.post_form(
        grace,
        "admin/users",
        {},
        files={"csv": ("people.csv", csv.encode(), "text/csv")},
        from_page="admin/users",
    )
    assert r.status_code == 200, r.text
    assert "created 2 user(s) and 2 group(s), added 4 group membership(s)" in r.text, r.text[-3000:]
    groups = {
        g: sorted(pages.hub.request("GET", f"/groups/{g}").json()["users"])
        for g in ("lab-a", "lab-b")
    }
    assert groups == {"lab-a": ["ada", "new-ann"], "lab-b": ["new-ann", "new-bo"]}

    # the JSON API: a dry run changes nothing; the same file again changes nothing either
    token = pages.token("admin-grace")
    more = "username,groups\nnew-cy,lab-c\nnew-ann,lab-a\n"
    r = pages.api(token, "POST", "admin/users/import?dry_run=1", data=more)
    assert r.status_code == 200 and r.json()["create_users"] == ["new-cy"]
    assert r.json()["summary"].startswith("would create 1 user(s)")
    assert pages.hub.request("GET", "/users/new-cy").status_code == 404
    r = pages.api(token, "POST", "admin/users/import", data=csv)
    assert r.json()["create_users"] == [] and r.json()["add_members"] == {}
    r = pages.api(token, "POST", "admin/users/import", data="colour\nred\n")
    assert r.status_code == 400 and r.json()["errors"][0]["line"] == 1

    # from the shell, with an admin's token
    path = tmp_path / "more.csv"
    path.write_text(more)
    env = {**os.environ, "JUPYTERHUB_API_TOKEN": pages.hub.admin_token}
    out = subprocess.run(
        [sys.executable, "-m", "gpuhub.cli", "users", "import", str(path), "--json"],
        env={**env, "JUPYTERHUB_API_URL": pages.hub.api},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["create_users"] == ["new-cy"]
    assert pages.hub.request("GET", "/groups/lab-c").json()["users"] == ["new-cy"]
    bad = tmp_path / "bad.csv"
    bad.write_text("username\nx y\n")
    out = subprocess.run(
        [sys.executable, "-m", "gpuhub.cli", "users", "import", str(bad)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "line 2: username" in out.stderr


@pytest.mark.slow
def test_user_sees_gpu_admin_releases_it_with_a_reason_user_sees_why(pages):
    name = "ada"
    pages.start(name, gpus=1, environment="pytorch")
    kernel = pages.open_notebook(name, "analysis.ipynb")
    pages.run(name, kernel, "weights = [1, 2, 3]")
    ada_token = pages.token(name)

    def my_server():
        [server] = pages.api(ada_token, "GET", "me").json()["servers"]
        return server

    server = my_server()
    assert server["state"] == "ready" and server["gpus_held"] == 1
    [gpu] = server["gpus"]
    assert gpu["simulated"] and "simulated" in gpu["name"].lower()
    ada = pages.login(name)
    page = pages.get(ada).text
    assert gpu["name"] in page and "Give me a GPU again" not in page

    # the admin sees the GPU held by ada and releases it with a reason
    grace = pages.login("admin-grace")
    admin_page = pages.get(grace, "admin").text
    assert "<svg" in admin_page and ">ada<" in admin_page
    gpus = pages.api(pages.token("admin-grace"), "GET", "admin/gpus").json()
    assert [g["holder_label"] for g in gpus if g["holder"]] == ["ada"]
    r = pages.post_form(
        grace, "admin/release", {"user": name, "server": "", "reason": ""}, from_page="admin"
    )
    assert r.status_code == 302  # no reason: refused (flash)
    assert "say why" in pages.get(grace, "admin").text
    reason = "node maintenance at 14:00 <b>today</b>"
    r = pages.post_form(
        grace, "admin/release", {"user": name, "server": "", "reason": reason}, from_page="admin"
    )
    assert r.status_code == 302, r.text

    def released():
        actions = pages.store.actions(name, kinds=["release"], limit=1)
        return actions and actions[0].status == "done" and actions[0]

    from gpuhub.testing import wait_for

    action = wait_for(released, timeout=240, interval=1, what="the release")
    assert action.actor == "admin-grace" and action.reason == reason
    assert [s["status"] for s in action.snapshots] == ["saved"]

    # ada sees why, her snapshot, and the button to get the GPU back
    server = my_server()
    assert server["gpus_held"] == 0 and server["gpu_again"] == {"gpus": 1, "gpu_type": "gpu"}
    page = pages.get(ada).text
    assert "node maintenance at 14:00 &lt;b&gt;today&lt;/b&gt;" in page and reason not in page
    assert "admin-grace" in page and "Give me a GPU again" in page
    snapshots = pages.api(ada_token, "GET", "me/snapshots").json()
    assert snapshots["source"] == "server"
    [snap] = snapshots["items"]
    assert snap["notebook"] == "analysis.ipynb" and snap["saved"] >= 1
    assert "analysis.ipynb" in page

    # choose it for the next start, then delete it, through the page's forms
    form = {"key": snap["key"], "snapshot": snap["snapshot"]}
    r = pages.post_form(ada, "snapshots/restore-next", form)
    assert r.status_code == 302
    assert pages.api(ada_token, "GET", "me/snapshots").json()["items"][0]["restore_next"]
    r = pages.api(ada_token, "DELETE", f"me/snapshots/{snap['key']}/restore-next")
    assert r.status_code == 204
    assert not pages.api(ada_token, "GET", "me/snapshots").json()["items"][0]["restore_next"]
    r = pages.api(ada_token, "PUT", f"me/snapshots/{snap['key']}/{snap['snapshot']}/restore-next")
    assert r.status_code == 200 and r.json()["restore_next"]
    r = pages.post_form(ada, "snapshots/delete", form)
    assert r.status_code == 302
    assert pages.api(ada_token, "GET", "me/snapshots").json()["items"] == []
    r = pages.api(ada_token, "DELETE", f"me/snapshots/{snap['key']}/{snap['snapshot']}")
    assert r.status_code == 404
    r = pages.api(ada_token, "DELETE", f"me/snapshots/..%2F/{snap['snapshot']}")
    assert r.status_code == 400
    pages.hub.stop_server(name)


def test_admin_sees_the_cluster_capacity_the_hub_publishes(pages):
    from gpuhub.store import MeasuredCapacity

    note = "1 of the 2 nodes with NVIDIA GPU GPUs is cordoned"
    pages.store.publish_capacity(
        [MeasuredCapacity("gpu", 4, 1, unavailable=4, note=note)], "kubernetes", 60
    )
    try:
        grace = pages.login("admin-grace")
        page = pages.get(grace, "admin").text
        assert "Cluster capacity" in page and note in page
        [row] = pages.api(pages.token("admin-grace"), "GET", "admin/capacity").json()
        assert (row["gpu_type"], row["total"], row["free"], row["unavailable"]) == ("gpu", 4, 1, 4)
        assert row["fresh"] and row["note"] == note
        ada = pages.token("ada")
        assert pages.api(ada, "GET", "admin/capacity").status_code == 403
    finally:
        pages.store.clear_capacity()


def test_links_planted_in_a_home_never_reach_another_users_snapshots(pages):
    """No server runs, so the service reads the homes itself: mallory links parts of her
    snapshot folder to kim's, and can neither see, choose nor delete kim's snapshot."""
    from gpuhub.core import snapshot as core

    home = pages.hub.state_dir / "home"
    kim_root = home / "kim" / ".gpuhub" / "snapshots"
    name = "20260101T000000.000000Z"
    (kim_root / "nb-1" / name).mkdir(parents=True)
    manifest = {"format": core.FORMAT, "key": "nb-1", "name": name, "created": 1.7e9}
    manifest.update(notebook="kim-secret.ipynb", kernel_id="k", saved=[], skipped=[])
    (kim_root / "nb-1" / name / core.MANIFEST).write_text(json.dumps(manifest))
    mallory = home / "mallory" / ".gpuhub"
    mallory.mkdir(parents=True)
    token = pages.token("mallory")

    def attempts() -> list[int]:
        return [
            pages.api(token, "DELETE", f"me/snapshots/nb-1/{name}").status_code,
            pages.api(token, "PUT", f"me/snapshots/nb-1/{name}/restore-next").status_code,
            pages.api(token, "DELETE", "me/snapshots/nb-1/restore-next").status_code,
        ]

    (mallory / "snapshots").symlink_to(kim_root)  # the whole folder
    listing = pages.api(token, "GET", "me/snapshots").json()
    assert listing["items"] == [] and not listing["available"]
    assert "~/.gpuhub/snapshots: refused, it is a symbolic link" in listing["note"]
    assert attempts() == [400, 400, 400]
    r = pages.api(token, "DELETE", f"me/snapshots/nb-1/{name}")
    assert "symbolic link" in r.text

    (mallory / "snapshots").unlink()
    (mallory / "snapshots").mkdir()
    (mallory / "snapshots" / "nb-1").symlink_to(kim_root / "nb-1")  # one notebook's folder
    listing = pages.api(token, "GET", "me/snapshots").json()
    assert listing["available"] and listing["items"] == []
    assert attempts() == [400, 400, 400]

    (mallory / "snapshots" / "nb-1").unlink()
    (mallory / "snapshots" / "nb-1").mkdir()
    (mallory / "snapshots" / "nb-1" / name).symlink_to(kim_root / "nb-1" / name)  # one snapshot
    [item] = pages.api(token, "GET", "me/snapshots").json()["items"]
    assert "refused, it is a symbolic link" in item["error"] and item["notebook"] is None
    assert attempts()[:2] == [400, 400]

    assert (kim_root / "nb-1" / name / core.MANIFEST).is_file()
    assert not (kim_root / "nb-1" / core.RESTORE_NEXT).exists()


def test_admin_sees_the_release_policy_in_force(pages):
    grace = pages.login("admin-grace")
    page = pages.get(grace, "admin").text
    limits = pages.api(pages.token("admin-grace"), "GET", "admin/limits").json()
    # the demo runs the flat policy: no per-server limits, the flat timeout for everyone
    assert limits["policy"] == "flat" and limits["servers"] == [] and limits["flat"]
    said = f"Release policy: <strong>flat</strong>. Idle GPUs go back after {limits['flat']}"
    assert said in page
    assert pages.api(pages.token("ada"), "GET", "admin/limits").status_code == 403
