"""core.learned: pauses followed from the views, limits learned from them, and decide's use."""

from __future__ import annotations

import pytest

from gpuhub.core.decide import (
    RULE_GPU_IDLE,
    RULE_GPU_IDLE_LEARNED,
    Demand,
    ReleaseGpu,
    Rules,
    ServerView,
    Warn,
    decide,
)
from gpuhub.core.idle import Activity
from gpuhub.core.learned import SERVER, SITE, USER, Gap, GapModel, IdleTimeout, LearnedSettings

MIN = 60.0
FLAT = 1800.0


def view(user: str, now: float, *, idle_since: float | None = None, gpus: int = 1, **kw):
    if gpus and idle_since is not None:
        acts = tuple(Activity("idle", 0.0, idle_since) for _ in range(gpus))
    elif gpus:
        acts = tuple(Activity("busy", 0.9, None) for _ in range(gpus))
    else:
        acts = ()
    return ServerView(user, gpus=gpus, gpu_type="a100" if gpus else None, gpu_activity=acts, **kw)


def model_with(gaps: dict[str, list[float]], **settings) -> GapModel:
    m = GapModel(LearnedSettings(**settings))
    for user, lengths in gaps.items():
        for length in lengths:
            m.record((user, ""), Gap(length))
    return m


def test_without_history_the_flat_timeout_applies():
    m = GapModel()
    limit = m.release_after(view("ada", 0.0, idle_since=0.0), FLAT)
    assert limit == IdleTimeout(FLAT, "limit 30 min; no pauses learned yet", learned=False)


def test_long_pauses_are_released_after_the_minimum_idle_time_with_the_reason():
    # a GPU-hour worth 5 minutes of waiting: holding 37 more minutes costs 3 minutes, a restart 1
    m = model_with({"ada": [40 * MIN] * 20}, gpu_hour_value=300.0)
    limit = m.release_after(view("ada", 0.0, idle_since=0.0), FLAT)
    assert limit.learned and limit.seconds == 3 * MIN
    assert limit.why == "this server's pauses longer than 3 min lasted 40 min on average"


def test_short_pauses_are_held_through_and_sessions_differ():
    # bob pauses 8 minutes between cells, ada goes away for an hour; both on one site
    m = model_with({"bob": [8 * MIN] * 30, "ada": [60 * MIN] * 30}, gpu_hour_value=300.0)
    bob = m.release_after(view("bob", 0.0, idle_since=0.0), FLAT)
    ada = m.release_after(view("ada", 0.0, idle_since=0.0), FLAT)
    assert ada.seconds == 3 * MIN
    assert bob.seconds >= 8 * MIN  # bob keeps his GPU through his usual pause
    assert bob.seconds < FLAT  # and still goes back sooner than the flat timeout


def test_more_gpus_go_back_sooner():
    # half the pauses end after 10 minutes, half after 40: holding a 1-GPU server over the
    # short ones is cheaper than a restart, holding 8 GPUs is not
    m = model_with({"ada": [10 * MIN, 40 * MIN] * 20}, gpu_hour_value=60.0)
    one = m.release_after(view("ada", 0.0, idle_since=0.0, gpus=1), FLAT)
    eight = m.release_after(view("ada", 0.0, idle_since=0.0, gpus=8), FLAT)
    assert eight.seconds == 3 * MIN
    assert one.seconds > 10 * MIN


def test_with_the_defaults_a_restart_weighs_more_than_a_short_hold():
    # 60 s of restart against 10 s per GPU-hour: a pause that always ends after 40 minutes is
    # held to its end, and the GPU goes back when no pause seen lasted longer
    m = model_with({"ada": [40 * MIN] * 20})
    limit = m.release_after(view("ada", 0.0, idle_since=0.0), FLAT)
    assert limit.seconds == 40 * MIN and limit.seconds > FLAT
    assert limit.why == "too few pauses longer than 40 min to hold longer"


