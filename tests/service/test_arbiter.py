"""jupyterhub-idle-culler 2.x with gpuhub's `cull_arbiter_hook`: an inactive server whose GPU is
idle is snapshotted and culled; one whose GPU is busy is kept."""

from __future__ import annotations

import asyncio
import logging

import pytest
from jupyterhub_idle_culler import cull_idle

from gpuhub.service.arbiter import make_cull_arbiter

from .helpers import wait_until

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

    arbiter = make_cull_arbiter(proxy_url=sh.hub.url, api_token=sh.token, store_url=sh.store_url)
    asyncio.run(
        cull_idle(
            url=sh.hub.api,
            api_token=sh.token,  # the service's token: its scopes cover the culler's needs
            inactive_limit=1,
            logger=logging.getLogger("test-culler"),
            cull_arbiter=arbiter,
        )
    )
    wait_until(lambda: sh.model("cull-ida") is None, what="the idle server culled")
    assert sh.model("cull-bea") is not None and sh.model("cull-bea")["ready"], "busy GPU kept"
    [row] = sh.store.actions("cull-ida")
    assert row.kind == "stop" and row.actor == "jupyterhub-idle-culler" and row.status == "done"
    assert row.snapshots[0]["notebook"] == "notes.ipynb"
    assert row.snapshots[0]["status"] == "saved"
    assert sh.store.actions("cull-bea") == []
    sh.stop_everything()
