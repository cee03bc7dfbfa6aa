"""GPU release against a real hub with real single-user servers on simulated GPUs: an idle GPU
is given back without losing the kernel's variables, a busy one (or one whose kernel is working)
is kept, and the user gets the GPU back with the same options."""

from __future__ import annotations

import pytest

from gpuhub.core.decide import (
    RULE_GPU_IDLE,
    RULE_SERVER_IDLE,
    RULE_WORK_IN_PROGRESS,
    ReleaseGpu,
    StopServer,
    Warn,
)
from gpuhub.testing import wait_for

from .helpers import cycle, last_line, metric

pytestmark = pytest.mark.slow


def test_idle_gpu_released_busy_kept_variables_back(service_hub):
    sh = service_hub
    sh.start("idle-ada", gpus=1)
    sh.start("busy-bob", gpus=1)
    sh.start("working-cy", gpus=1)
    idle_device = sh.devices("idle-ada")[0]
    sh.set_util(sh.devices("busy-bob")[0], 80)

    kernel = sh.open_notebook("idle-ada", "work.ipynb")
    sh.run("idle-ada", kernel, "weights = [41 + 1] * 3\nepoch = 7")
    cy_kernel = sh.open_notebook("working-cy", "train.ipynb")
    sh.run("working-cy", cy_kernel, "import time; time.sleep(600)", wait=False)

    sh.wait_gpu_state("idle-ada", "idle", idle_for=2)
    sh.wait_gpu_state("working-cy", "idle", idle_for=2)
    sh.wait_gpu_state("busy-bob", "busy")

    service = sh.service(gpu_idle_timeout=2)
    actions = cycle(service)

    by_user = {a.user: a for a in actions}
    assert isinstance(by_user["idle-ada"], ReleaseGpu)
    assert by_user["idle-ada"].rule == RULE_GPU_IDLE
    assert "busy-bob" not in by_user, "a busy GPU is not released"
    assert isinstance(by_user["working-cy"], Warn)
    assert by_user["working-cy"].rule == RULE_WORK_IN_PROGRESS

    # released: running again, same interface and environment, no GPU, lease freed
    model = sh.model("idle-ada")
    assert model["ready"]
    assert model["user_options"]["gpus"] == 0
    assert model["user_options"]["interface"] == "jupyterlab"
    assert model["user_options"]["environment"] == "pytorch"
    assert model["state"]["gpus"] == []
    assert sh.leases("idle-ada") == []
    # the others keep their GPUs
    assert len(sh.devices("busy-bob")) == 1 and sh.leases("busy-bob") == sh.devices("busy-bob")
    assert len(sh.devices("working-cy")) == 1

    # recorded: who, what, why, when, which snapshot
    [release] = sh.store.actions("idle-ada", kinds=["release"])
    assert release.status == "done" and release.actor == "gpuhub-service"
    assert release.rule == RULE_GPU_IDLE and "idle for" in release.reason
    assert release.user_options["gpus"] == 1 and release.gpus == 1
    [snap] = release.snapshots
    assert snap["notebook"] == "work.ipynb" and snap["status"] == "saved"
    assert release.notified_at is not None
    [warning] = sh.store.actions("working-cy", kinds=["warn"])
    assert warning.rule == RULE_WORK_IN_PROGRESS and "kernel is executing" in warning.reason

    # the user reads why, in the server itself
    notice = sh.read_file("idle-ada", "GPUHUB-NOTICE.md")
    assert notice is not None and "idle for" in notice and snap["snapshot"] in notice
    cy_notice = sh.read_file("working-cy", "GPUHUB-NOTICE.md")
    assert cy_notice is not None and "kernel is executing" in cy_notice

    # the notebook's variables come back when it is opened again
    kernel = sh.open_notebook("idle-ada", "work.ipynb")
    wait_for(
        lambda: any(k.get("last_restore") for k in sh.status("idle-ada")["kernels"]),
        60,
        what="the automatic restore",
    )
    assert last_line(sh.run("idle-ada", kernel, "print(weights, epoch)")) == "[42, 42, 42] 7"

    assert metric(service, "gpuhub_releases_total", rule=RULE_GPU_IDLE, gpu_type="gpu") == 1
    assert metric(service, "gpuhub_notices_total", rule=RULE_WORK_IN_PROGRESS) == 1

    # a second cycle neither acts again nor repeats the warning
    again = cycle(service)
    assert not any(isinstance(a, ReleaseGpu) for a in again)
    assert len(sh.store.actions("working-cy", kinds=["warn"])) == 1

    # the user asks for the GPU back: same options, a GPU again, variables still there
    sh.run("idle-ada", kernel, "epoch = 8")
    executor = service.executor

    async def gpu_again():
        await executor.gpu_again("idle-ada", "", actor="idle-ada")
        await executor.wait()

    # in the service's own event loop, where the servers' reports (and so the snapshot's and the
    # notice's results) arrive
    sh.live.call(gpu_again)
    model = sh.model("idle-ada")
    assert model["user_options"]["gpus"] == 1 and len(model["state"]["gpus"]) == 1
    assert sh.leases("idle-ada") == model["state"]["gpus"]
    kernel = sh.open_notebook("idle-ada", "work.ipynb")
    wait_for(
        lambda: any(k.get("last_restore") for k in sh.status("idle-ada")["kernels"]),
        60,
        what="the automatic restore",
    )
    assert last_line(sh.run("idle-ada", kernel, "print(weights, epoch)")) == "[42, 42, 42] 8"
    assert idle_device  # the GPU came from the pool (any free one)

    sh.stop_everything()


