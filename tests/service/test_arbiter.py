"""jupyterhub-idle-culler 2.x with gpuhub's `cull_arbiter_hook`: an inactive server whose GPU is
idle is snapshotted and culled; one whose GPU is busy is kept; only the configured culler may
ask."""

from __future__ import annotations

import asyncio
import logging

import pytest
import requests
from jupyterhub_idle_culler import cull_idle

from gpuhub.service.arbiter import make_cull_arbiter
from gpuhub.testing import wait_for

pytestmark = pytest.mark.slow


def test_idle_culler_with_the_gpu_aware_arbiter(service_hub):
    sh = service_hub
    sh.start("cull-ida", gpus=1)
    kernel = sh.open_notebook("cull-ida", "notes.ipynb")
    sh.run("cull-ida", kernel, "answer = 42")
    sh.start("cull-bea", gpus=1)
    sh.set_util(sh.devices("cull-bea")[0], 95)
    sh.wait_gpu_state("cull-ida", "idle")
    sh.wait_gpu_state("cull-bea", "busy")

    # the culler asks the gpuhub service with its own token (here the demo's admin service);
    # the service decides on what it knows and has the server snapshot itself
    sh.service(arbiter_services=["demo-admin"])
    arbiter = make_cull_arbiter(
        service_url=f"{sh.hub.url}/services/gpuhub/", api_token=sh.hub.admin_token
    )
    asyncio.run(
        cull_idle(
            url=sh.hub.api,
            api_token=sh.token,  # the service's token: its scopes cover the culler's needs
            inactive_limit=1,
            logger=logging.getLogger("test-culler"),
            cull_arbiter=arbiter,
        )
    )
    wait_for(lambda: sh.model("cull-ida") is None, 60, what="the idle server culled")
    assert sh.model("cull-bea") is not None and sh.model("cull-bea")["ready"], "busy GPU kept"
    [row] = sh.store.actions("cull-ida")
    assert row.kind == "stop" and row.actor == "jupyterhub-idle-culler" and row.status == "done"
    assert row.snapshots[0]["notebook"] == "notes.ipynb"
    assert row.snapshots[0]["status"] == "saved"
    assert sh.store.actions("cull-bea") == []
    sh.stop_everything()


def test_the_arbiter_answers_only_the_configured_culler(service_hub):
    sh = service_hub
    sh.start("cull-cat", gpus=1)
    sh.wait_gpu_state("cull-cat", "idle")
    sh.service()  # only "idle-culler" may ask
    body = {"user": "cull-cat", "server": "", "inactive_s": 10**6, "inactive_limit_s": 1}
    url = f"{sh.hub.url}/services/gpuhub/api/v1/arbiter"
    for token in (sh.hub.admin_token, "forged-token", None):
        headers = {"Authorization": f"token {token}"} if token else {}
        r = requests.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code in (401, 403), r.text
    assert sh.model("cull-cat")["ready"] and sh.store.actions("cull-cat") == []
    sh.stop_everything()
