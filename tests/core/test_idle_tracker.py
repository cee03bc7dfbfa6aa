"""The incremental activity tracker gives the answers of `activity()` over the readings it
keeps, reading by reading, with readings pruned, gaps, unknowns and a clock stepping back."""

from __future__ import annotations

import random

import pytest

from gpuhub.core.idle import ActivityTracker, IdleRule, Sample, activity


def _reading(rng: random.Random, t: float) -> Sample:
    kind = rng.random()
    if kind < 0.4:
        return Sample(t, 0.0, 0.0)  # idle
    if kind < 0.8:
        return Sample(t, rng.choice([3.0, 30.0, 90.0]), rng.choice([0.0, 0.5, 20.0]))
    if kind < 0.9:
        return Sample(t, None, None)  # unknown (MIG)
    return Sample(t, float("nan"), 0.0)


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) < 1e-9


@pytest.mark.parametrize("seed", range(40))
def test_tracker_matches_activity_over_kept_readings(seed):
    rng = random.Random(seed)
    rule = IdleRule(
        min_busy_s=rng.choice([0.0, 30.0, 60.0]),
        window_s=rng.choice([120.0, 600.0, 3600.0]),
        max_gap_s=rng.choice([10.0, 60.0]),
    )
    keep = rng.choice([300.0, 1800.0, 1e9])
    tracker = ActivityTracker(rule, keep)
    t = 1_800_000_000.0
    # long runs of one state, with gaps and, rarely, a reading from the past
    state_reading = _reading(rng, t)
    for step in range(400):
        if rng.random() < 0.08:
            state_reading = _reading(rng, t)
        t += rng.choice([5.0, 5.0, 5.0, 0.0, 20.0, 120.0])
        when = t - 7.0 if rng.random() < 0.01 else t
        tracker.add(Sample(when, state_reading.util, state_reading.mem_util), now=t)
        if step % 7 == 0:
            for now in (t, t + 3.0, t + rng.choice([30.0, 90.0, 4000.0])):
                got = tracker.activity(now)
                want = activity(list(tracker.samples), rule, now)
                assert got.state == want.state, (step, now)
                assert _close(got.busy_fraction, want.busy_fraction), (step, now, got, want)
                assert _close(got.idle_since, want.idle_since), (step, now, got, want)


def test_tracker_cost_does_not_grow_with_history():
    """A GPU idle for hours with short spikes: the tracker keeps a few stretches, not every
    reading (what makes a status document cost the same after four hours as after one)."""
    rule = IdleRule()
    tracker = ActivityTracker(rule, 4 * 3600)
    t = 1_800_000_000.0
    for i in range(2880):
        busy = i % 360 == 0  # a 5 s spike every 30 minutes
        tracker.add(Sample(t + 5 * i, 50.0 if busy else 0.0, 0.0))
    assert len(tracker.samples) == 2880
    assert len(tracker._closed) <= 2 * 8 + 1
    got = tracker.activity(t + 5 * 2880)
    assert got == activity(list(tracker.samples), rule, t + 5 * 2880)
    assert got.state == "idle" and got.idle_since == t + 5  # after the first spike
