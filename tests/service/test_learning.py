"""The service's learned release policy: what it learns survives a restart, the store stays
bounded, bad settings are refused by name, and against a real hub an idle GPU goes back after the
learned limit with the reason in the history and the notice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from traitlets.config import Config

from gpuhub.core.decide import RULE_GPU_IDLE_LEARNED, ReleaseGpu, ServerView
from gpuhub.core.idle import Activity
from gpuhub.core.learned import SERVER, SITE, USER
from gpuhub.service.app import GpuhubService
from gpuhub.service.learning import OPEN, LearnedRelease
from gpuhub.store import Store

from .helpers import cycle

MIN = 60.0
FLAT = 1800.0


def view(user: str, idle_since: float | None, server: str = "") -> ServerView:
    act = Activity("busy", 0.9, None) if idle_since is None else Activity("idle", 0.0, idle_since)
    return ServerView(user, server, gpus=1, gpu_type="a100", gpu_activity=(act,))


def learner(store: Store, **settings: float) -> LearnedRelease:
    return LearnedRelease(store, config=Config({"LearnedRelease": settings}))


def pauses(lr: LearnedRelease, user: str, lengths: list[float], t: float = 0.0) -> float:
    """Drive `lr` through pauses of these lengths, one cycle a minute; returns the time after."""
    for length in lengths:
        lr.update([view(user, t)], t, FLAT)
        lr.update([view(user, t)], t + length - 1, FLAT)
        t += length
        lr.update([view(user, None)], t, FLAT)  # the GPU is busy again
        t += MIN
    return t


def test_what_was_learned_survives_a_restart(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    lr = learner(store, gpu_hour_value=300.0)
    t = pauses(lr, "ada", [40 * MIN] * 12)
    limits = lr.update([view("ada", t)], t + MIN, FLAT)
    assert limits[("ada", "")].seconds == 3 * MIN
    assert "this server's pauses longer than 3 min lasted 40 min" in limits[("ada", "")].why

    rows = {(scope, key): data for scope, key, data in store.idle_gaps()}
    assert len(rows[(SERVER, "ada/")]) == 12 and len(rows[(SITE, "")]) == 12
    assert (USER, "ada") in rows
    assert rows[(OPEN, json.dumps(["ada", ""]))][0] == t  # the pause under way

    again = learner(Store(f"sqlite:///{tmp_path / 's.sqlite'}"), gpu_hour_value=300.0)
    limits = again.update([view("ada", t)], t + 2 * MIN, FLAT)
    assert limits[("ada", "")] == lr.current[("ada", "")]
    # the pause under way was remembered too: it ends, and is counted, after the restart
    again.update([view("ada", None)], t + 30 * MIN, FLAT)
    assert len(again.model.histories[(SERVER, "ada/")]) == 13
    assert not any(scope == OPEN for scope, _k, _d in store.idle_gaps())


def test_the_store_stays_bounded(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    lr = learner(store, max_keys=3)
    t = 0.0
    for i in range(10):
        t = pauses(lr, f"user{i}", [5 * MIN], t)
    assert len(store.idle_gaps()) <= 2 * 3 + 1
    assert len(lr.model.histories) <= 3 + 1
    site = [d for scope, _k, d in store.idle_gaps() if scope == SITE]
    assert len(site[0]) == 10  # the site keeps every pause (up to gaps_site)


def test_an_unreadable_store_means_the_flat_timeout_until_it_reads(tmp_path, monkeypatch):
    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    pauses(learner(store, gpu_hour_value=300.0), "ada", [40 * MIN] * 12)
    lr = learner(store, gpu_hour_value=300.0)

    def broken():
        raise RuntimeError("database is locked")

    monkeypatch.setattr(store, "idle_gaps", broken)
    assert lr.update([view("ada", 0.0)], 60.0, FLAT) == {}
    assert len(Store.idle_gaps(store)) == 3  # server, user, site: nothing overwritten
    monkeypatch.undo()
    limit = lr.update([view("ada", 0.0)], 120.0, FLAT)[("ada", "")]
    assert limit.seconds == 3 * MIN


def test_without_history_the_flat_timeout_applies(tmp_path):
    lr = learner(Store(f"sqlite:///{tmp_path / 's.sqlite'}"))
    limit = lr.update([view("ada", 0.0)], 60.0, FLAT)[("ada", "")]
    assert limit.seconds == FLAT and not limit.learned
    assert lr.thresholds() == [
        {
            "user": "ada",
            "server": "",
            "limit_s": FLAT,
            "learned": False,
            "why": "limit 30 min; no pauses learned yet",
        }
    ]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"GpuhubService": {"release_policy": "smart"}}, "release_policy: 'smart'"),
        ({"LearnedRelease": {"gpu_hour_value": 0.0}}, "LearnedRelease.gpu_hour_value:"),
        ({"LearnedRelease": {"max_keys": 0}}, "LearnedRelease.max_keys:"),
    ],
)
def test_bad_settings_are_refused_by_name(tmp_path, settings, message):
    c = Config(settings)
    c.GpuhubService.api_token = "secret"
    c.GpuhubService.store_url = f"sqlite:///{tmp_path / 's.sqlite'}"
    service = GpuhubService(config=c)
    with pytest.raises(SystemExit, match=message):
        service.setup()


def test_generated_config_lists_the_learned_settings():
    out = subprocess.run(
        [sys.executable, "-m", "gpuhub.service", "--generate-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "c.GpuhubService.release_policy = 'flat'" in out
    for name in LearnedRelease.class_own_traits(config=True):
        assert f"c.LearnedRelease.{name} =" in out, name


@pytest.mark.slow
def test_idle_gpu_released_after_the_learned_limit(service_hub):
    sh = service_hub
    # what the site learned before: ada's pauses last about 40 minutes
    seed = learner(sh.store, gpu_hour_value=300.0)
    pauses(seed, "learn-ada", [40 * MIN] * 12)
    sh.start("learn-ada", gpus=1)
    sh.wait_gpu_state("learn-ada", "idle", idle_for=3)

    service = sh.service(release_policy="learned", gpu_idle_timeout=3600)
    service.learning = learner(sh.store, gpu_hour_value=300.0, min_idle=2.0)
    actions = cycle(service)
    [release] = [a for a in actions if isinstance(a, ReleaseGpu) and a.user == "learn-ada"]
    assert release.rule == RULE_GPU_IDLE_LEARNED
    assert "this server's pauses longer than 2 s lasted 40 min on average" in release.reason
    # the admin page shows the limit that cycle used, and why
    from gpuhub.service.web import make_pages

    limits = make_pages(service).release_limits_view()
    assert limits["policy"] == "learned" and limits["flat"] == "1 h"
    [row] = [r for r in limits["servers"] if r["user"] == "learn-ada"]
    assert row["learned"] and row["limit_s"] == release_limit(service, "learn-ada")
    assert row["why"] in release.reason
    assert sh.model("learn-ada")["user_options"]["gpus"] == 0
    [record] = sh.store.actions("learn-ada", kinds=["release"])
    assert record.status == "done" and record.reason == release.reason
    notice = sh.read_file("learn-ada", "GPUHUB-NOTICE.md")
    assert notice is not None and "lasted 40 min on average" in notice
    sh.stop_everything()


def release_limit(service: GpuhubService, user: str) -> float:
    return service.learning.current[(user, "")].seconds
