"""Start on CPU while waiting, end to end: a real hub with ONE simulated GPU, real servers and
kernels, the real service, a real browser (headless Debian Chromium driven by Playwright).

The only GPU is held; another user picks "Start now without a GPU, switch when one is free" on the
spawn page and works on CPU, their place in line shown on their page in the hub. Bad and
over-quota requests are refused by name. The holder stops; the service offers the turn (the hub
page, JupyterLab's notices, the notice file in the home folder); "not now" lets it pass and keeps
the place; at the next offer the server is switched to the GPU and a kernel variable survives."""

from __future__ import annotations

import os
import time

import pytest
import requests

from gpuhub.testing import wait_for

from .conftest import running_service_hub
from .helpers import cycle, last_line

pytestmark = [pytest.mark.slow, pytest.mark.browser]

HOLDER, NAME = "cpu-holder", "cpu-carla"


#: what the hub gives a service it runs itself, for the pages' OAuth with the hub (this test runs
#: the service in-process, as an external one)
OAUTH_ENV = {
    "JUPYTERHUB_SERVICE_NAME": "gpuhub",
    "JUPYTERHUB_CLIENT_ID": "service-gpuhub",
    "JUPYTERHUB_SERVICE_PREFIX": "/services/gpuhub/",
    "JUPYTERHUB_OAUTH_CALLBACK_URL": "/services/gpuhub/oauth_callback",
}


@pytest.fixture(scope="module")
def one_gpu_hub(tmp_path_factory, run_marker):
    saved = {k: os.environ.get(k) for k in OAUTH_ENV}
    os.environ.update(OAUTH_ENV)
    try:
        with running_service_hub(tmp_path_factory.mktemp("hub"), run_marker, gpus=1) as sh:
            yield sh
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def notices(sh, name: str) -> dict:
    return (sh.status(name).get("service") or {}).get("notices") or {}


