"""Keep, give back now and GPU again, as JupyterLab asks for them, against a real hub with a
real single-user server on a simulated GPU: the request goes to the server's own
`/api/gpuhub/requests`, travels in the server's report with the server's token, and the service
honours it within its policy."""

from __future__ import annotations

import pytest
import requests

from gpuhub.core.decide import ReleaseGpu
from gpuhub.testing import wait_for

from .helpers import cycle, last_line

pytestmark = pytest.mark.slow


def ask(sh, name: str, body: dict) -> requests.Response:
    return requests.post(
        sh.url(name) + "api/gpuhub/requests", json=body, headers=sh.headers(), timeout=90
    )


def notices(sh, name: str) -> dict:
    return (sh.status(name).get("service") or {}).get("notices") or {}


async def _keeps(service) -> list:
    from gpuhub.service.web import make_pages

    return make_pages(service).active_keeps()


def test_keep_postpones_the_release_give_back_now_and_gpu_again(service_hub):
    sh = service_hub
    sh.start("keeper", gpus=1)
    kernel = sh.open_notebook("keeper", "work.ipynb")
    sh.run("keeper", kernel, "answer = 42")
    sh.wait_gpu_state("keeper", "idle", idle_for=2)

    service = sh.service(gpu_idle_timeout=3600, max_keep_default=3600, release_notice_before=600)
    cycle(service)
    # the server learns, in the answer to its report, when its GPU would go back and why
    found = wait_for(lambda: notices(sh, "keeper").get("release_at"), 60, what="a planned release")
    assert found and notices(sh, "keeper")["release_rule"] == "gpu-idle"
    assert notices(sh, "keeper")["keep"] == {"allowed": True, "max_s": 3600.0, "refused": None}

    # bad input: 400 naming the field, before anything reaches the service
    r = ask(sh, "keeper", {"kind": "keep", "seconds": "an hour"})
    assert r.status_code == 400 and "seconds" in r.json()["message"]
    r = ask(sh, "keeper", {"kind": "keep"})
    assert r.status_code == 400 and "seconds" in r.json()["message"]
    # longer than the policy allows: refused by the service, nothing kept
    r = ask(sh, "keeper", {"kind": "keep", "seconds": 4 * 3600})
    assert r.status_code == 200 and r.json()["ok"] is False and "at most 1 h" in r.json()["message"]
    assert sh.store.actions("keeper", kinds=["keep"]) == []

    r = ask(sh, "keeper", {"kind": "keep", "seconds": 3600})
    assert r.status_code == 200 and r.json()["ok"] is True, r.text
    assert "kept until" in r.json()["message"]
    [keep] = sh.store.actions("keeper", kinds=["keep"])
    assert keep.actor == "keeper" and "1 h" in keep.reason

    # now the idle limit is long past: the keep holds the GPU, the plan says until when
    service.gpu_idle_timeout = 2
    service.policy_rules = service.rules()
    actions = cycle(service)
    assert not any(isinstance(a, ReleaseGpu) for a in actions), actions
    assert sh.devices("keeper"), "the kept GPU stays"
    plan = wait_for(lambda: notices(sh, "keeper").get("keep_until"), 60, what="the keep in notices")
    assert plan == notices(sh, "keeper")["release_at"]
    assert [k["user"] for k in service.keeps.active()] == ["keeper"]
    # the admin page's data (what `admin/keeps` and the page's "GPUs kept" table show)
    [shown] = sh.live.call(lambda: _keeps(service))
    assert shown["user"] == "keeper" and shown["left"] and "1 h" in shown["reason"]

    # "Give it back now": variables saved, restarted without the GPU
    r = ask(sh, "keeper", {"kind": "release"})
    assert r.status_code == 200 and r.json()["ok"] is True, r.text
    sh.live.call(service.executor.wait)
    wait_for(
        lambda: (m := sh.model("keeper")) and m.get("ready") and not m["state"]["gpus"],
        120,
        what="the release",
    )
    [release] = sh.store.actions("keeper", kinds=["release"])
    assert release.actor == "keeper" and release.status == "done"
    sh.wait_reported(service, "keeper")
    cycle(service)
    released = wait_for(lambda: notices(sh, "keeper").get("released"), 60, what="released notice")
    assert released["at"]

    # "GPU again": the give-back restarts with the GPU, and the variables come back
    r = ask(sh, "keeper", {"kind": "gpu-again"})
    assert r.status_code == 200 and r.json()["ok"] is True, r.text
    sh.live.call(service.executor.wait)
    wait_for(
        lambda: (m := sh.model("keeper")) and m.get("ready") and m["state"]["gpus"],
        120,
        what="the GPU back",
    )
    kernel = sh.open_notebook("keeper", "work.ipynb")
    wait_for(
        lambda: any(k.get("last_restore") for k in sh.status("keeper")["kernels"]),
        60,
        what="the automatic restore",
    )
    assert last_line(sh.run("keeper", kernel, "print(answer)")) == "42"
    sh.stop_everything()
