"""gpuhub's JupyterLab extension in a real browser (headless Debian Chromium driven by
Playwright), in a real single-user server behind a real hub, with the real service: the status
bar shows the GPU's state in words, a warning comes before the release with "Keep it", keeping
postpones the release (the service honours it), and after a release "GPU again" brings the GPU
and the notebook's variables back. Screenshots go to docs/img with GPUHUB_UPDATE_SCREENSHOTS=1."""

from __future__ import annotations

import re

import pytest

from gpuhub.core.decide import ReleaseGpu
from gpuhub.testing import wait_for

from .helpers import cycle, last_line

pytestmark = [pytest.mark.slow, pytest.mark.browser]

NAME = "lab-lena"


def open_lab(browser, sh):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(f"{sh.hub.url}/hub/login")
    page.get_by_label("Username").fill(NAME)
    page.get_by_label("Password").fill(sh.hub.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/hub/login" not in url, wait_until="commit")
    page.goto(f"{sh.hub.url}/user/{NAME}/lab")
    page.wait_for_selector("[data-gpuhub=status]", timeout=120_000)
    return page


def status_text(page) -> str:
    return page.locator("[data-gpuhub=status]").inner_text()


def test_status_bar_warning_keep_and_gpu_again(service_hub, browser, screenshot_path):
    sh = service_hub
    sh.start(NAME, gpus=1)
    kernel = sh.open_notebook(NAME, "work.ipynb")
    sh.run(NAME, kernel, "weights = [0.5, 0.25]")
    sh.wait_gpu_state(NAME, "idle", idle_for=2)
    # the GPU goes back after 15 idle minutes; users are warned 20 minutes ahead (so now)
    service = sh.service(
        gpu_idle_timeout=900, release_notice_before=1200, max_keep_default=4 * 3600
    )
    cycle(service)

    page = open_lab(browser, sh)
    # the status bar: the GPU, its live numbers, its state and the release in words
    wait_for(lambda: "given back in" in status_text(page), 60, what="the planned release")
    text = status_text(page)
    assert re.search(r"GPU \d+ \d+%", text), text
    assert "idle for" in text and re.search(r"given back in 1[45] min", text), text
    # the warning, with its choices; no "official Jupyter news" question for the user
    toast = page.get_by_text("Your GPU goes back to the pool")
    toast.wait_for(timeout=60_000)
    assert page.get_by_text("official Jupyter news").count() == 0
    assert page.get_by_role("button", name="Keep it for 4 h").count() == 1
    assert page.get_by_role("button", name="Give it back now").count() == 1
    page.screenshot(path=screenshot_path("lab-release-warning.png"))

    page.get_by_role("button", name="Keep it for 1 h").click()
    page.get_by_text(re.compile("kept until")).first.wait_for(timeout=60_000)
    [keep] = sh.store.actions(NAME, kinds=["keep"])
    assert keep.actor == NAME and "1 h" in keep.reason

    # the idle limit long past: the service keeps the GPU, the status bar says until when
    service.gpu_idle_timeout = 2
    service.policy_rules = service.rules()
    assert not any(isinstance(a, ReleaseGpu) for a in cycle(service))
    assert sh.devices(NAME)
    wait_for(lambda: "kept until" in status_text(page), 60, what="the keep in the status bar")
    page.screenshot(path=screenshot_path("lab-gpu-kept.png"))

    # an admin releases it all the same (a keep binds the idle rules, not people)
    running = service.running[(NAME, "")]
    release = ReleaseGpu(NAME, "", "admin", "maintenance", running.gpus, running.gpu_type)

    async def admin_release():
        await service.executor.act(release, running, actor="admin-grace")

    sh.live.call(admin_release)
    wait_for(
        lambda: (m := sh.model(NAME)) and m.get("ready") and not m["state"]["gpus"],
        120,
        what="the release",
    )
    sh.wait_reported(service, NAME)
    cycle(service)

    # the user's JupyterLab, reloaded: given back, "GPU again?"
    page.reload()
    page.wait_for_selector("[data-gpuhub=status]", timeout=120_000)
    wait_for(lambda: "GPU again?" in status_text(page), 60, what="the released state")
    assert "given back at" in status_text(page)
    page.screenshot(path=screenshot_path("lab-gpu-given-back.png"))
    page.locator("[data-gpuhub=status]").click()
    page.get_by_role("button", name="GPU again").click()
    page.get_by_text(re.compile("restarts with its GPU")).first.wait_for(timeout=60_000)
    sh.live.call(service.executor.wait)
    wait_for(
        lambda: (m := sh.model(NAME)) and m.get("ready") and m["state"]["gpus"],
        180,
        what="the GPU back",
    )
    page.reload()
    page.wait_for_selector("[data-gpuhub=status]", timeout=120_000)
    wait_for(lambda: re.search(r"GPU \d+", status_text(page)), 60, what="the GPU in the status bar")
    assert "GPU again" not in status_text(page)
    kernel = sh.open_notebook(NAME, "work.ipynb")
    wait_for(
        lambda: any(k.get("last_restore") for k in sh.status(NAME)["kernels"]),
        60,
        what="the automatic restore",
    )
    assert last_line(sh.run(NAME, kernel, "print(weights)")) == "[0.5, 0.25]"
    page.context.close()
    sh.stop_everything()
