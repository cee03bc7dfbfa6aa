"""What the pages show, from plain data: formatting, server and GPU rows, the queue, sparklines."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from gpuhub.core.catalog import catalog_from_dict
from gpuhub.core.decide import ServerView
from gpuhub.core.queue import QueueEntry
from gpuhub.core.quotas import Limit
from gpuhub.service.web import views
from gpuhub.service.web.activity import ActivityLog
from gpuhub.service.web.sparkline import sparkline_svg

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
CATALOG = catalog_from_dict(
    {
        "environments": [{"id": "pytorch", "display_name": "PyTorch"}],
        "gpu_types": [{"id": "gpu", "display_name": "NVIDIA GPU"}],
    }
)


def status_gpu(uuid: str, state: str = "idle", **extra):
    return {
        "uuid": uuid,
        "index": 0,
        "name": "NVIDIA A100 (simulated)",
        "simulated": True,
        "state": state,
        "idle_for_s": 754.0 if state == "idle" else None,
        "utilization": {"gpu": 3.0, "memory": 0.0, "busy_fraction": 0.25, "window_s": 3600},
        "memory": {"used": 1024**3, "total": 80 * 1024**3},
        **extra,
    }


def test_formatting():
    assert [views.fmt_duration(s) for s in (None, 5, 60, 754, 3600, 3 * 3600 + 300, 2 * 86400)] == [
        "",
        "5 s",
        "1 min",
        "12 min",
        "1 h",
        "3 h 5 min",
        "2 d",
    ]
    assert views.fmt_bytes(80 * 1024**3) == "80 GiB"
    assert views.fmt_bytes(1536) == "1.5 KiB"
    assert views.fmt_bytes(None) == ""
    assert views.iso(NOW) == "2026-11-29T12:00:00Z"
    assert views.parse_time("2026-11-29T12:00:00.000Z") == NOW
    assert views.parse_time("garbage") is None


def test_a_server_with_its_gpu_and_activity():
    model = {
        "ready": True,
        "pending": None,
        "url": "/user/ada/",
        "started": "2026-11-29T11:00:00Z",
        "user_options": {
            "interface": "jupyterlab",
            "environment": "pytorch",
            "gpus": 1,
            "gpu_type": "gpu",
        },
    }
    entry = views.server_entry(
        "ada", "", model, {"gpus": [status_gpu("GPU-0")]}, None, 1, CATALOG, NOW
    )
    assert entry["label"] == "default" and entry["state"] == "ready"
    assert entry["running_for"] == "1 h"
    assert entry["environment_name"] == "PyTorch" and entry["interface_name"] == "JupyterLab"
    [gpu] = entry["gpus"]
    assert gpu["memory"] == "80 GiB" and gpu["idle_for"] == "12 min" and gpu["simulated"]
    assert entry["busy_fraction"] == 0.25
    assert not entry["can_request_gpu"]  # it holds one

    stopped = views.server_entry("ada", "exp", None, None, None, 0, CATALOG, NOW)
    assert stopped["state"] == "stopped" and stopped["can_request_gpu"]
    odd = views.server_entry("ada", "x", {"ready": True}, {"gpus": ["junk", {}]}, "", 0, None, NOW)
    assert odd["gpus"][0]["state"] == "unknown"  # a malformed entry is never "idle"


def test_admin_gpu_rows_join_pool_leases_and_statuses():
    devices = [
        SimpleNamespace(
            uuid=f"GPU-{i}", index=i, name="A100", memory_total=80 * 1024**3, simulated=True
        )
        for i in range(3)
    ]
    leases = [
        SimpleNamespace(user="ada", server="", gpu_type="gpu", device="GPU-0", leased_at=NOW),
        SimpleNamespace(user="bob", server="exp", gpu_type="gpu", device="GPU-1", leased_at=NOW),
        # a cluster-assigned GPU: no device in the lease
        SimpleNamespace(user="eve", server="", gpu_type="gpu", device=None, leased_at=NOW),
    ]
    statuses = {("ada", ""): {"gpus": [status_gpu("GPU-0", "busy")]}}
    rows = views.gpu_rows(devices, leases, statuses, host="node-1", series=lambda u: [1.0, None])
    by_uuid = {r["uuid"]: r for r in rows}
    assert by_uuid["GPU-0"]["holder_label"] == "ada" and by_uuid["GPU-0"]["state"] == "busy"
    assert by_uuid["GPU-0"]["series"] == [1.0, None]
    assert by_uuid["GPU-1"]["holder_label"] == "bob/exp"
    assert by_uuid["GPU-1"]["state"] == "unknown"  # its status was not read: never "idle"
    assert by_uuid["GPU-2"]["holder"] is None and by_uuid["GPU-2"]["state"] == "free"
    [cluster] = [r for r in rows if r["uuid"] is None]
    assert cluster["holder_label"] == "eve" and cluster["host"] == "node-1"
    assert len(rows) == 4


def test_queue_places_and_estimated_wait():
    def entry(user, minutes_ago, gpus=1):
        t = NOW - timedelta(minutes=minutes_ago)
        return QueueEntry(user, "", "gpu", gpus, t, NOW, 0, minutes_ago)

    entries = [entry("ada", 10), entry("bob", 5)]
    held = {"gpu": [NOW - timedelta(minutes=50)]}
    rows = views.queue_view(
        entries, {"gpu": 0}, held, NOW, timedelta(seconds=60), timedelta(hours=1), {"gpu": "A100"}
    )
    assert [(r["user"], r["place"], r["waiting"]) for r in rows] == [("ada", 1, 2), ("bob", 2, 2)]
    assert rows[0]["estimated_wait"] == "about 10 minutes"
    assert "1st in line of 2" in rows[0]["message"] and "A100" in rows[0]["message"]
    mine = views.queue_view(
        entries, {"gpu": 0}, held, NOW, timedelta(seconds=60), timedelta(hours=1), user="bob"
    )
    assert [r["place"] for r in mine] == [2]
    # a request whose server runs on CPU meanwhile says so, and how to give up the place
    from dataclasses import replace

    on_cpu = [replace(entries[0], on_cpu=True), entries[1]]
    [ada] = views.queue_view(
        on_cpu, {"gpu": 0}, held, NOW, timedelta(seconds=60), timedelta(hours=1), user="ada"
    )
    assert ada["on_cpu"] and "Running without a GPU" in ada["message"]
    assert "1st in line of 2" in ada["message"] and "leave the queue" in ada["message"]


def test_quota_usage_says_where_a_limit_comes_from():
    from gpuhub.core.quotas import EffectiveQuota

    usage = views.quota_usage(
        EffectiveQuota(Limit(2, "group researchers"), Limit(None, "default")), 2, 1
    )
    assert usage["gpus"] == {"used": 2, "limit": 2, "source": "group researchers", "full": True}
    assert usage["servers"]["limit"] is None and not usage["servers"]["full"]


def test_sparkline_is_numbers_only_with_gaps():
    svg = sparkline_svg([0, 50, None, 100, None], width=40, height=10)
    assert svg.startswith("<svg") and svg.count("<polyline") == 1 and svg.count("<circle") == 1
    assert 'aria-label="GPU utilisation: mean 50 %, latest 100 %"' in svg
    assert re.fullmatch(r"[\w\s<>=\"/.:,%\-#&;()]+", svg)
    assert "no readings" in sparkline_svg([None, None])
    clamped = sparkline_svg([250, -4], width=10, height=10)
    assert 'points="0,1 10,9"' in clamped


def test_activity_log_keeps_an_hour_in_slots():
    log = ActivityLog(window=3600, resolution=60)
    t0 = 1_000_000.0
    log.record({"gpus": [{"uuid": "G", "utilization": {"gpu": 10}}]}, t0)
    log.record({"gpus": [{"uuid": "G", "utilization": {"gpu": 90}}]}, t0 + 30)  # same minute
    log.record({"gpus": [{"uuid": "G", "utilization": {"gpu": None}}, "junk"]}, t0 + 1800)
    log.record({"gpus": [{"uuid": "G", "utilization": {"gpu": 40}}]}, t0 + 3500)
    series = log.series("G", now=t0 + 3540, buckets=6)
    assert series == [90.0, None, None, None, None, 40.0]
    log.record({"gpus": [{"uuid": "G", "utilization": {"gpu": 5}}]}, t0 + 7300)
    assert log.series("G", now=t0 + 7300, buckets=2) == [None, 5.0]
    assert log.series("unknown", now=t0) == [None] * 30


def test_activity_log_keeps_the_latest_status_per_server():
    log = ActivityLog()
    status = {"gpus": [{"uuid": "G", "utilization": {"gpu": 70}}]}
    log.remember("ada", "", status, t=100.0)
    assert log.latest("ada", "", max_age=60, now=150.0) is status
    assert log.latest("ada", "", max_age=60, now=170.0) is None  # too old: read it again
    assert log.latest("bob", "", max_age=60, now=150.0) is None
    assert log.series("G", now=130.0, buckets=1) == [70.0]  # and its utilisation is recorded
    log.forget_others({("bob", "")})
    assert log.latest("ada", "", max_age=1e9, now=150.0) is None


def test_capacity_rows_say_how_old_the_counts_are():
    from gpuhub.store import MeasuredCapacity

    counts = [
        MeasuredCapacity(
            "t4",
            0,
            0,
            unavailable=4,
            note="the 1 node with T4 GPUs is cordoned",
            source="kubernetes",
            measured_at=NOW - timedelta(seconds=12),
            valid_for=35,
        ),
        MeasuredCapacity("gpu", 4, 1, measured_at=NOW - timedelta(minutes=5), valid_for=35),
    ]
    rows = views.capacity_rows(counts, {"gpu": "NVIDIA GPU"}, NOW)
    assert [r["gpu_type"] for r in rows] == ["gpu", "t4"]
    gpu, t4 = rows
    assert (gpu["gpu_type_name"], gpu["total"], gpu["free"], gpu["fresh"]) == (
        "NVIDIA GPU",
        4,
        1,
        False,
    )
    assert gpu["age"] == "5 min"
    assert t4["fresh"] and t4["age_s"] == 12.0 and t4["unavailable"] == 4
    assert t4["note"] == "the 1 node with T4 GPUs is cordoned"


def test_release_limits_show_each_servers_learned_limit_and_why(tmp_path):
    from gpuhub.core.idle import Activity
    from gpuhub.service.learning import LearnedRelease
    from gpuhub.store import Store

    learning = LearnedRelease(Store.at(f"sqlite:///{tmp_path}/gpuhub.sqlite"))
    # the site has learned that pauses past a few minutes last an hour; ada's 8 GPUs sit idle
    learning.model.load("site", "", [[3600.0, 1]] * 40 + [[60.0, 1]] * 40)
    learning.loaded = True
    now = 10_000.0
    idle = Activity("idle", 0.0, now - 120)
    views_now = [
        ServerView(user="ada", server="big", gpus=8, gpu_activity=(idle,) * 8),
        ServerView(user="bob", gpus=1, gpu_activity=(idle,)),
    ]
    learning.update(views_now, now, 1800.0)
    learning.model.histories.clear()  # bob's limit from a model that knows nothing
    learning.model._cache.clear()
    learning.current[("bob", "")] = learning.model.release_after(views_now[1], 1800.0)
    ada_limit = learning.current[("ada", "big")]
    assert ada_limit.learned and ada_limit.seconds < 1800.0

    limits = views.release_limit_rows(learning.thresholds(), "learned", 1800.0)
    assert limits["policy"] == "learned" and limits["flat"] == "30 min"
    ada, bob = limits["servers"]
    assert (ada["user"], ada["server"], ada["learned"]) == ("ada", "big", True)
    assert ada["limit"] == views.fmt_duration(ada_limit.seconds) and ada["why"] == ada_limit.why
    assert "this site's pauses longer than" in ada["why"]
    # nothing learned yet: the flat timeout, and the page says so
    assert (bob["limit"], bob["learned"]) == ("30 min", False)
    assert bob["why"] == "limit 30 min; no pauses learned yet"

    page = _render_admin(limits)
    row = re.search(r'<tr data-server="ada/big">(.*?)</tr>', page, re.S).group(1)
    assert ada["limit"] in row and "this site&#39;s pauses longer than" in row
    assert ">flat<" not in row
    row = re.search(r'<tr data-server="bob/">(.*?)</tr>', page, re.S).group(1)
    assert "30 min" in row and ">flat<" in row and "no pauses learned yet" in row
    assert "Release policy: <strong>learned</strong>" in page


def test_release_limits_with_the_flat_policy_and_a_hostile_reason():
    flat = views.release_limit_rows([], "flat", 1800.0)
    assert flat == {"policy": "flat", "flat": "30 min", "servers": []}
    page = _render_admin(flat)
    assert "Release policy: <strong>flat</strong>. Idle GPUs go back after 30 min" in page
    assert 'id="gpuhub-limits"' not in page

    hostile = "<img src=x onerror=alert(1)>"
    rows = views.release_limit_rows(
        [{"user": "eve", "server": "", "limit_s": 180.0, "learned": True, "why": hostile}],
        "learned",
        1800.0,
    )
    page = _render_admin(rows)
    assert hostile not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def _render_admin(limits: dict) -> str:
    from gpuhub.service.web.base import template_env

    overview = {
        "gpus": [],
        "capacity": [],
        "servers": [],
        "queue": [],
        "keeps": [],
        "actions": [],
        "limits": limits,
    }
    return (
        template_env()
        .get_template("admin.html")
        .render(
            prefix="/services/gpuhub/",
            hub_prefix="/hub/",
            hub_static="/hub/static/",
            user={"name": "admin-grace"},
            is_admin=True,
            xsrf_token="x",
            flash=None,
            path="/services/gpuhub/admin",
            page="admin",
            overview=overview,
        )
    )
