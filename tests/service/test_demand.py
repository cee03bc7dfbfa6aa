"""Demand-aware reclaim with the real wait queue: a user queued for a GPU gets the one of the
longest-idle holder; busy holders and the other idle ones keep theirs."""

from __future__ import annotations

import pytest

from gpuhub.core.decide import RULE_GPU_DEMAND, ReleaseGpu
from gpuhub.testing import wait_for

from .helpers import cycle, metric

pytestmark = pytest.mark.slow


def test_queued_user_gets_the_gpu_of_the_longest_idle_holder(service_hub):
    sh = service_hub
    # the pool's four GPUs: the oldest holder works, the three others sit idle
    sh.start("holder-a-busy", gpus=1)
    sh.set_util(sh.devices("holder-a-busy")[0], 90)
    for name in ("holder-b", "holder-c", "holder-d"):
        sh.start(name, gpus=1)
    longest_idle = sh.devices("holder-b")[0]
    sh.wait_gpu_state("holder-a-busy", "busy")
    for name in ("holder-b", "holder-c", "holder-d"):
        sh.wait_gpu_state(name, "idle", idle_for=1)

    # no GPU free: the spawn waits in the queue
    r = sh.hub.spawn("queued-quinn", {"gpus": 1})
    assert r.status_code == 202, r.text
    wait_for(
        lambda: [e.user for e in sh.store.queue()] == ["queued-quinn"],
        60,
        what="quinn in the queue",
    )

    # nothing is idle for the normal timeout; under demand the shorter grace applies
    # two users per page: the listing takes three pages
    service = sh.service(gpu_idle_timeout=3600, gpu_idle_timeout_under_demand=1, page_size=2)
    assert metric(service, "gpuhub_queue_length", gpu_type="gpu") == 0
    actions = cycle(service)

    released = [a for a in actions if isinstance(a, ReleaseGpu)]
    assert [(a.user, a.rule) for a in released] == [("holder-b", RULE_GPU_DEMAND)]
    assert "queued-quinn" in released[0].reason
    assert metric(service, "gpuhub_queue_length", gpu_type="gpu") == 1
    assert metric(service, "gpuhub_gpus_total", gpu_type="gpu") == 4
    assert metric(service, "gpuhub_gpus_allocated", gpu_type="gpu") == 4
    assert metric(service, "gpuhub_gpus_idle", gpu_type="gpu") == 3
    assert metric(service, "gpuhub_servers", status="readable") == 4  # quinn's is not ready

    model = sh.hub.wait_ready("queued-quinn")
    assert model["state"]["gpus"] == [longest_idle], "the freed GPU went to the queued user"
    assert sh.store.queue() == []
    assert sh.model("holder-b")["user_options"]["gpus"] == 0
    for name in ("holder-a-busy", "holder-c", "holder-d"):
        assert len(sh.devices(name)) == 1, f"{name} keeps its GPU"
    [release] = sh.store.actions("holder-b", kinds=["release"])
    assert release.status == "done" and release.rule == RULE_GPU_DEMAND

    # the queue is empty again: nothing more is reclaimed
    assert not [a for a in cycle(service) if isinstance(a, ReleaseGpu)]
    sh.stop_everything()
