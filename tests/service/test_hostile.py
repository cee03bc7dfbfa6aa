"""Hostile users against the service, on a real hub with real servers. A user controls their own
server: mallory's and mordred's `~/.jupyter/jupyter_server_config.py` record every request their
server receives, turn gpuhub's reporter off and send forged reports instead (a GPU "busy" that the
driver sees idle, a kernel "executing" forever, huge and malformed documents).

What must hold: no recorded credential opens anything on the hub's API or on another user's
server; forged documents are refused and the cycle works on for everyone; mallory's idle GPU is
released (the trusted source decides, not her report) within the idle timeout and a cycle;
mordred's "busy forever" ends at the maximum GPU lease."""

from __future__ import annotations

import json
import time

import pytest
import requests

from gpuhub.core.decide import RULE_GPU_IDLE, RULE_MAX_LEASE

from .helpers import cycle

pytestmark = pytest.mark.slow

HOSTILE_CONFIG = r"""
import json, os, threading, time, urllib.request, urllib.error

c = get_config()  # noqa: F821
home = os.path.expanduser("~")
c.GpuhubExtension.service_url = ""  # no honest reports from this server


def record(handler):
    headers = dict(handler.request.headers)
    entry = {"uri": handler.request.uri, "headers": headers, "status": handler.get_status()}
    with open(os.path.join(home, "recorded-requests.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")


c.ServerApp.tornado_settings = {"log_function": record}

USER = os.environ["JUPYTERHUB_USER"]
BUSY_FOREVER = USER.startswith("mordred")
URL = os.environ["GPUHUB_SERVICE_URL"].rstrip("/") + "/api/v1/servers/report"
TOKEN = os.environ["JUPYTERHUB_API_TOKEN"]


def status():
    return {
        "version": 1,
        "gpus": [{"uuid": "GPU-forged", "state": "busy", "utilization": {"gpu": 100.0}}],
        "kernels": [{"id": "k", "execution_state": "busy" if BUSY_FOREVER else "idle"}],
        "external_processes": [],
        "busy": True,
        "busy_reasons": ["training, honestly"],
    }


def post(body, server="", token=TOKEN, wait=0):
    request = urllib.request.Request(
        f"{URL}?server={server}&wait={wait}",
        data=body if isinstance(body, bytes) else json.dumps(body).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=40) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, None
    except Exception as e:
        return 0, str(e)


def forge():
    while post({"version": 1, "status": status()})[0] != 200:  # the service is up
        time.sleep(0.5)
    codes = {}
    codes["huge"] = post(b'{"version": 1, "status": {"x": "' + b"x" * (2 * 1024 * 1024) + b'"}}')[0]
    doc = json.dumps({"version": 1, "status": status()}).replace('"busy": true', '"busy": Infinity')
    codes["infinity"] = post(doc.encode())[0]
    codes["wrong_types"] = post({"version": 1, "status": {**status(), "gpus": "all"}})[0]
    many = {**status(), "kernels": [{"id": str(i)} for i in range(5000)]}
    codes["many_kernels"] = post({"version": 1, "status": many})[0]
    codes["other_users_server"] = post({"version": 1, "status": status()}, server="../alice")[0]
    codes["forged_token"] = post({"version": 1, "status": status()}, token="alice")[0]
    with open(os.path.join(home, "forged-codes.json"), "w") as f:
        json.dump(codes, f)
    results = []
    while True:
        code, answer = post({"version": 1, "status": status(), "results": results}, wait=5)
        results = []
        if code == 200:
            for command in answer.get("commands", []):
                data = {"ok": True, "snapshots": []} if command["kind"] == "snapshot" else {}
                results.append({"id": command["id"], "ok": True, "data": data})
        else:
            time.sleep(1)


threading.Thread(target=forge, daemon=True).start()
"""


def write_hostile_config(sh, name: str) -> None:
    config = sh.hub.state_dir / "home" / name / ".jupyter"
    config.mkdir(parents=True, exist_ok=True)
    (config / "jupyter_server_config.py").write_text(HOSTILE_CONFIG)


