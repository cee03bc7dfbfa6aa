"""Idle detection: from samples to busy / idle since / unknown."""

from __future__ import annotations

import math

import pytest

from gpuhub.core.idle import Activity, IdleRule, Sample, activity, classify, segments

RULE = IdleRule()


def steps(*points: tuple[float, float | None, float | None], every: float = 5.0, until: float):
    """Readings every `every` seconds of a step function given as (from_t, util, mem_util)."""
    out = []
    t = points[0][0]
    while t <= until:
        current = [p for p in points if p[0] <= t][-1]
        out.append(Sample(t, current[1], current[2]))
        t += every
    return out


@pytest.mark.parametrize(
    ("util", "mem", "expected"),
    [
        (0.0, 0.0, "idle"),
        (5.0, 1.0, "idle"),  # at the thresholds: idle
        (5.1, 0.0, "busy"),
        (0.0, 1.5, "busy"),  # memory traffic alone is work
        (None, None, "unknown"),  # MIG: not supported
        (0.0, None, "unknown"),  # cannot confirm there is no memory traffic
        (None, 0.0, "unknown"),
        (90.0, None, "busy"),  # one known signal above threshold is enough
        (None, 30.0, "busy"),
        (math.nan, 0.0, "unknown"),
    ],
)
def test_classify(util, mem, expected):
    assert classify(Sample(0.0, util, mem), RULE) == expected


CASES = [
    # (name, samples, now, expected Activity)
    ("no samples", [], 100.0, Activity("unknown", None, None)),
    ("single idle reading now", [Sample(100, 0, 0)], 100.0, Activity("idle", 0.0, 100)),
    ("single busy reading now", [Sample(100, 80, 10)], 100.0, Activity("busy", 1.0, None)),
    (
        "idle all along",
        steps((0, 0, 0), until=600),
        600.0,
        Activity("idle", 0.0, 0),
    ),
    (
        "busy all along",
        steps((0, 99, 40), until=600),
        600.0,
        Activity("busy", 1.0, None),
    ),
    (
        "short spike does not reset idle period",
        steps((0, 0, 0), (1000, 100, 20), (1030, 0, 0), until=2000),
        2000.0,
        Activity("idle", 30 / 2000, 0),
    ),
    (
        "spike lasting min_busy_s resets idle period",
        steps((0, 0, 0), (1000, 100, 20), (1060, 0, 0), until=2000),
        2000.0,
        Activity("idle", 60 / 2000, 1060),
    ),
    (
        "several short spikes in a long idle period",
        steps(
            (0, 0, 0),
            (500, 100, 20),
            (520, 0, 0),
            (900, 60, 0),
            (950, 0, 0),
            (1500, 0, 30),
            (1505, 0, 0),
            until=2000,
        ),
        2000.0,
        Activity("idle", 75 / 2000, 0),
    ),
    (
        "spike still going on: busy now",
        steps((0, 0, 0), (1000, 100, 20), until=1020),
        1020.0,
        Activity("busy", 20 / 1020, None),
    ),
    (
        "unknown readings never idle",
        steps((0, None, None), until=4000),
        4000.0,
        Activity("unknown", None, None),
    ),
    (
        "unknown stretch ends the idle period",
        steps((0, 0, 0), (500, None, None), (510, 0, 0), until=1000),
        1000.0,
        Activity("idle", 0.0, 510),
    ),
    (
        "stale reading: sampler stopped",
        [Sample(0, 0, 0)],
        61.0,
        Activity("unknown", 0.0, None),
    ),
    (
        "reading within max_gap_s holds",
        [Sample(0, 0, 0)],
        60.0,
        Activity("idle", 0.0, 0),
    ),
    (
        "gap in readings becomes unknown and ends idleness",
        [Sample(0, 0, 0), Sample(200, 0, 0)],
        210.0,
        Activity("idle", 0.0, 200),
    ),
    (
        "readings after now are ignored",
        [Sample(0, 0, 0), Sample(50, 0, 0), Sample(70, 100, 100)],
        55.0,
        Activity("idle", 0.0, 0),
    ),
    (
        "order of readings does not matter",
        list(reversed(steps((0, 0, 0), (100, 90, 10), until=200))),
        200.0,
        Activity("busy", 100 / 200, None),
    ),
]


@pytest.mark.parametrize(("name", "samples", "now", "expected"), CASES, ids=[c[0] for c in CASES])
def test_activity(name, samples, now, expected):
    got = activity(samples, RULE, now)
    assert got.state == expected.state
    assert got.idle_since == expected.idle_since
    if expected.busy_fraction is None:
        assert got.busy_fraction is None
    else:
        assert got.busy_fraction == pytest.approx(expected.busy_fraction, abs=1e-9)


def test_busy_fraction_only_over_window():
    rule = IdleRule(window_s=1000)
    samples = steps((0, 100, 50), (5000, 0, 0), until=5500)
    a = activity(samples, rule, 5500.0)
    # busy until 5000, idle after: the last 1000 s are half busy
    assert a.busy_fraction == pytest.approx(0.5)
    # idle_since reaches back to the end of the long busy stretch, not the window
    assert a.state == "idle" and a.idle_since == 5000


def test_idle_since_beyond_window():
    rule = IdleRule(window_s=100)
    a = activity(steps((0, 0, 0), until=1000), rule, 1000.0)
    assert a.idle_since == 0 and a.idle_for(1000.0) == 1000


def test_idle_for_zero_unless_idle():
    assert Activity("busy", 1.0, None).idle_for(10) == 0
    assert Activity("unknown", None, None).idle_for(10) == 0
    assert Activity("idle", 0.0, 4.0).idle_for(10) == 6


def test_infinite_gap_for_exact_step_functions():
    rule = IdleRule(max_gap_s=math.inf, window_s=10_000)
    samples = [Sample(0, 100, 10), Sample(600, 0, 0), Sample(630, 80, 5), Sample(650, 0, 0)]
    a = activity(samples, rule, 4000.0)
    assert a.state == "idle" and a.idle_since == 600
    assert a.busy_fraction == pytest.approx(620 / 4000)


def test_thresholds_configurable():
    rule = IdleRule(util_threshold=20, mem_util_threshold=10, min_busy_s=300)
    samples = steps((0, 15, 5), (100, 50, 20), (250, 0, 0), until=400)
    assert activity(samples, rule, 400.0) == Activity("idle", pytest.approx(150 / 400), 0)


def test_segments_merge_equal_states():
    segs = segments(steps((0, 0, 0), (50, 90, 10), until=100), RULE, 100.0)
    assert [(s.start, s.end, s.state) for s in segs] == [(0, 50, "idle"), (50, 100, "busy")]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("util_threshold", -1),
        ("mem_util_threshold", "x"),
        ("min_busy_s", math.nan),
        ("window_s", 0),
        ("max_gap_s", True),
    ],
)
def test_rule_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        IdleRule(**{field: value})
