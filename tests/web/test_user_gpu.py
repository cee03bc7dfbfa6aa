"""A server's GPU notices on the user's page (pure): what JupyterLab's extension offers, for
every interface."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from gpuhub.service.web.user_gpu import gpu_notices

NOW = datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc)


def iso(delta: timedelta) -> str:
    return (NOW + delta).isoformat().replace("+00:00", "Z")


def test_nothing_to_say():
    assert gpu_notices({}, NOW) == {"release": None, "queue": None, "turn": None}


def test_release_warning_with_the_keeps_the_policy_allows():
    notices = {
        "release_at": iso(timedelta(minutes=8)),
        "release_reason": "1 GPU idle for 22 min (limit 30 min)",
        "warn_before_s": 600,
        "keep": {"allowed": True, "max_s": 3600, "refused": None},
    }
    release = gpu_notices(notices, NOW)["release"]
    assert release["soon"] and release["keep_hours"] == [1]
    assert "10:08 UTC" in release["text"] and "idle for 22 min" in release["text"]
    refused = {**notices, "keep": {"allowed": False, "max_s": 0, "refused": "someone waits"}}
    release = gpu_notices(refused, NOW)["release"]
    assert release["keep_hours"] == [] and release["keep_refused"] == "someone waits"
    later = {**notices, "release_at": iso(timedelta(hours=2))}
    assert not gpu_notices(later, NOW)["release"]["soon"]


def test_place_in_line_and_turn_in_words():
    notices = {
        "queue": {
            "place": 2,
            "waiting": 3,
            "estimate_s": 1200,
            "gpus": 1,
            "gpu_type": "a100",
            "not_before": iso(timedelta(minutes=30)),
        },
        "gpu_turn": {"switch_at": iso(timedelta(minutes=2)), "gpus": 1, "gpu_type": "a100"},
    }
    shown = gpu_notices(notices, NOW, {"a100": "NVIDIA A100"})
    assert shown["queue"]["text"].startswith(
        "Running without a GPU: 2nd in line of 3 for 1 NVIDIA A100 GPU, estimated wait about"
    )
    assert "from 10:30 UTC" in shown["queue"]["text"]
    assert "10:02 UTC (in 2 min)" in shown["turn"]["text"]
