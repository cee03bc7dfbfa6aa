"""What a spawn request may ask for: forged options, quotas, and N+1 concurrent spawns on N GPUs."""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gpuhub.store import Store
from gpuhub.testing import Hub, wait_for

HERE = Path(__file__).parent

# (request body, the field the 400 must name). Bodies are sent as they are.
FORGED = [
    ({"user_options": {"gpus": True}}, "gpus"),
    ({"user_options": {"gpus": False}}, "gpus"),
    ({"user_options": {"gpus": "1.5"}}, "gpus"),
    ({"user_options": {"gpus": 1.5}}, "gpus"),
    ({"user_options": {"gpus": -1}}, "gpus"),
    ({"user_options": {"gpus": "-1"}}, "gpus"),
    ({"user_options": {"gpus": "abc"}}, "gpus"),
    ({"user_options": {"gpus": "1e3"}}, "gpus"),
    ({"user_options": {"gpus": "\uff15"}}, "gpus"),
    ({"user_options": {"gpus": [1]}}, "gpus"),
    ({"user_options": {"gpus": {"count": 1}}}, "gpus"),
    ({"user_options": {"gpus": 10**30}}, "gpus"),
    ({"user_options": {"gpus": 9}}, "gpus"),
    ({"user_options": {"gpus": 5}}, "gpus"),
    ({"user_options": {"gpus": math.nan}}, "gpus"),
    ({"user_options": {"environment": "no-such-env"}}, "environment"),
    ({"user_options": {"environment": 5}}, "environment"),
    ({"user_options": {"environment": ["pytorch"]}}, "environment"),
    ({"user_options": {"environment": ""}}, "environment"),
    ({"user_options": {"environment": "<script>alert(1)</script>"}}, "environment"),
    ({"user_options": {"environment": "../../etc/passwd"}}, "environment"),
    ({"user_options": {"environment": "x" * 10000}}, "environment"),
    ({"user_options": {"environment": "staff-only"}}, "environment"),
    ({"user_options": {"interface": "emacs"}}, "interface"),
    ({"user_options": {"interface": 1}}, "interface"),
    ({"user_options": {"interface": True}}, "interface"),
    ({"user_options": {"interface": {"id": "vscode"}}}, "interface"),
    ({"user_options": {"interface": "vscode", "environment": "lab-only"}}, "interface"),
    ({"user_options": {"gpu_type": "h100", "gpus": 1}}, "gpu_type"),
    ({"user_options": {"gpu_type": 0}}, "gpu_type"),
    ({"user_options": {"gpu_type": ["gpu"]}}, "gpu_type"),
    ({"user_options": {"gpu_type": "staff-gpu", "gpus": 1}}, "gpu_type"),
    ({"user_options": {"image": "evil/miner:latest"}}, "image"),
    ({"user_options": {"cmd": ["rm", "-rf", "/"]}}, "cmd"),
    ({"user_options": {"env": {"LD_PRELOAD": "/tmp/x.so"}}}, "env"),
    ({"user_options": {"GPUS": 1}}, "GPUS"),
    ({"user_options": {"gpus": 1, "profile": "gpu-large"}}, "profile"),
    ({"user_options": [1, 2]}, "user_options"),
    ({"user_options": "gpus=1"}, "user_options"),
    ({"gpus": 1, "kubespawner_override": {"image": "x"}}, "kubespawner_override"),
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory, run_marker):
    hub = Hub(
        tmp_path_factory.mktemp("admission"),
        run_marker,
        env_overrides={"GPUHUB_CATALOG": str(HERE / "catalog-restricted.yaml")},
    ).start()
    yield hub
    hub.stop_all_servers()
    hub.stop()


def test_there_are_enough_forged_cases():
    assert len(FORGED) >= 30


@pytest.mark.parametrize(
    ("body", "field"), FORGED, ids=[f"{i:02d}-{f}" for i, (_b, f) in enumerate(FORGED)]
)
def test_forged_options_are_refused_with_the_field_named(hub, body, field):
    name = "forger"
    hub.ensure_user(name)
    r = hub.request("POST", f"/users/{name}/server", data=json.dumps(body))
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert re.search(rf"(?<![\w-]){re.escape(field)}(?![\w-])", message), message
    assert "Traceback" not in r.text
    assert hub.user(name)["servers"] == {}, "no server is started"


def test_pool_size_is_checked(hub):
    # The type allows 8 per server but the pool has 4 GPUs in all.
    r = hub.spawn("greedy", {"gpus": 5})
    assert r.status_code == 400
    assert "the pool has 4" in r.json()["message"]


def test_quota_of_the_group_is_named(hub):
    name = "student-quota"
    hub.login(name)  # the demo puts student-* users into group `students` (1 GPU, 1 server)
    assert hub.user(name)["groups"] == ["students"]
    r = hub.spawn(name, {"gpus": 2})
    assert r.status_code == 403
    assert r.json()["message"] == (
        "you hold 0 of the 1 GPU allowed to group students; 2 more would go over the limit"
    )
    assert hub.spawn(name, {"gpus": 1}).status_code in (201, 202)
    hub.wait_ready(name)
    r = hub.spawn(name, {"gpus": 0}, server="second")
    assert r.status_code == 403
    assert r.json()["message"].startswith("you run 1 of the 1 server allowed to group students")
    hub.stop_server(name)


def test_the_most_generous_group_applies(hub):
    name = "researcher-quota"
    hub.login(name)  # group `researchers`: 2 GPUs
    assert hub.spawn(name, {"gpus": 2}).status_code in (201, 202)
    hub.wait_ready(name)
    r = hub.spawn(name, {"gpus": 1}, server="more")
    assert r.status_code == 403
    assert r.json()["message"].startswith("you hold 2 of the 2 GPUs allowed to group researchers")
    hub.stop_server(name)


