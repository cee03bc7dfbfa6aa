"""Spawning real single-user servers on the local backend, through the REST API and the form."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests

from gpuhub.store import Store
from gpuhub.testing import run_in_kernel

pytestmark = pytest.mark.slow

COMBINATIONS = [
    ("jupyterlab", "pytorch"),
    ("jupyterlab", "tensorflow"),
    ("vscode", "pytorch"),
    ("vscode", "tensorflow"),
]

PROBE = (
    "import os, sys, {module}\n"
    "print(os.environ['CUDA_VISIBLE_DEVICES'], sys.executable, '{environment}', "
    "{module}.__version__, sep='|')"
)
KERNEL_PROBE = {
    "pytorch": PROBE.format(module="torch", environment="pytorch"),
    "tensorflow": PROBE.format(module="tensorflow", environment="tensorflow"),
}


def leases(hub) -> dict[str, list[str]]:
    store = Store.at(f"sqlite:///{hub.state_dir / 'gpuhub.sqlite'}")
    out: dict[str, list[str]] = {}
    for lease in store.leases():
        out.setdefault(lease.user, []).append(lease.device)
    return out


def check_running_server(hub, name: str, interface: str, environment: str, gpus: int) -> None:
    """What a user would check: the right interface opens, the kernel is the environment's, and
    the server sees exactly its GPUs."""
    model = hub.wait_ready(name)
    state = model["state"]
    assert model["user_options"] == {
        "interface": interface,
        "environment": environment,
        "gpus": gpus,
        "gpu_type": "gpu",
    }
    assert len(state["gpus"]) == gpus
    assert state["gpus_simulated"] is True
    assert sorted(leases(hub).get(name, [])) == sorted(state["gpus"])

    server_url = f"{hub.url}{model['url']}"
    headers = {"Authorization": f"token {hub.admin_token}"}
    # The server's root opens the chosen interface.
    r = requests.get(server_url, headers=headers, allow_redirects=False, timeout=30)
    assert r.status_code in (301, 302), r.text[:500]
    expected = "/lab" if interface == "jupyterlab" else "/vscode/"
    assert r.headers["Location"].split("?")[0].endswith(expected)

    out = run_in_kernel(server_url, hub.admin_token, KERNEL_PROBE[environment])
    visible, executable, framework, _version = out.strip().split("|")
    assert visible == ",".join(state["gpus"])
    assert f".envs/{environment}/bin/python" in executable
    assert framework == environment

    if interface == "vscode":
        page = requests.get(f"{server_url}vscode/", headers=headers, timeout=120)
        assert page.status_code == 200, page.text[:500]
        assert "code-server" in page.text or "vscode" in page.text.lower()


@pytest.mark.parametrize(("interface", "environment"), COMBINATIONS)
def test_spawn_through_rest_api(hub, interface, environment):
    name = f"rest-{interface}-{environment}"
    r = hub.spawn(name, {"interface": interface, "environment": environment, "gpus": 1})
    assert r.status_code in (201, 202), r.text
    check_running_server(hub, name, interface, environment, 1)
    hub.stop_server(name)
    assert name not in leases(hub), "the GPU lease is freed when the server stops"


@pytest.mark.parametrize(("interface", "environment"), COMBINATIONS)
def test_spawn_through_the_form(hub, interface, environment):
    name = f"form-{interface}-{environment}"
    session = hub.login(name)
    page = session.get(f"{hub.url}/hub/spawn/{name}", timeout=30)
    assert page.status_code == 200
    assert 'name="interface"' in page.text and f'value="{environment}"' in page.text
    assert re.search(r"NVIDIA GPU \(dedicated\): \d of 4 free", page.text)
    assert "simulated" in page.text.lower()
    xsrf = session.cookies.get("_xsrf")
    r = session.post(
        f"{hub.url}/hub/spawn/{name}",
        data={"interface": interface, "environment": environment, "gpus": "0", "_xsrf": xsrf},
        timeout=120,
    )
    assert r.status_code == 200, r.text[:1000]
    check_running_server(hub, name, interface, environment, 0)
    hub.stop_server(name)


def test_form_shows_free_gpus(hub):
    holder, viewer = "freecount-holder", "freecount-viewer"
    session = hub.login(viewer)

    def free_on_page() -> int:
        text = session.get(f"{hub.url}/hub/spawn/{viewer}", timeout=30).text
        return int(re.search(r"NVIDIA GPU \(dedicated\): (\d) of 4 free", text).group(1))

    before = free_on_page()
    assert hub.spawn(holder, {"gpus": 1}).status_code in (201, 202)
    hub.wait_ready(holder)
    assert free_on_page() == before - 1
    hub.stop_server(holder)
    assert free_on_page() == before


def test_form_errors_are_shown_on_the_form(hub):
    name = "form-bad-input"
    session = hub.login(name)
    session.get(f"{hub.url}/hub/spawn/{name}", timeout=30)
    r = session.post(
        f"{hub.url}/hub/spawn/{name}",
        data={"environment": "no-such-env", "gpus": "1", "_xsrf": session.cookies.get("_xsrf")},
        timeout=60,
    )
    assert r.status_code == 400
    assert "environment" in r.text and "no-such-env" in r.text
    assert 'name="interface"' in r.text, "the form is shown again"
    assert hub.user(name)["servers"] == {}


def test_kernelspec_written_for_environment(hub):
    # The kernel a server starts is the environment's interpreter, registered by gpuhub.
    spec = Path(hub.state_dir) / "kernels" / "pytorch" / "kernels" / "python3" / "kernel.json"
    name = "kernelspec-user"
    assert hub.spawn(name, {"environment": "pytorch"}).status_code in (201, 202)
    hub.wait_ready(name)
    assert spec.exists()
    assert ".envs/pytorch/bin/python" in spec.read_text()
    hub.stop_server(name)
