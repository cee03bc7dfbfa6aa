"""A person in a real browser (headless Debian Chromium driven by Playwright): log in, pick
VS Code + PyTorch + 1 GPU on the spawn page, and land in VS Code."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_log_in_pick_vscode_pytorch_one_gpu_and_land_in_vscode(hub, browser, screenshot_path):
    name = "browser-ada"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{hub.url}/hub/login")
    page.get_by_label("Username").fill(name)
    page.get_by_label("Password").fill(hub.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/hub/spawn**")

    # Every control of the form is reachable by its label.
    page.get_by_label("VS Code").check()
    page.get_by_label("PyTorch").check()
    page.get_by_label("Number of GPUs").select_option("1")
    assert "4 of 4 free" in page.get_by_label("GPU type").inner_text()
    page.screenshot(path=screenshot_path("spawn-page.png"), full_page=True)

    page.get_by_role("button", name="Start").click()
    page.wait_for_url(f"**/user/{name}/vscode/**", timeout=180_000)
    page.wait_for_selector(".monaco-workbench", timeout=180_000)
    page.screenshot(path=screenshot_path("vscode.png"))

    model = hub.user(name)["servers"][""]
    assert model["user_options"]["interface"] == "vscode"
    assert model["user_options"]["environment"] == "pytorch"
    assert len(model["state"]["gpus"]) == 1
    page.close()
    hub.stop_server(name)