def test_dry_run_changes_nothing(service_hub):
    sh = service_hub
    sh.start("dry-dan", gpus=1)
    sh.wait_gpu_state("dry-dan", "idle", idle_for=2)
    before = len(sh.store.actions())
    service = sh.service(gpu_idle_timeout=1, dry_run=True)
    actions = cycle(service)
    assert any(isinstance(a, ReleaseGpu) and a.user == "dry-dan" for a in actions)
    assert sh.model("dry-dan")["user_options"]["gpus"] == 1
    assert len(sh.devices("dry-dan")) == 1
    assert len(sh.store.actions()) == before
    assert service.executor.planned[0]["user"] == "dry-dan"
    assert metric(service, "gpuhub_dry_run") == 1
    sh.stop_everything()


def test_idle_server_snapshotted_then_stopped(service_hub):
    sh = service_hub
    sh.start("gone-gus", gpus=0)
    kernel = sh.open_notebook("gone-gus", "report.ipynb")
    sh.run("gone-gus", kernel, "draft = 'chapter 1'")
    service = sh.service(server_idle_timeout=1)
    wait_for(
        lambda: any(isinstance(a, StopServer) and a.user == "gone-gus" for a in cycle(service)),
        60,
        what="the idle server stopped",
    )
    assert sh.model("gone-gus") is None
    [stop] = sh.store.actions("gone-gus", kinds=["stop"])
    assert stop.status == "done" and stop.rule == RULE_SERVER_IDLE
    assert stop.snapshots[0]["notebook"] == "report.ipynb"
    notice = sh.hub.state_dir / "home" / "gone-gus" / "GPUHUB-NOTICE.md"
    assert "stopped this server" in notice.read_text()
    assert metric(service, "gpuhub_stops_total", rule=RULE_SERVER_IDLE) == 1
    # started again, the notebook's variables come back
    sh.start("gone-gus", gpus=0)
    kernel = sh.open_notebook("gone-gus", "report.ipynb")
    wait_for(
        lambda: any(k.get("last_restore") for k in sh.status("gone-gus")["kernels"]),
        60,
        what="the automatic restore",
    )
    assert last_line(sh.run("gone-gus", kernel, "print(draft)")) == "chapter 1"
    sh.stop_everything()
