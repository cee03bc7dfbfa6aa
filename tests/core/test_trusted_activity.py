"""The service's trusted activity (`gpuhub.activity.tracker.TrustedActivity`) gives what
`idle.activity` gives for the same readings, kept as run-length stretches per server and device;
devices and servers are forgotten when asked, and the number of devices is bounded."""

from __future__ import annotations

import random

import pytest

from gpuhub.activity import GpuSample
from gpuhub.activity.tracker import TrustedActivity
from gpuhub.core import idle

RULE = idle.IdleRule(
    util_threshold=5, mem_util_threshold=1, min_busy_s=30, window_s=600, max_gap_s=40
)


def readings(seed: int, n: int = 200) -> list[GpuSample]:
    rng = random.Random(seed)
    t, out = 1000.0, []
    for _ in range(n):
        t += rng.choice([5, 5, 5, 10, 20, 60, 120])
        util = rng.choice([0.0, 0.0, 0.0, 2.0, 50.0, 90.0, None])
        mem = rng.choice([0.0, 0.0, 0.5, 30.0, None])
        out.append(GpuSample("GPU-1", util, None, t, memory_utilization=mem))
    return out


def as_idle(samples: list[GpuSample]) -> list[idle.Sample]:
    out = []
    for s in samples:
        mem = s.memory_utilization
        if mem is None and s.utilization is not None:
            mem = 0.0  # a source without memory readings: utilisation alone decides
        out.append(idle.Sample(s.at, s.utilization, mem))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_same_answers_as_idle_activity(seed):
    samples = readings(seed)
    tracker = TrustedActivity(RULE, history_s=10**6)
    for i, sample in enumerate(samples):
        tracker.add(("ada", ""), [sample])
        if i % 7 == 0:
            for later in (0.0, 3.0, 39.0, 41.0, 300.0):
                now = sample.at + later
                expected = idle.activity(as_idle(samples[: i + 1]), RULE, now)
                [got] = tracker.activity(("ada", ""), now)
                assert got.state == expected.state, (i, later)
                assert got.idle_since == pytest.approx(expected.idle_since), (i, later)
                if expected.busy_fraction is None:
                    assert got.busy_fraction is None
                else:
                    assert got.busy_fraction == pytest.approx(expected.busy_fraction), (i, later)


def test_no_readings_is_unknown_never_idle():
    tracker = TrustedActivity(RULE)
    assert tracker.activity(("ada", ""), 10.0) == ()
    tracker.add(("ada", ""), [GpuSample("GPU-1", 0.0, 0, 100.0, memory_utilization=0.0)])
    assert tracker.activity(("ada", ""), 120.0)[0].state == idle.IDLE
    # the reading goes stale: unknown, not idle
    assert tracker.activity(("ada", ""), 100.0 + RULE.max_gap_s + 1)[0].state == idle.UNKNOWN


def test_bounded_and_forgetting():
    tracker = TrustedActivity(RULE, max_devices=3)
    for i in range(10):
        tracker.add((f"u{i}", ""), [GpuSample(f"GPU-{i}", 0.0, 0, 100.0)])
    assert sum(len(v) for v in tracker.devices().values()) == 3
    tracker.forget_others([("u0", "")])
    assert list(tracker.devices()) == [("u0", "")]
    tracker.add(("u5", ""), [GpuSample("GPU-5", 0.0, 0, 100.0)])
    assert set(tracker.devices()) == {("u0", ""), ("u5", "")}
