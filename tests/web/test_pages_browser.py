"""gpuhub's pages in a real browser (headless Debian Chromium driven by Playwright), against a
real hub and the real service: a user sees their GPU and snapshots; an admin releases it with a
reason the user then reads, and the user gets the GPU back with one click; an admin registers an
environment with a hostile name that the spawn page shows, as text, without a hub restart; a
non-admin is refused. Screenshots of the pages go to docs/img with GPUHUB_UPDATE_SCREENSHOTS=1."""

from __future__ import annotations

import pytest
import requests

from gpuhub.testing import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.browser]

HOSTILE = "<img src=x onerror=alert(1)>"


def log_in(browser, pages, name: str):
    """A browser context logged in to the hub as `name`; its page, on the hub's home."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.dialogs = dialogs  # type: ignore[attr-defined]
    page.goto(f"{pages.url}/hub/login")
    page.get_by_label("Username").fill(name)
    page.get_by_label("Password").fill(pages.hub.password)
    page.get_by_role("button", name="Sign in").click()
    # the hub sends the user on to the spawn page, or to a running server
    page.wait_for_url(lambda url: "/hub/login" not in url, wait_until="commit")
    page.goto(f"{pages.url}/hub/home")
    return page


def test_user_sees_gpu_and_snapshots_admin_releases_user_reads_why_and_gets_it_back(
    pages, browser, screenshot_path
):
    name = "browser-bea"
    pages.hub.login(name)
    pages.start(name, gpus=1, environment="pytorch")
    kernel = pages.open_notebook(name, "training.ipynb")
    pages.run(name, kernel, "losses = [0.9, 0.5, 0.31]")
    r = requests.post(
        pages.server_url(name) + "api/gpuhub/snapshot",
        headers={"Authorization": f"token {pages.hub.admin_token}"},
        json={},
        timeout=120,
    )
    assert r.ok and r.json()["ok"], r.text

    # the user reaches the pages from the hub's navigation bar and sees the GPU and snapshot
    bea = log_in(browser, pages, name)
    bea.get_by_role("link", name="GPUs", exact=True).click()
    bea.wait_for_url("**/services/gpuhub/")
    servers = bea.locator("#gpuhub-servers")
    assert "simulated" in servers.inner_text().lower()
    assert "idle" in servers.inner_text() or "busy" in servers.inner_text()
    assert "training.ipynb" in bea.locator("#gpuhub-snapshots").inner_text()
    assert bea.get_by_role("link", name="GPU admin").count() == 0

    # an admin sees every GPU and releases bea's, saying why
    grace = log_in(browser, pages, "admin-grace")
    grace.get_by_role("link", name="GPU admin").click()
    grace.wait_for_url("**/services/gpuhub/admin")
    row = grace.locator("#gpuhub-gpus tbody tr", has_text=name)
    assert row.count() == 1 and row.locator("svg.gpuhub-sparkline").count() == 1
    assert grace.locator("#gpuhub-gpus tbody tr", has_text="free").count() == 3
    grace.screenshot(path=screenshot_path("pages-admin.png"), full_page=True)
    reason = "the node goes down for maintenance at 18:00"
    grace.get_by_label(f"Reason for releasing the GPU of {name}").fill(reason)
    grace.get_by_role("button", name=f"Release the GPU of {name}").click()
    grace.wait_for_url("**/services/gpuhub/admin")
    assert "Releasing the GPU of browser-bea" in grace.get_by_role("status").inner_text()

    def released():
        done = pages.store.actions(name, kinds=["release"], statuses=["done"], limit=1)
        return done[0] if done else None

    wait_for(released, timeout=240, interval=1, what="the release")

    # the admin's GPU-hours page ranks bea among this week's holders
    grace.get_by_role("link", name="GPU-hours", exact=True).click()
    grace.wait_for_url("**/services/gpuhub/admin/gpu-hours")
    assert grace.locator("#gpuhub-hoarders tbody tr", has_text=name).count() == 1
    assert grace.locator("#gpuhub-gpu-hours-csv").count() == 1
    grace.screenshot(path=screenshot_path("pages-gpu-hours.png"), full_page=True)

    # bea reads why, sees the snapshot taken for the release, and asks for the GPU back
    bea.reload()
    history = bea.locator("#gpuhub-history").inner_text()
    assert reason in history and "admin-grace" in history and "GPU released" in history
    assert bea.locator("#gpuhub-snapshots tbody tr").count() == 2
    bea.screenshot(path=screenshot_path("pages-user.png"), full_page=True)
    bea.get_by_role("button", name="Give me a GPU again (default server)").click()
    bea.wait_for_url("**/services/gpuhub/")
    assert "restarts with its GPU" in bea.get_by_role("status").inner_text()

    def gpu_back():
        model = pages.hub.user(name)["servers"].get("")
        return model and model["ready"] and len(model["state"]["gpus"]) == 1

    wait_for(gpu_back, timeout=240, interval=1, what="the GPU back")
    bea.reload()
    assert "Give me a GPU again" not in bea.locator("#gpuhub-servers").inner_text()
    assert "GPU asked back" in bea.locator("#gpuhub-history").inner_text()
    assert bea.dialogs == [] and grace.dialogs == []  # type: ignore[attr-defined]
    pages.hub.stop_server(name)


def test_admin_registers_an_environment_a_user_sees_it_at_once_as_text(
    pages, browser, screenshot_path
):
    grace = log_in(browser, pages, "admin-grace")
    grace.goto(pages.page_url("admin/environments"))
    grace.get_by_role("link", name="Register an environment").click()
    grace.get_by_label("Id").fill("rapids")
    grace.get_by_label("Name shown to users").fill(HOSTILE)
    grace.get_by_label("Description").fill("RAPIDS: cuDF and cuML")
    grace.get_by_label("Image (Kubernetes)").fill("nvcr.io/nvidia/rapidsai/notebooks:24.12")
    grace.get_by_label("VS Code").uncheck()
    grace.get_by_role("button", name="Save").click()
    grace.wait_for_url("**/services/gpuhub/admin/environments")
    assert "Environment rapids saved." in grace.get_by_role("status").inner_text()
    row = grace.locator("#gpuhub-environments tbody tr", has_text="rapids")
    assert HOSTILE in row.inner_text()
    grace.screenshot(path=screenshot_path("pages-environments.png"), full_page=True)

    # a bad image is refused on the form, naming the field
    grace.goto(pages.page_url("admin/environments/new"))
    grace.get_by_label("Id").fill("miner")
    grace.get_by_label("Image (Kubernetes)").fill("evil.example.com/miner")
    grace.get_by_role("button", name="Save").click()
    assert "is not allowed here" in grace.get_by_role("alert").inner_text()
    assert grace.get_by_label("Image (Kubernetes)").get_attribute("aria-invalid") == "true"

    # a user's spawn page shows it, as text, without a hub restart
    ada = log_in(browser, pages, "browser-ada")
    ada.goto(f"{pages.url}/hub/spawn")
    choice = ada.get_by_label(HOSTILE)
    assert choice.count() == 1
    assert ada.locator("label[for=environment-rapids]").inner_text().strip().startswith(HOSTILE)
    assert ada.locator("img[src=x]").count() == 0
    assert ada.dialogs == [] and grace.dialogs == []  # type: ignore[attr-defined]
    pages.store.delete_catalog_entry("rapids")


def test_a_non_admin_is_refused_in_the_browser(pages, browser):
    ada = log_in(browser, pages, "browser-ada")
    assert ada.get_by_role("link", name="GPU admin").count() == 0
    response = ada.goto(pages.page_url("admin"))
    assert response.status == 403
    assert "This page is for gpuhub admins." in ada.locator("main").inner_text()