def test_never_below_the_minimum_idle_time():
    m = model_with({"ada": [2 * MIN] * 50 + [600 * MIN] * 50}, min_idle=5 * MIN)
    assert m.release_after(view("ada", 0.0, idle_since=0.0), FLAT).seconds == 5 * MIN


def test_a_new_user_starts_from_the_site_history():
    m = model_with({"ada": [60 * MIN] * 30}, gpu_hour_value=300.0)
    limit = m.release_after(view("newcomer", 0.0, idle_since=0.0), FLAT)
    assert limit.seconds == 3 * MIN
    assert limit.why.startswith("this site's pauses longer than 3 min lasted 60 min")


def test_pauses_ending_with_the_server_gone_cost_no_restart():
    returned = model_with({"ada": [25 * MIN] * 30}, gpu_hour_value=5.0)
    gone = GapModel(LearnedSettings(gpu_hour_value=5.0))
    for _ in range(30):
        gone.record(("ada", ""), Gap(25 * MIN, returned=False))
    v = view("ada", 0.0, idle_since=0.0)
    assert returned.release_after(v, FLAT).seconds > gone.release_after(v, FLAT).seconds
    assert "30 of 30 ended with the server gone" in gone.release_after(v, FLAT).why


def test_observe_follows_a_pause_from_idle_to_busy():
    m = GapModel()
    m.observe([view("ada", 100.0, idle_since=40.0)], 100.0)
    m.observe([view("ada", 400.0, idle_since=40.0)], 400.0)
    assert m.histories == {}
    m.observe([view("ada", 460.0)], 460.0)  # the GPU is busy again
    assert [g.length for g in m.histories[(SERVER, "ada/")].gaps] == [420.0]
    assert len(m.histories[(USER, "ada")]) == len(m.histories[(SITE, "")]) == 1
    changed, opened = m.take_changed()
    assert changed == {(SERVER, "ada/"), (USER, "ada"), (SITE, "")}
    assert opened == {("ada", "")}


def test_observe_a_released_gpu_that_comes_back():
    m = GapModel()
    m.observe([view("ada", 600.0, idle_since=0.0)], 600.0)
    m.observe([view("ada", 700.0, gpus=0)], 700.0)  # released, running without GPU
    m.observe([view("ada", 4000.0, gpus=0)], 4000.0)
    # restarted with its GPU at 5000 s: a new idle period begins there
    m.observe([view("ada", 5030.0, idle_since=5000.0)], 5030.0)
    assert [g.length for g in m.histories[(SERVER, "ada/")].gaps] == [5000.0]


def test_observe_a_server_that_goes_away_ends_its_pause_without_a_return():
    m = GapModel(absent_grace=900.0)
    m.observe([view("ada", 600.0, idle_since=0.0)], 600.0)
    m.observe([], 1200.0)
    assert m.histories == {}  # still within the grace (a release under way)
    m.observe([], 1600.0)
    (gap,) = m.histories[(SERVER, "ada/")].gaps
    assert gap == Gap(600.0, returned=False)


def test_histories_are_bounded():
    m = GapModel(LearnedSettings(gaps_per_key=5, gaps_site=7, max_keys=4))
    for i in range(10):
        m.record((f"u{i}", ""), Gap(60.0 * i))
    assert len(m.histories[(SITE, "")]) == 7
    assert len(m.histories) <= 4 + 1
    assert (SERVER, "u9/") in m.histories  # the latest are kept
    for _ in range(10):
        m.record(("u9", ""), Gap(1.0))
    assert len(m.histories[(SERVER, "u9/")]) == 5


