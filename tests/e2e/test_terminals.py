"""The environment in every terminal: a VS Code + PyTorch server's terminal (VS Code's, in a real
browser, and JupyterLab's, through Jupyter Server's terminal websocket) runs the environment's
interpreter, imports torch and sees the server's GPU; code-server opens the home trusted."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json

import pytest
import requests
from tornado.websocket import websocket_connect

from gpuhub.testing import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.browser]

NAME = "term-tess"
SCRIPT = (
    "import os, sys, torch\n"
    "print('torch', torch.__version__, 'gpus', os.environ.get('CUDA_VISIBLE_DEVICES'),\n"
    "      'venv', os.environ.get('VIRTUAL_ENV'), 'python', sys.executable)\n"
)


def contents(hub, server_url: str, path: str) -> str | None:
    r = requests.get(
        f"{server_url}api/contents/{path}",
        headers={"Authorization": f"token {hub.admin_token}"},
        timeout=30,
    )
    return r.json()["content"] if r.status_code == 200 else None


async def in_lab_terminal(server_url: str, token: str, line: str) -> None:
    """Type `line` into a new terminal of the server (what JupyterLab's terminal does)."""
    headers = {"Authorization": f"token {token}"}
    r = requests.post(f"{server_url}api/terminals", headers=headers, timeout=30)
    r.raise_for_status()
    name = r.json()["name"]
    ws_url = server_url.replace("http", "ws", 1) + f"terminals/websocket/{name}"
    from tornado.httpclient import HTTPRequest

    ws = await websocket_connect(HTTPRequest(ws_url, headers=headers))
    ws.write_message(json.dumps(["stdin", line + "\r"]))
    await asyncio.sleep(0.5)
    ws.close()


def test_terminals_run_the_environment_with_its_gpu(hub, browser, screenshot_path):
    r = hub.spawn(NAME, {"interface": "vscode", "environment": "pytorch", "gpus": 1})
    assert r.status_code in (201, 202), r.text
    model = hub.wait_ready(NAME)
    gpus = ",".join(model["state"]["gpus"])
    server_url = f"{hub.url}{model['url']}"
    headers = {"Authorization": f"token {hub.admin_token}"}
    r = requests.put(
        f"{server_url}api/contents/check_env.py",
        headers=headers,
        json={"type": "file", "format": "text", "content": SCRIPT},
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text

    # JupyterLab's terminal
    line = "python check_env.py > lab.txt 2>&1"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # Playwright holds this thread's loop
        pool.submit(asyncio.run, in_lab_terminal(server_url, hub.admin_token, line)).result()
    lab = wait_for(lambda: contents(hub, server_url, "lab.txt"), 120, 0.5, "lab.txt")
    assert lab.startswith("torch ") and f"gpus {gpus} " in lab, lab
    assert ".envs/pytorch" in lab.split(" venv ")[1], lab

    # VS Code's terminal, in the browser
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(f"{hub.url}/hub/login")
    page.get_by_label("Username").fill(NAME)
    page.get_by_label("Password").fill(hub.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/hub/login" not in url, wait_until="commit")
    page.goto(f"{server_url}vscode/")
    page.wait_for_selector(".monaco-workbench", timeout=180_000)
    page.wait_for_timeout(3000)
    assert page.get_by_text("Restricted Mode").count() == 0
    page.keyboard.press("Control+Backquote")
    page.wait_for_selector(".xterm", timeout=60_000)
    page.locator(".xterm").first.click()
    page.wait_for_timeout(2000)
    out = None
    for _attempt in range(3):
        # keys typed before the terminal's shell is ready are lost (a busy machine): the line is
        # cleared and typed again
        page.keyboard.press("Control+c")
        page.keyboard.type("python check_env.py | tee vscode.txt\n", delay=20)
        try:
            out = wait_for(lambda: contents(hub, server_url, "vscode.txt"), 40, 0.5, "vscode.txt")
            break
        except TimeoutError:
            continue
    assert out, "nothing typed into VS Code's terminal ran"
    page.wait_for_timeout(1000)
    page.screenshot(path=screenshot_path("vscode-terminal.png"))
    assert out.startswith("torch ") and f"gpus {gpus} " in out, out
    assert ".envs/pytorch/bin/python" in out, out
    page.close()
    hub.stop_server(NAME)
