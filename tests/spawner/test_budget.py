"""Weekly GPU-hour budgets at admission, with the local spawner on simulated GPUs and a real
store: the 403 and its message, a spawn without GPU still allowed, the spawn form's line, a
queued spawn refused when its turn comes, admins held to the budget unless configured."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from tornado import web
from traitlets.config import Config

from gpuhub import nvml_fake
from gpuhub.spawner import local, queueing
from gpuhub.store import LeaseIntervalRow, Store

GPUS = ["GPU-aaaa", "GPU-bbbb"]
#: a Wednesday noon: the week started on Monday 00:00 UTC, 60 hours ago
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
QUOTAS = {
    "default": {"max_gpus": 2},
    "groups": {"students": {"weekly_gpu_hours": 2}, "others": {"weekly_gpu_hours": 1}},
}


@pytest.fixture
def one_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    scenario = tmp_path / "gpus.json"
    gpus = [{"uuid": GPUS[0], "name": "NVIDIA A100 (simulated)", "memory_total": 1}]
    nvml_fake.write_scenario(scenario, {"driver_version": "560.35.03", "gpus": gpus})
    monkeypatch.setenv("GPUHUB_FAKE_NVML", str(scenario))
    monkeypatch.setattr("gpuhub.spawner.mixin.utcnow", lambda: NOW)
    local._inventory_cache.clear()
    yield f"sqlite:///{tmp_path / 'store.sqlite'}"
    local._inventory_cache.clear()


def spawner_for(
    name: str,
    store_url: str,
    groups: tuple[str, ...] = (),
    admin: bool = False,
    budget_exempt_admins: bool = False,
    **traits,
) -> local.LocalGPUSpawner:
    user = SimpleNamespace(
        name=name,
        groups=[SimpleNamespace(name=g) for g in groups],
        spawners={},
        url=f"/user/{name}/",
        db=None,
        admin=admin,
    )
    config = Config()
    config.GpuhubConfig.store_url = store_url
    config.GpuhubConfig.budget_exempt_admins = budget_exempt_admins
    spawner = local.LocalGPUSpawner(user=user, hub=SimpleNamespace(), config=config, **traits)
    spawner.kernelspec_dir = str(Path(store_url.removeprefix("sqlite:///")).parent / "k" / name)
    spawner.quotas = QUOTAS
    spawner.queue_poll_interval = 0.05
    spawner.device_access = False  # no system users here (tests/spawner/test_device_access.py)
    return spawner


def held_earlier(store_url: str, user: str, hours: float, server: str = "earlier") -> None:
    """`user`'s `server` held a GPU for `hours` on Tuesday, this week."""
    store = Store.at(store_url)
    store.lease_devices(user, server, "gpu", ["GPU-elsewhere"], 1)
    store.free_leases(user, server)
    start = NOW - timedelta(days=1)
    engine = sa.create_engine(store_url)
    with engine.begin() as c:
        c.execute(
            sa.update(LeaseIntervalRow)
            .where(LeaseIntervalRow.user == user, LeaseIntervalRow.server == server)
            .values(started_at=start, ended_at=start + timedelta(hours=hours))
        )
    engine.dispose()


def refusal(e: pytest.ExceptionInfo[web.HTTPError]) -> tuple[int, str]:
    return e.value.status_code, e.value.log_message % e.value.args


def test_over_budget_no_gpu_but_a_server_without_one(one_gpu: str) -> None:
    held_earlier(one_gpu, "lin", 2.25)
    lin = spawner_for("lin", one_gpu, groups=("students",))
    form = asyncio.run(lin.render_options_form())
    assert "You used 2.25 of the 2 GPU-hours of group students this week" in form
    with pytest.raises(web.HTTPError) as e:
        asyncio.run(lin.apply_gpuhub_options({"gpus": 1}))
    assert refusal(e) == (
        403,
        "you used 2.25 of the 2 GPU-hours of group students this week; "
        "the budget renews Monday 00:00 UTC",
    )
    assert Store.at(one_gpu).leases("lin") == []
    selection = asyncio.run(lin.apply_gpuhub_options({"gpus": 0}))
    assert selection.gpus == 0


def test_under_budget_the_form_says_what_is_left_and_the_spawn_counts_for_the_group(
    one_gpu: str,
) -> None:
    held_earlier(one_gpu, "mo", 0.5)
    mo = spawner_for("mo", one_gpu, groups=("students", "others"))  # the larger budget: 2 h
    form = asyncio.run(mo.render_options_form())
    assert "GPU-hours this week: 0.5 of 2 used (group students), 1.5 left" in form
    asyncio.run(mo.apply_gpuhub_options({"gpus": 1}))
    [interval] = [i for i in Store.at(one_gpu).intervals_to_credit() if i.ended_at is None]
    assert (interval.user, interval.group, interval.device) == ("mo", "students", GPUS[0])
    # no budget: nothing on the form; a budget of a group the user is not in never applies
    free = spawner_for("free", one_gpu, groups=("researchers",))
    assert "gpuhub-budget" not in asyncio.run(free.render_options_form())


def test_admins_are_held_to_the_budget_unless_configured(one_gpu: str) -> None:
    held_earlier(one_gpu, "root", 1.0)
    admin = spawner_for("root", one_gpu, groups=("others",), admin=True)
    with pytest.raises(web.HTTPError) as e:
        asyncio.run(admin.apply_gpuhub_options({"gpus": 1}))
    assert "you used 1 of the 1 GPU-hours of group others" in refusal(e)[1]
    exempt = spawner_for("root", one_gpu, groups=("others",), admin=True, budget_exempt_admins=True)
    assert asyncio.run(exempt.apply_gpuhub_options({"gpus": 1})).gpus == 1


def test_a_queued_spawn_is_refused_when_its_turn_comes_over_budget(one_gpu: str) -> None:
    store = Store.at(one_gpu)
    held_earlier(one_gpu, "bob", 1.5)
    ada = spawner_for("ada", one_gpu)
    bob = spawner_for("bob", one_gpu, groups=("students",))

    async def scenario() -> tuple[int, str]:
        await ada.apply_gpuhub_options({"gpus": 1})  # the only GPU
        waiting = asyncio.ensure_future(bob.apply_gpuhub_options({"gpus": 1}))
        for _ in range(200):
            if store.queue():
                break
            await asyncio.sleep(0.02)
        assert [e.user for e in store.queue()] == ["bob"], "bob waits: 1.5 of 2 h used"
        held_earlier(one_gpu, "bob", 1.0, server="other")  # meanwhile his other server held one
        ada.free_leases()  # the GPU is free: bob's turn
        with pytest.raises(web.HTTPError) as e:
            await asyncio.wait_for(waiting, 10)
        return refusal(e)

    assert asyncio.run(scenario()) == (
        403,
        "you used 2.5 of the 2 GPU-hours of group students this week; "
        "the budget renews Monday 00:00 UTC",
    )
    assert store.queue() == [] and store.leases("bob") == []
    queueing.wake_waiting_spawns()