def test_state_round_trips_through_json():
    m = model_with({"ada": [40 * MIN] * 20})
    m.observe([view("ada", 100.0, idle_since=10.0)], 100.0)
    other = GapModel()
    for scope, key in list(m.histories):
        other.load(scope, key, m.to_json(scope, key))
    other.load_open(("ada", ""), m.open_to_json(("ada", "")), 500.0)
    v = view("ada", 0.0, idle_since=0.0)
    assert other.release_after(v, FLAT) == m.release_after(v, FLAT)
    assert other.open[("ada", "")].start == 10.0
    # junk is ignored, not fatal
    other.load(SERVER, "bob/", [["x", 1], [-5, 1], [60, 1]])
    assert [g.length for g in other.histories[(SERVER, "bob/")].gaps] == [60.0]


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"restart_cost": -1}, "restart_cost"),
        ({"gpu_hour_value": 0}, "gpu_hour_value"),
        ({"min_idle": float("nan")}, "min_idle"),
        ({"gaps_per_key": 0}, "gaps_per_key"),
        ({"max_keys": 1.5}, "max_keys"),
        ({"prior_weight": True}, "prior_weight"),
    ],
)
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        LearnedSettings(**kw)


NOW = 10_000.0


def test_decide_releases_after_the_learned_limit_and_says_why():
    v = view("ada", NOW, idle_since=NOW - 7 * MIN, last_activity=NOW - 60, started=0.0)
    limit = IdleTimeout(5 * MIN, "this server's pauses longer than 5 min lasted 41 min on average")
    (action,) = decide([v], Demand(), NOW, Rules(), {v.key: limit})
    assert isinstance(action, ReleaseGpu) and action.rule == RULE_GPU_IDLE_LEARNED
    assert action.reason == (
        "1 a100 GPU idle for 7 min; this server's pauses longer than 5 min lasted 41 min on average"
    )
    # without the limit, the flat timeout keeps it
    assert decide([v], Demand(), NOW, Rules(), {}) == []


def test_decide_flat_fallback_keeps_the_flat_rule():
    v = view("ada", NOW, idle_since=NOW - 31 * MIN, last_activity=NOW - 60, started=0.0)
    limit = IdleTimeout(FLAT, "limit 30 min; no pauses learned yet", learned=False)
    (action,) = decide([v], Demand(), NOW, Rules(), {v.key: limit})
    assert action.rule == RULE_GPU_IDLE
    assert action.reason == "1 a100 GPU idle for 31 min (limit 30 min; no pauses learned yet)"


def test_decide_never_releases_work_in_progress_under_a_learned_limit():
    v = view(
        "ada",
        NOW,
        idle_since=NOW - 20 * MIN,
        kernels_executing=True,
        last_activity=NOW - 60,
        started=0.0,
    )
    (action,) = decide([v], Demand(), NOW, Rules(), {v.key: IdleTimeout(3 * MIN, "x")})
    assert isinstance(action, Warn) and "a kernel is executing" in action.reason


def test_a_pause_counts_from_the_users_last_activity():
    m = GapModel()
    m.observe([view("ada", 100.0, idle_since=0.0, last_activity=0.0)], 100.0)
    # a CPU cell at 600 s while the GPU stays idle
    m.observe([view("ada", 700.0, idle_since=0.0, last_activity=600.0)], 700.0)
    m.observe([view("ada", 1000.0)], 1000.0)
    assert [g.length for g in m.histories[(SERVER, "ada/")].gaps] == [400.0]

    learned = model_with({"ada": [40 * MIN] * 20}, gpu_hour_value=300.0)
    learned.observe([view("ada", 100.0, idle_since=0.0, last_activity=0.0)], 100.0)
    learned.observe([view("ada", 700.0, idle_since=0.0, last_activity=600.0)], 700.0)
    (limit,) = learned.timeouts([view("ada", 700.0, idle_since=0.0)], FLAT).values()
    assert limit.seconds == 600.0 + 3 * MIN
    assert limit.why.endswith("(counted from the last activity, 10 min later)")

    flat_age = GapModel(LearnedSettings(from_activity=False))
    flat_age.observe([view("ada", 100.0, idle_since=0.0, last_activity=0.0)], 100.0)
    flat_age.observe([view("ada", 700.0, idle_since=0.0, last_activity=600.0)], 700.0)
    flat_age.observe([view("ada", 1000.0)], 1000.0)
    assert [g.length for g in flat_age.histories[(SERVER, "ada/")].gaps] == [1000.0]