@pytest.fixture(scope="module")
def pg_hub(tmp_path_factory, run_marker, postgres):
    """The same hub with its store on PostgreSQL (GPUHUB_STORE_URL)."""
    url = postgres.url()
    hub = Hub(
        tmp_path_factory.mktemp("admission-pg"),
        run_marker,
        env_overrides={
            "GPUHUB_CATALOG": str(HERE / "catalog-restricted.yaml"),
            "GPUHUB_STORE_URL": url,
        },
    ).start()
    hub.store_url = url  # type: ignore[attr-defined]
    yield hub
    hub.stop_all_servers()
    hub.stop()


def test_n_plus_one_concurrent_spawns_on_n_gpus(hub):
    n_plus_one_concurrent_spawns(hub, Store.at(f"sqlite:///{hub.state_dir / 'gpuhub.sqlite'}"))


def test_n_plus_one_concurrent_spawns_on_n_gpus_postgresql(pg_hub):
    n_plus_one_concurrent_spawns(pg_hub, Store.at(pg_hub.store_url))
    assert not list(pg_hub.state_dir.glob("gpuhub.sqlite*")), "the store is PostgreSQL alone"


def n_plus_one_concurrent_spawns(hub, store):  # type: ignore[no-untyped-def]
    """Five spawns at once on four GPUs: four start, each on its own GPU; the fifth waits in
    the queue and gets the first GPU that is freed."""
    names = [f"race-{i}" for i in range(5)]
    for name in names:
        hub.ensure_user(name)
    with ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(lambda n: hub.spawn(n, {"gpus": 1}), names))
    assert all(r.status_code in (201, 202) for r in responses), [r.text for r in responses]

    def servers() -> dict[str, dict]:
        return {n: hub.user(n)["servers"].get("") or {} for n in names}

    wait_for(
        lambda: sum(1 for s in servers().values() if s.get("ready")) == 4,
        120,
        what="four servers ready",
    )
    now = servers()
    started = [n for n in names if now[n].get("ready")]
    (waiting,) = [n for n in names if not now[n].get("ready")]
    assert now[waiting]["pending"] == "spawn"
    assert [(e.user, e.gpus) for e in store.queue()] == [(waiting, 1)]
    gpus = [tuple(now[n]["state"]["gpus"]) for n in started]
    assert all(len(g) == 1 for g in gpus)
    assert len({g[0] for g in gpus}) == 4, "every server got its own GPU"

    hub.stop_server(started[0])
    model = hub.wait_ready(waiting)
    assert tuple(model["state"]["gpus"]) == gpus[0], "the freed GPU goes to the waiting spawn"
    assert store.queue() == []
    for name in [*started[1:], waiting]:
        hub.stop_server(name)


def test_the_gpu_quota_holds_through_the_wait_queue(hub):
    """A user with a 1-GPU quota (the default: no group) asks for a GPU in two named servers
    while none is free: the first waits in the queue, the second is refused at once. And a quota
    lowered while a spawn waits is checked again when the spawn takes its GPU."""
    store = Store.at(f"sqlite:///{hub.state_dir / 'gpuhub.sqlite'}")
    filler = "admin-filler"  # staff: 4 GPUs
    hub.login(filler)
    assert hub.spawn(filler, {"gpus": 4}).status_code in (201, 202)
    hub.wait_ready(filler)

    name = "queue-quota"
    hub.ensure_user(name)  # no group: the default quota, 1 GPU and 2 servers
    assert hub.spawn(name, {"gpus": 1}, server="a").status_code == 202
    wait_for(lambda: [e.server for e in store.queue()] == ["a"], 60, what="a in the queue")
    r = hub.spawn(name, {"gpus": 1}, server="b")
    assert r.status_code == 403, r.text
    assert r.json()["message"] == (
        "you hold 0 and wait for 1 of the 1 GPU allowed; 1 more would go over the limit"
    )
    assert [e.server for e in store.queue()] == ["a"]

    # checked again when the GPU is taken: a quota lowered while the spawn waited
    other = "queue-recheck"
    hub.ensure_user(other)
    assert hub.request("POST", "/groups/recheck").status_code in (201, 409)
    hub.request("POST", "/groups/recheck/users", json={"users": [other]}).raise_for_status()
    store.put_group_quota("recheck", 2, None, "test")
    hub.stop_server(filler)
    hub.wait_ready(name, "a")
    assert hub.spawn(filler, {"gpus": 2}).status_code in (201, 202)  # 3 of 4 GPUs taken now
    hub.wait_ready(filler)
    assert hub.spawn(other, {"gpus": 1}, server="one").status_code in (201, 202)
    hub.wait_ready(other, "one")
    assert hub.spawn(other, {"gpus": 1}, server="two").status_code == 202  # none free: waits
    wait_for(lambda: [e.server for e in store.queue()] == ["two"], 60, what="two in the queue")
    store.put_group_quota("recheck", 1, None, "test")
    try:
        hub.stop_server(filler)
        wait_for(lambda: "two" not in hub.user(other)["servers"], 60, what="two refused")
        assert [lease.server for lease in store.leases(other)] == ["one"]
        assert store.queue() == []
        assert "queue-recheck:two refused when taking its GPUs" in hub.log()
        assert (
            "HTTP 403: Forbidden (you hold 1 of the 1 GPU allowed to group recheck; "
            "1 more would go over the limit)" in hub.log()
        )
    finally:
        store.delete_group_quota("recheck")
        for user, server in ((name, "a"), (other, "one"), (other, "two"), (filler, "")):
            hub.stop_server(user, server)
    assert [lease.user for lease in store.leases()] == []
