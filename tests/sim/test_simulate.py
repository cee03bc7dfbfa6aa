"""The GPU pool simulator: known answers on small workloads, and the real trace."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import pytest

from gpuhub.core import decide as decisions
from gpuhub.core import idle
from gpuhub.core.decide import Rules
from gpuhub.sim import engine
from gpuhub.sim.cli import main as simulate_main
from gpuhub.sim.engine import POLICIES, PolicySpec, SimConfig, SimulationError, simulate
from gpuhub.sim.report import compare
from gpuhub.sim.synthetic import SyntheticParams, generate
from gpuhub.sim.workload import (
    WorkloadError,
    default_trace_path,
    load_trace,
    workload_from_dict,
)

H = 3600.0


def session(sid, start, stop, gpus, *bursts):
    """A session in the trace format; bursts are (start_tick, ticks, gpus[, util])."""
    return {
        "id": sid,
        "start_tick": start,
        "stop_tick": stop,
        "max_resource_request": {"gpus": gpus},
        "trainings": [
            {
                "start_tick": b[0],
                "duration_in_ticks": b[1],
                "gpus": b[2],
                "gpu_utilizations": [{"utilization": b[3] if len(b) > 3 else 80.0}] * b[2],
            }
            for b in bursts
        ],
    }


def run(sessions, name, gpus=1, **kw):
    workload = workload_from_dict({"sessions": sessions}, "test")
    return simulate(workload, PolicySpec(name), SimConfig(gpus=gpus, **kw)).metrics()


ONE = [session("a", 0, 100, 1, (10, 5, 1))]


def test_one_session_none_reserves_the_whole_session():
    m = run(ONE, "none")
    assert m["reserved_gpu_hours"] == pytest.approx(100 / 60, abs=1e-3)
    assert m["busy_gpu_hours"] == pytest.approx(5 / 60, abs=1e-3)
    assert m["wait_s"] == {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    assert m["releases_per_session"] == 0 and m["restarts_per_session"] == 0


def test_one_session_oracle_reserves_only_the_burst():
    m = run(ONE, "oracle")
    assert m["reserved_gpu_hours"] == m["busy_gpu_hours"] == pytest.approx(5 / 60, abs=1e-3)
    assert m["busy_fraction"] == 1.0
    assert m["releases_per_session"] == 1


def test_one_session_activity_timeout_culls_and_loses_state():
    # burst ends at 900 s; the culler checks every 600 s and stops at 4800 s (>= 3600 idle)
    m = run(ONE, "activity-timeout")
    assert m["reserved_gpu_hours"] == pytest.approx(4800 / H, abs=1e-3)
    assert m["sessions_state_lost"] == 1
    assert m["stops_per_session"] == 1 and m["restarts_per_session"] == 0


def test_one_session_gpuhub_releases_after_idle_timeout_then_stops():
    # GPU idle from 900 s: released at 2700 s; no activity since 900 s: stopped at 4500 s
    workload = workload_from_dict({"sessions": ONE}, "test")
    result = simulate(workload, PolicySpec("gpuhub"), SimConfig(gpus=1))
    m = result.metrics()
    assert m["reserved_gpu_hours"] == pytest.approx(2700 / H, abs=1e-3)
    assert m["actions"] == {"ReleaseGpu:gpu-idle": 1, "StopServer:server-idle": 1}
    assert m["sessions_state_lost"] == 0
    assert m["releases_per_session"] == 1 and m["stops_per_session"] == 1


def test_gpuhub_timeouts_are_the_real_rules():
    workload = workload_from_dict({"sessions": ONE}, "test")
    spec = PolicySpec("gpuhub", rules=Rules(gpu_idle_timeout=600, server_idle_timeout=0))
    m = simulate(workload, spec, SimConfig(gpus=1)).metrics()
    assert m["reserved_gpu_hours"] == pytest.approx(1500 / H, abs=1e-3)  # 900 + 600
    assert m["actions"] == {"ReleaseGpu:gpu-idle": 1}


TWO_BURSTS = [session("a", 0, 70, 1, (1, 1, 1), (60, 1, 1))]


@pytest.mark.parametrize(("delay", "wait"), [(30.0, 30.0), (0.0, 0.0), (120.0, 120.0)])
def test_released_gpu_comes_back_after_restart_delay(delay, wait):
    m = run(TWO_BURSTS, "gpuhub", restart_delay=delay)
    assert m["wait_s"]["max"] == wait
    assert m["restarts_per_session"] == 1 and m["releases_per_session"] == 1
    assert m["sessions_state_lost"] == 0


QUEUE = [
    session("a", 0, 60, 1, (1, 10, 1)),
    session("b", 5, 60, 1, (6, 10, 1)),
]


def test_queue_none_waits_for_the_whole_session():
    m = run(QUEUE, "none")
    # b spawns at 300 s, gets a's GPU when a ends at 3600 s
    assert m["wait_s"]["max"] == 3300.0 and m["wait_s"]["mean"] == 1650.0
    assert m["reserved_gpu_hours"] == pytest.approx(6900 / H, abs=1e-3)
    assert m["session_delay_hours"] == pytest.approx(3300 / H, abs=1e-3)


def test_queue_oracle_waits_only_for_the_burst():
    m = run(QUEUE, "oracle")
    assert m["wait_s"]["max"] == 300.0  # b's burst due at 360 s, a's ends at 660 s


def test_demand_reclaims_an_idle_gpu_for_a_waiting_session():
    sessions = [
        session("a", 0, 120, 1, (100, 1, 1)),
        session("b", 10, 30, 1, (11, 5, 1)),
    ]
    none = run(sessions, "none")
    hub = run(sessions, "gpuhub")
    workload = workload_from_dict({"sessions": sessions}, "test")
    actions = simulate(workload, PolicySpec("gpuhub"), SimConfig(gpus=1)).metrics()["actions"]
    assert actions.get("ReleaseGpu:gpu-demand") == 1
    # b got a's idle GPU at once; a got it back for its burst after a restart
    assert hub["wait_s"]["max"] == 30.0
    assert none["wait_s"]["max"] == 120 * 60 - 600


def test_cpu_only_sessions_reserve_nothing():
    sessions = [session("c", 0, 50, 0, (1, 10, 0))]
    for name in POLICIES:
        m = run(sessions, name)
        assert m["reserved_gpu_hours"] == 0 and m["busy_fraction"] is None


def test_time_scale_stretches_every_time():
    data = {"sessions": ONE}
    half = workload_from_dict(data, "t", time_scale=0.5)
    full = workload_from_dict(data, "t")
    assert half.sessions[0].length == full.sessions[0].length / 2
    assert half.sessions[0].bursts[0].duration == 150.0


def test_pool_smaller_than_a_session_is_refused():
    with pytest.raises(SimulationError, match="gpus: session a reserves 8 GPUs"):
        run([session("a", 0, 10, 8, (1, 1, 8))], "none", gpus=4)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "sessions"),
        (
            {"sessions": [{"id": "a", "start_tick": "x", "stop_tick": 3}]},
            r"sessions\[0\].start_tick",
        ),
        ({"sessions": [{"id": "a", "start_tick": 5, "stop_tick": 3}]}, r"sessions\[0\].stop_tick"),
        (
            {"sessions": [session("a", 0, 10, 1, (1, 1, 2))]},
            r"sessions\[0\].trainings\[0\].gpus",
        ),
        (
            {"sessions": [session("a", 0, 10, 1, (1, -1, 1))]},
            r"sessions\[0\].trainings\[0\].duration_in_ticks",
        ),
        ({"sessions": [session("a", 0, 10, 1), session("a", 0, 10, 1)]}, r"sessions\[1\].id"),
    ],
)
def test_bad_workload_names_the_field(data, field):
    with pytest.raises(WorkloadError, match=field):
        workload_from_dict(data)


def test_simulation_drives_the_real_policy_and_idle_code(monkeypatch):
    calls = {"decide": 0, "activity": 0}
    real_decide, real_activity = decisions.decide, idle.activity

    def decide(*a, **kw):
        calls["decide"] += 1
        return real_decide(*a, **kw)

    def activity(*a, **kw):
        calls["activity"] += 1
        return real_activity(*a, **kw)

    monkeypatch.setattr(decisions, "decide", decide)
    monkeypatch.setattr(idle, "activity", activity)
    run(ONE, "gpuhub")
    assert calls["decide"] > 10 and calls["activity"] > 10
    # and a change in the policy changes the simulation
    monkeypatch.setattr(decisions, "decide", lambda *a, **kw: [])
    assert run(ONE, "gpuhub")["reserved_gpu_hours"] == pytest.approx(100 / 60, abs=1e-3)
    assert engine.decide is decisions


# --- synthetic workloads ---------------------------------------------------------------------


def test_synthetic_is_deterministic_with_a_seed():
    assert generate(SyntheticParams(hours=12), 7) == generate(SyntheticParams(hours=12), 7)
    assert generate(SyntheticParams(hours=12), 7) != generate(SyntheticParams(hours=12), 8)


def test_synthetic_load_scales_arrivals():
    one = generate(SyntheticParams(hours=48), 1)["sessions"]
    four = generate(SyntheticParams(hours=48, load=4), 1)["sessions"]
    assert 2.5 < len(four) / len(one) < 6


def test_synthetic_has_the_trace_shape():
    data = generate(SyntheticParams(hours=96), 3)
    w = workload_from_dict(data, "synthetic")
    stats = w.stats()
    busy = stats["burst_gpu_hours"] / stats["session_gpu_hours"]
    assert 0.08 < busy < 0.5  # the trace: 0.257
    assert all(s.length <= 48 * H for s in w.sessions)
    assert {s.gpus for s in w.sessions} <= {0, 1, 4, 8}


@pytest.mark.parametrize(
    ("kw", "field"),
    [({"load": 0}, "load"), ({"burst_mean_min": 1}, "burst_mean_min"), ({"hours": -1}, "hours")],
)
def test_synthetic_parameters_validated(kw, field):
    with pytest.raises(ValueError, match=field):
        SyntheticParams(**kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_invariants_across_policies(seed):
    w = workload_from_dict(generate(SyntheticParams(hours=24, load=2), seed), "s")
    results = {n: r.metrics() for n, r in compare(w, SimConfig(gpus=32)).items()}
    busy = {m["busy_gpu_hours"] for m in results.values()}
    assert max(busy) - min(busy) < 1e-6  # every burst runs once, whatever the policy
    o = results["oracle"]
    assert o["reserved_gpu_hours"] == pytest.approx(o["busy_gpu_hours"], abs=1e-6)
    assert results["gpuhub"]["reserved_gpu_hours"] < results["none"]["reserved_gpu_hours"]
    assert results["gpuhub"]["sessions_state_lost"] == 0
    assert results["none"]["releases_per_session"] == 0


# --- the real trace ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trace():
    """The real notebook trace, which sits in ../shared/traces beside the checkout (CI has it too):
    a missing trace is a failure, not a reason to skip."""
    path = default_trace_path()
    assert path is not None, "../shared/traces/adobe-sensei-2021-06-01-02.json is missing"
    return path


def test_real_trace_loads_as_its_readme_says(trace):
    w = load_trace(trace)
    stats = w.stats()
    assert stats["sessions"] == 59
    assert stats["burst_gpu_hours"] / stats["session_gpu_hours"] == pytest.approx(0.257, abs=0.001)


def test_real_trace_all_policies(trace, tmp_path, capsys):
    # A pool large enough that `none` never waits: it reserves exactly the sessions.
    assert simulate_main([str(trace), "--gpus", "160", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trace"] == trace.name and report["gpus"] == 160
    p = report["policies"]
    assert list(p) == ["none", "activity-timeout", "gpuhub", "oracle"]
    for m in p.values():
        for key in (
            "reserved_gpu_hours",
            "busy_gpu_hours",
            "idle_reserved_gpu_hours",
            "busy_fraction",
            "releases_per_session",
            "restarts_per_session",
            "sessions_state_lost",
        ):
            assert key in m
        assert set(m["wait_s"]) == {"mean", "p50", "p95", "max"}
        assert math.isclose(
            m["idle_reserved_gpu_hours"],
            m["reserved_gpu_hours"] - m["busy_gpu_hours"],
            abs_tol=0.01,
        )
    assert p["none"]["busy_fraction"] == pytest.approx(0.257, abs=0.001)
    assert p["none"]["wait_s"]["max"] == 0
    assert p["oracle"]["reserved_gpu_hours"] == pytest.approx(p["oracle"]["busy_gpu_hours"])
    assert (
        p["oracle"]["reserved_gpu_hours"]
        < p["gpuhub"]["reserved_gpu_hours"]
        < p["activity-timeout"]["reserved_gpu_hours"]
        < p["none"]["reserved_gpu_hours"]
    )
    assert p["gpuhub"]["sessions_state_lost"] == 0 < p["activity-timeout"]["sessions_state_lost"]


# --- the command line ----------------------------------------------------------------------------


def test_cli_table_and_synthetic_trace_file(tmp_path, capsys):
    out = tmp_path / "w.json"
    argv = ["--synthetic", "--hours", "6", "--seed", "3", "--write-trace", str(out)]
    assert simulate_main([*argv, "--gpus", "32"]) == 0
    text = capsys.readouterr().out
    assert "busy / reserved" in text and "oracle" in text
    # the written workload replays to the same figures
    assert simulate_main([str(out), "--gpus", "32", "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert simulate_main([*argv, "--gpus", "32", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert from_file["policies"] == generated["policies"]


def test_cli_policies_subset_and_settings(capsys):
    argv = ["--synthetic", "--hours", "6", "--policies", "gpuhub,none", "--json"]
    assert simulate_main([*argv, "--gpu-idle-timeout", "600"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["policies"]) == ["gpuhub", "none"]
    assert report["settings"]["gpu_idle_timeout_s"] == 600


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "0"], "--gpus"),
        (["--restart-delay", "-1"], "--restart-delay"),
        (["--time-scale", "0"], "--time-scale"),
        (["--policies", "greedy"], "--policies"),
        (["/nonexistent/trace.json"], "cannot read"),
        (["--synthetic", "--gpus", "2"], "gpus: session"),
    ],
)
def test_cli_errors_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) if message.startswith("--") else nullcontext():
        rc = simulate_main(argv)
        assert rc == 2
    assert message in capsys.readouterr().err


def test_gpuhub_cli_lists_simulate():
    from gpuhub.cli import COMMANDS

    assert COMMANDS["simulate"][0] == "gpuhub.sim.cli:main"


# --- release policies: flat, learned, perfect prediction ------------------------------------


def gpuhub_run(sessions, gpus=1, **spec):
    workload = workload_from_dict({"sessions": sessions}, "test")
    return simulate(workload, PolicySpec("gpuhub", **spec), SimConfig(gpus=gpus)).metrics()


# bursts at 10-15 min and 20-25 min (a 5-minute pause), then 115-120 (a 90-minute pause)
PAUSES = [session("a", 0, 200, 1, (10, 5, 1), (20, 5, 1), (115, 5, 1))]


def test_perfect_prediction_releases_long_pauses_at_their_start_only():
    m = gpuhub_run(PAUSES, release_policy="perfect", perfect_threshold=300)
    # released at the spawn (10 minutes before the first burst), held through the 5-minute
    # pause, released at its 90-minute pause and at the session's 80-minute tail; held: two
    # 30 s restarts and the three 5-minute bursts and the 5-minute pause
    assert m["actions"]["ReleaseGpu:perfect"] == 3
    assert m["restarts_per_session"] == 2
    assert m["reserved_gpu_hours"] == pytest.approx((2 * 30 + 4 * 300) / H, abs=1e-3)
    # a longer threshold holds through the first 10 minutes too
    m = gpuhub_run(PAUSES, release_policy="perfect", perfect_threshold=600)
    assert m["actions"]["ReleaseGpu:perfect"] == 2 and m["restarts_per_session"] == 1


def test_learned_without_history_is_the_flat_timeout():
    flat = gpuhub_run(PAUSES)
    learned = gpuhub_run(PAUSES, release_policy="learned")
    assert learned == flat


def test_learned_is_off_the_flat_frontier_on_small_synthetic_workloads():
    from gpuhub.sim.frontier import frontier

    for seed, load in ((0, 1.0), (1, 2.0)):
        data = generate(SyntheticParams(hours=12, load=load), seed)
        w = workload_from_dict(data, "synthetic")
        f = frontier(w, SimConfig(gpus=64), perfect_thresholds=(600.0, 2400.0))
        (learned,) = f.learned
        c = f.compare(learned)
        assert c["flat_at_same_restarts"] is not None, (seed, load, f.as_dict())
        assert c["gain_over_flat"] > 0.0, (seed, load, f.as_dict())
        assert learned.state_lost == 0


def test_cli_release_policy_and_frontier(tmp_path, capsys):
    png = tmp_path / "frontier.png"
    argv = ["--synthetic", "--hours", "6", "--policies", "gpuhub", "--release-policy", "learned"]
    assert simulate_main([*argv, "--frontier", "--plot", str(png), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["policies"]) == ["gpuhub (learned)"]
    assert report["settings"]["release_policy"] == "learned"
    front = report["frontier"]
    assert [p["setting"] for p in front["flat"]] == [
        "5 min",
        "10 min",
        "15 min",
        "30 min",
        "60 min",
    ]
    assert {"gain_over_flat", "perfect_at_same_restarts"} <= set(front["learned"][0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        simulate_main(["--synthetic", "--hours", "6", "--plot", str(png)])
    assert "--plot: only with --frontier" in capsys.readouterr().err