def recorded(sh, name: str) -> list[dict]:
    path = sh.hub.state_dir / "home" / name / "recorded-requests.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def credentials(entries: list[dict]) -> set[str]:
    """Every token a request carried: Authorization headers, ?token=, cookies."""
    found = set()
    for entry in entries:
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        auth = headers.get("authorization", "")
        if auth:
            found.add(auth.partition(" ")[2] or auth)
        if "token=" in entry["uri"]:
            found.add(entry["uri"].split("token=", 1)[1].split("&", 1)[0])
        for cookie in headers.get("cookie", "").split(";"):
            if "=" in cookie:
                found.add("cookie:" + cookie.strip())
    return found


def test_hostile_servers(service_hub):
    sh = service_hub
    for name in ("mallory", "mordred"):
        write_hostile_config(sh, name)
    for name in ("alice-h", "mallory", "mordred"):
        sh.start(name, gpus=1)
    kernel = sh.open_notebook("alice-h", "thesis.ipynb")
    sh.run("alice-h", kernel, "result = 6 * 7")
    sh.wait_gpu_state("alice-h", "idle", idle_for=1)

    started = time.time()
    service = sh.service(
        gpu_idle_timeout=3,
        max_gpu_lease_default=40,
        max_gpu_lease_warning=5,
        forced_snapshot_deadline=2,
    )
    # the forged documents were refused, each with the status a client can act on
    codes = json.loads((sh.hub.state_dir / "home" / "mallory" / "forged-codes.json").read_text())
    assert codes == {
        "huge": 413,
        "infinity": 400,
        "wrong_types": 400,
        "many_kernels": 400,
        "other_users_server": 400,
        "forged_token": 403,
    }

    released_at: dict[str, float] = {}
    rules: dict[str, str] = {}
    deadline = time.time() + 150
    while time.time() < deadline and len(released_at) < 3:
        for action in cycle(service):
            if type(action).__name__ == "ReleaseGpu" and action.user not in released_at:
                model = sh.model(action.user)
                if model is not None and model["user_options"]["gpus"] == 0:
                    released_at[action.user] = time.time()
                    rules[action.user] = action.rule
        # the pages keep working for everyone while this goes on
        overview = service.live.call(service.gpuhub_pages.admin_overview)
        assert {s["user"] for s in overview["servers"]} >= {"alice-h"}
        time.sleep(1)

    # mallory's report says "busy at 100 %": the driver says idle, and that decides
    assert rules.get("mallory") == RULE_GPU_IDLE, rules
    assert released_at["mallory"] - started < 60
    # alice's GPU, idle too, is released with her variables kept
    assert rules.get("alice-h") == RULE_GPU_IDLE
    [release] = sh.store.actions("alice-h", kinds=["release"], statuses=["done"])
    assert release.snapshots[0]["status"] == "saved"
    # mordred's kernel "executes" forever: kept, then released at the maximum lease
    assert rules.get("mordred") == RULE_MAX_LEASE, rules
    lease = sh.store.actions("mordred", kinds=["release"], statuses=["done"])[0]
    assert lease.rule == RULE_MAX_LEASE
    assert sh.store.actions("mordred", kinds=["warn"])[0].rule == "max-lease-warning"

    # nothing that reached the hostile servers opens anything beyond them
    requests.get(sh.url("mallory") + "api/status", timeout=30)  # proves the recorder records
    entries = recorded(sh, "mallory") + recorded(sh, "mordred")
    assert entries, "the hostile servers recorded the requests they got"
    alice = sh.model("alice-h")
    for credential in credentials(entries):
        if credential.startswith("cookie:"):
            cookies = dict([credential[len("cookie:") :].split("=", 1)])
            headers = {}
        else:
            cookies, headers = {}, {"Authorization": f"token {credential}"}
        for method, url in (
            ("GET", f"{sh.hub.api}/users"),
            ("GET", f"{sh.hub.api}/users/alice-h"),
            ("DELETE", f"{sh.hub.api}/users/alice-h/server"),
            ("GET", f"{sh.hub.url}{alice['url']}api/contents"),
        ):
            r = requests.request(
                method, url, headers=headers, cookies=cookies, timeout=30, allow_redirects=False
            )
            assert r.status_code in (302, 401, 403, 404), (method, url, r.status_code)
    assert sh.model("alice-h")["ready"]
    sh.stop_everything()