def log_in(browser, sh, name: str):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{sh.hub.url}/hub/login")
    page.get_by_label("Username").fill(name)
    page.get_by_label("Password").fill(sh.hub.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/hub/login" not in url, wait_until="commit")
    return page


def test_start_on_cpu_wait_not_now_and_switch(one_gpu_hub, browser, screenshot_path):
    sh = one_gpu_hub
    # researchers may hold one GPU here (a runtime group quota, as an admin sets it)
    sh.store.put_group_quota("researchers", max_gpus=1, max_servers=3, by="admin-test")
    sh.start(HOLDER, gpus=1)
    assert len(sh.devices(HOLDER)) == 1

    # forged choices: 400 naming the field, nothing started
    for bad in ("later", 1, ["start-on-cpu"]):
        r = sh.hub.spawn(NAME, {"gpus": 1, "when_no_gpu": bad})
        assert r.status_code == 400 and "when_no_gpu" in r.json()["message"], r.text
    assert "" not in sh.hub.user(NAME)["servers"]
    # starting on CPU does not get round a quota that forbids GPUs: 403, nothing queued
    sh.store.put_group_quota("students", max_gpus=0, max_servers=1, by="admin-test")
    sh.hub.login("student-sam")  # the demo puts student-* in the group "students"
    r = sh.hub.spawn("student-sam", {"gpus": 1, "when_no_gpu": "start-on-cpu"})
    assert r.status_code == 403 and "GPU" in r.json()["message"], r.text
    assert sh.store.queue() == []

    # the spawn page offers the choice; the user starts on CPU at once
    page = log_in(browser, sh, NAME)
    page.goto(f"{sh.hub.url}/hub/spawn/{NAME}")
    page.get_by_label("Number of GPUs").select_option("1")
    choice = page.locator("#gpuhub-when-no-gpu")
    assert "When no GPU is free" in choice.inner_text()
    assert page.locator("#when_no_gpu-wait").is_checked(), "waiting stays the default"
    page.get_by_label("Start now without a GPU, switch when one is free").check()
    page.screenshot(path=screenshot_path("spawn-start-on-cpu.png"), full_page=True)
    page.get_by_role("button", name="Start").click()
    model = sh.hub.wait_ready(NAME)
    assert model["state"]["gpus"] == [] and model["user_options"]["gpus"] == 0
    [entry] = sh.store.queue()
    assert (entry.user, entry.gpus, entry.on_cpu) == (NAME, 1, True)
    assert entry.user_options["when_no_gpu"] == "start-on-cpu"

    # quotas count the waiting request: no second GPU request, even on CPU
    r = sh.hub.spawn(NAME, {"gpus": 1, "when_no_gpu": "start-on-cpu"}, server="two")
    assert r.status_code == 403 and "GPU" in r.json()["message"], r.text

    kernel = sh.open_notebook(NAME, "work.ipynb")
    sh.run(NAME, kernel, "answer = 42")
    service = sh.service(cpu_switch_notice=2, not_now_delay=3, not_now_limit=3)
    cycle(service)
    # the place in line: JupyterLab's notices and the user's page in the hub
    queue = wait_for(lambda: notices(sh, NAME).get("queue"), 60, what="the place in notices")
    assert queue["place"] == 1 and queue["gpus"] == 1
    page.goto(f"{sh.hub.url}/services/gpuhub/")
    page.wait_for_url("**/services/gpuhub/")
    row = page.locator("#gpuhub-servers tr[data-server='']")
    assert "1st in line of 1" in row.inner_text()
    assert row.get_by_role("button", name="Leave the queue").count() == 1
    # ... and JupyterLab's status bar
    lab = page.context.new_page()
    lab.goto(f"{sh.hub.url}/user/{NAME}/lab")
    status = lab.locator("[data-gpuhub=status]")
    status.wait_for(timeout=120_000)
    wait_for(lambda: "1st in the queue" in status.inner_text(), 60, what="the place in Lab")
    assert status.inner_text().startswith("no GPU")

    # the GPU frees up: the service offers the turn first, and keeps the GPU for the user
    sh.hub.stop_server(HOLDER)
    wait_for(lambda: not sh.store.leases(), 60, what="the GPU free")
    cycle(service)
    turn = wait_for(lambda: notices(sh, NAME).get("gpu_turn"), 60, what="the turn in notices")
    assert turn["gpus"] == 1
    assert sh.store.queue_entry(NAME, "").offered_at is not None
    text = wait_for(lambda: sh.read_file(NAME, "GPUHUB-NOTICE.md"), 60, what="the notice file")
    assert "turn for a GPU has come" in text
    # JupyterLab says so in its status bar and a notification with "Switch now" / "Not now"
    # (the test's notice is 2 s: the bar may already say it is switching)
    turn_words = ("your GPU turn", "switching to the GPU")
    wait_for(
        lambda: any(w in status.inner_text() for w in turn_words),
        60,
        what="the turn in Lab's status bar",
    )
    toast = lab.get_by_text("Your turn for a GPU has come")
    toast.first.wait_for(timeout=30_000)
    assert lab.get_by_role("button", name="Not now").count() >= 1
    lab.close()
    page.reload()
    row = page.locator("#gpuhub-servers tr[data-server='']")
    assert "Your turn for a GPU has come" in row.inner_text()
    page.screenshot(path=screenshot_path("pages-gpu-turn.png"), full_page=True)

    # "not now" on the hub page: the offer goes, the place stays
    row.get_by_role("button", name="Not now").click()
    page.wait_for_url("**/services/gpuhub/")
    assert "next in line" in page.get_by_role("status").inner_text()
    entry = sh.store.queue_entry(NAME, "")
    assert entry.not_before is not None and entry.not_now_count == 1 and entry.offered_at is None
    cycle(service)
    assert sh.hub.user(NAME)["servers"][""]["state"]["gpus"] == [], "no switch while postponed"

    # after the delay the turn is offered again, then the server is switched
    time.sleep(3.2)
    cycle(service)
    assert sh.store.queue_entry(NAME, "").offered_at is not None
    time.sleep(2.2)
    cycle(service)
    model = wait_for(
        lambda: (m := sh.model(NAME)) and m.get("ready") and m["state"]["gpus"] and m,
        180,
        what="the switch to the GPU",
    )
    assert model["user_options"]["gpus"] == 1
    assert sh.store.queue() == []
    [switch] = sh.store.actions(NAME, kinds=["give-back"])
    assert switch.rule == "queue-turn" and switch.status == "done" and switch.snapshots
    kernel = sh.open_notebook(NAME, "work.ipynb")
    wait_for(
        lambda: any(k.get("last_restore") for k in sh.status(NAME)["kernels"]),
        60,
        what="the automatic restore",
    )
    assert last_line(sh.run(NAME, kernel, "print(answer)")) == "42"
    # VS Code users read it in their home folder too
    text = wait_for(
        lambda: (t := sh.read_file(NAME, "GPUHUB-NOTICE.md")) and "again" in t and t,
        60,
        what="the notice of the switch",
    )
    assert "restarted this server with its GPU" in text and "turn for a GPU" in text

    # what JupyterLab offers, on the hub page for VS Code users too: the planned release with
    # "Keep it" and "Give it back now"
    sh.wait_reported(service, NAME)
    cycle(service)
    page.goto(f"{sh.hub.url}/services/gpuhub/")
    row = page.locator("#gpuhub-servers tr[data-server='']")
    assert "Your GPU goes back to the pool" in row.inner_text()
    row.get_by_role("button", name="Keep it for 1 h").click()
    page.wait_for_url("**/services/gpuhub/")
    assert "kept until" in page.get_by_role("status").inner_text().lower()
    [keep] = sh.store.actions(NAME, kinds=["keep"])
    assert keep.actor == NAME
    # (the same form sends "Give it back now", carried out as JupyterLab's: test_keep_live.py)
    row = page.locator("#gpuhub-servers tr[data-server='']")
    assert "Kept until" in row.inner_text()
    assert row.get_by_role("button", name="Give it back now").count() == 1
    sh.stop_everything()


def test_bad_requests_from_the_page_api_are_refused_by_name(one_gpu_hub):
    sh = one_gpu_hub
    if sh.live is None:
        sh.service()
    base = f"{sh.hub.url}/services/gpuhub/"
    # a token of the user's own, as a script would use
    r = sh.hub.request("POST", f"/users/{NAME}/tokens", json={"note": "cpu-start test"})
    assert r.ok, r.text
    headers = {"Authorization": f"token {r.json()['token']}"}
    for body, field in (
        ({"server": "", "kind": "teleport"}, "kind"),
        ({"server": "", "kind": "keep"}, "seconds"),
        ({"server": "", "kind": "keep", "seconds": True}, "seconds"),
        ({"server": "", "kind": "not-now", "when": 1}, "when"),
    ):
        r = requests.post(base + "api/me/requests", json=body, headers=headers, timeout=30)
        assert r.status_code == 400 and field in r.json()["message"], r.text
    # nothing to say "not now" to: refused, not an error of the service
    r = requests.post(
        base + "api/me/requests", json={"kind": "not-now"}, headers=headers, timeout=30
    )
    assert r.status_code == 409, r.text
