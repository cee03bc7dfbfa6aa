"""GPU-hours against the real hub and service: a user over their group's weekly budget gets the
403 with its message from the REST API, the spawn page says so before they try, their page shows
the week's GPU-hours; admins rank the holders by idle GPU-hours and export them as CSV (names a
spreadsheet would run as formulas neutralised); a normal user gets neither."""

from __future__ import annotations

import csv
import io
import time
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from pages_helpers import BUDGET_GROUP

from gpuhub.core.accounting import week_start
from gpuhub.store import LeaseIntervalRow, WeekActivityRow

HOSTILE = '=HYPERLINK("http://evil.example/","click")'


def held_this_week(
    pages, user: str, group: str, seconds: int, idle: float = 0.0, gpu_type: str = "gpu"
) -> None:
    """`user` held GPUs for `seconds` GPU-seconds this week (in parallel stretches that fit in
    the week so far), `idle` of them read idle by the service, all counted already."""
    now = datetime.now(timezone.utc)
    monday = week_start(now)
    if (now - monday).total_seconds() < 60:  # the first minute of a week: let one pass
        time.sleep(61 - (now - monday).total_seconds())
        now = datetime.now(timezone.utc)
    room = int((now - monday).total_seconds()) - 5
    rows, left = [], seconds
    while left > 0:
        length = min(room, left)
        end = monday + timedelta(seconds=length)
        rows.append(
            {
                "user": user,
                "server": "earlier",
                "group": group,
                "gpu_type": gpu_type,
                "device": None,
                "started_at": monday,
                "ended_at": end,
                "activity_until": end,
            }
        )
        left -= length
    with pages.store.engine.begin() as c:
        c.execute(sa.insert(LeaseIntervalRow), rows)
        c.execute(
            sa.insert(WeekActivityRow),
            [
                {
                    "week_start": monday,
                    "user": user,
                    "group": group,
                    "gpu_type": gpu_type,
                    "busy_seconds": 0.0,
                    "idle_seconds": idle,
                }
            ],
        )


def test_over_the_weekly_budget_no_gpu_and_the_spawn_page_says_so(pages):
    name = "budgie"
    browser = pages.hub.login(name)  # a researcher (the demo's default group): no budget
    pages.make_group_member(name, BUDGET_GROUP)
    spawn_page = browser.get(f"{pages.url}/hub/spawn/{name}", timeout=60)
    assert spawn_page.status_code == 200
    assert (
        f"GPU-hours this week: 0 of 0.5 used (group {BUDGET_GROUP}), 0.5 left; "
        "the budget renews Monday 00:00 UTC" in spawn_page.text
    )
    held_this_week(pages, name, BUDGET_GROUP, 2160, idle=1800.0)  # 0.6 h, 0.5 h of it idle

    spawn_page = browser.get(f"{pages.url}/hub/spawn/{name}", timeout=60)
    assert f"You used 0.6 of the 0.5 GPU-hours of group {BUDGET_GROUP} this week" in spawn_page.text
    r = pages.hub.spawn(name, {"gpus": 1})
    if r.status_code in (201, 202):
        pages.hub.stop_server(name)
    assert r.status_code == 403, r.text
    assert r.json()["message"] == (
        f"you used 0.6 of the 0.5 GPU-hours of group {BUDGET_GROUP} this week; "
        "the budget renews Monday 00:00 UTC"
    )
    assert pages.store.leases(name) == []

    me = pages.api(pages.token(name), "GET", "me").json()["gpu_hours"]
    assert (me["held_hours"], me["idle_hours"], me["busy_hours"]) == (0.6, 0.5, 0.0)
    assert me["budget"]["exhausted"] and me["budget"]["limit"] == "0.5"
    page = pages.get(pages.login(name))
    assert "0.6 GPU-hours held since Monday 00:00 UTC, 0.5 of them idle" in page.text

    # a user outside the group: its budget never applies
    other = pages.hub.login("no-budget-ruth")
    assert "gpuhub-budget" not in other.get(f"{pages.url}/hub/spawn/no-budget-ruth").text


def test_admins_rank_holders_by_idle_hours_and_export_csv_others_cannot(pages):
    held_this_week(pages, "tidy", "researchers", 3600, idle=360.0)
    held_this_week(pages, HOSTILE, "+cmd|' /C calc'!A0", 1800, idle=1700.0)
    grace = pages.login("admin-grace")
    page = pages.get(grace, "admin/gpu-hours")
    assert page.status_code == 200
    assert page.text.index("=HYPERLINK(&#34;http") < page.text.index(">tidy<")  # escaped, first
    hours = pages.api(pages.token("admin-grace"), "GET", "admin/gpu-hours").json()
    users = [h["user"] for h in hours["holders"]]
    assert users.index(HOSTILE) < users.index("tidy")
    [tidy] = [h for h in hours["holders"] if h["user"] == "tidy"]
    assert tidy == {
        "user": "tidy",
        "group": "researchers",
        "gpu_type": "gpu",
        "held_hours": 1.0,
        "busy_hours": 0.0,
        "idle_hours": 0.1,
        "unknown_hours": 0.9,
        "idle_share": 0.1,
    }

    r = grace.get(pages.page_url("api/admin/gpu-hours.csv"), timeout=60)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in r.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    [evil] = [row for row in rows if "HYPERLINK" in row["user"]]
    assert evil["user"] == "'" + HOSTILE and evil["group"].startswith("'+cmd")
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row.values())
    [tidy_row] = [row for row in rows if row["user"] == "tidy"]
    assert (tidy_row["held_hours"], tidy_row["idle_hours"], tidy_row["group"]) == (
        "1.0",
        "0.1",
        "researchers",
    )
    quotas = pages.get(grace, "admin/quotas").text  # the budgets of the quotas file
    assert f"group {BUDGET_GROUP}: 0.5" in quotas and "group students: 40" in quotas
    last = pages.api(pages.token("admin-grace"), "GET", "admin/gpu-hours?week=last").json()
    assert last["holders"] == []
    bad = pages.api(pages.token("admin-grace"), "GET", "admin/gpu-hours?week=soon")
    assert bad.status_code == 400 and bad.json()["message"].startswith("week:")

    # a normal user, hostile or not, sees none of it
    mallory = pages.login("mallory")
    assert pages.get(mallory, "admin/gpu-hours").status_code == 403
    r = mallory.get(pages.page_url("api/admin/gpu-hours.csv"), timeout=60)
    assert r.status_code == 403 and "HYPERLINK" not in r.text
    token = pages.token("mallory")
    for path in ("admin/gpu-hours", "admin/gpu-hours.csv", "admin/gpu-hours.csv?week=last"):
        r = pages.api(token, "GET", path)
        assert r.status_code == 403, (path, r.text)
        assert "tidy" not in r.text


def test_the_service_exposes_the_weeks_gpu_hours_by_group_not_by_user(pages):
    """GPU-hours in the store show in the next cycle's metrics, by group."""
    import requests

    from gpuhub.testing import wait_for

    held_this_week(pages, "metrica", "metered", 720, idle=360.0, gpu_type="a100")
    held = 'gpuhub_week_held_seconds{gpu_type="a100",group="metered"} 720.0'
    idle = 'gpuhub_week_idle_seconds{gpu_type="a100",group="metered"} 360.0'

    def exposed() -> str | None:
        text = requests.get(pages.page_url("metrics"), timeout=30).text
        return text if held in text else None

    text = wait_for(exposed, timeout=75, interval=2, what="a cycle of the service")
    assert idle in text
    assert 'user="' not in text and "metrica" not in text
