"""GPU-hours, pure: week boundaries, intervals split between weeks, held seconds that a restart
cannot change, activity credited once, weekly budgets and the group the hours count for."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from gpuhub.core.accounting import (
    LeaseInterval,
    Usage,
    UsageKey,
    credit_activity,
    csv_cell,
    device_segments,
    held_seconds,
    hoarders,
    hours_text,
    split_by_week,
    totals,
    week_from_text,
    week_of,
    week_start,
    week_usage,
)
from gpuhub.core.idle import BUSY, IDLE, UNKNOWN, Segment
from gpuhub.core.options import Selection
from gpuhub.core.quotas import (
    BudgetExceeded,
    accounting_group,
    check_budget,
    effective_budget,
    quota_config_from_dict,
    user_budget,
)

UTC = timezone.utc
MONDAY = datetime(2026, 11, 23, tzinfo=UTC)
H = 3600.0


def at(days: float = 0, hours: float = 0) -> datetime:
    return MONDAY + timedelta(days=days, hours=hours)


def interval(
    start: datetime, end: datetime | None = None, *, id: int = 1, device: str | None = "GPU-a"
) -> LeaseInterval:
    return LeaseInterval(id, "ada", "", "students", "a100", device, start, end)


def test_weeks_start_on_monday_midnight_utc():
    assert week_start(datetime(2026, 11, 29, 23, 59, 59, tzinfo=UTC)) == MONDAY
    assert week_start(MONDAY) == MONDAY
    assert week_start(MONDAY - timedelta(microseconds=1)) == MONDAY - timedelta(days=7)
    # another zone: its UTC instant decides
    paris = timezone(timedelta(hours=1))
    assert week_start(datetime(2026, 11, 30, 0, 30, tzinfo=paris)) == MONDAY
    assert week_of(at(3), -1) == (MONDAY - timedelta(days=7), MONDAY)
    assert week_from_text("last", at(3)) == week_of(at(3), -1)
    assert week_from_text("2026-11-26", at(30))[0] == MONDAY
    with pytest.raises(ValueError, match=r"^week: 'soon' is not a week"):
        week_from_text("soon", at(3))


def test_a_lease_open_across_the_boundary_is_split_between_the_weeks():
    assert split_by_week(at(-1, 22), at(0, 2)) == [
        (MONDAY - timedelta(days=7), 2 * H),
        (MONDAY, 2 * H),
    ]
    assert split_by_week(at(0, 2), at(0, 2)) == []
    lease = interval(at(-1, 22))  # still held
    now = at(0, 2)
    assert lease.held_seconds(*week_of(MONDAY, -1), now) == 2 * H
    assert lease.held_seconds(*week_of(MONDAY), now) == 2 * H
    # a three-week lease: each week gets its share, the whole adds up
    long = interval(at(-7, 12), at(7, 12))
    weeks = [week_of(MONDAY, k) for k in (-2, -1, 0, 1)]
    shares = [long.held_seconds(s, e, at(20)) for s, e in weeks]
    assert shares == [0.0, 6.5 * 24 * H, 7 * 24 * H, 0.5 * 24 * H]
    assert sum(shares) == 14 * 24 * H


def test_held_seconds_are_derived_so_asking_again_never_counts_twice():
    leases = [interval(at(0, 1), at(0, 3)), interval(at(0, 2), id=2)]
    start, end = week_of(MONDAY)
    first = held_seconds(leases, start, end, at(0, 4))
    # a restarted hub or service asks again: the same answer, nothing lost, nothing added
    assert held_seconds(leases, start, end, at(0, 4)) == first == 2 * H + 2 * H
    assert held_seconds(leases, start, end, at(0, 5)) == first + H  # only the open one grows
    assert held_seconds(leases, start, end, at(0, 1)) == 0.0  # before anything was held


def test_activity_is_credited_from_where_it_stopped_split_by_week():
    lease = interval(at(-1, 23))
    t = at(-1, 23).timestamp()
    segments = [
        Segment(t, t + 1800, BUSY),
        Segment(t + 1800, t + 5400, IDLE),  # across midnight
        Segment(t + 5400, t + 7200, UNKNOWN),
    ]
    credit = credit_activity(lease, segments, at(0, 1))
    assert credit is not None and credit.until == at(0, 1)
    assert credit.weeks == ((MONDAY - timedelta(days=7), 1800.0, 1800.0), (MONDAY, 0.0, 1800.0))
    # counted up to there: the next credit starts from `until`, never before it
    moved = LeaseInterval(**{**lease.__dict__, "activity_until": credit.until})
    assert credit_activity(moved, segments, at(0, 1)) is None
    later = credit_activity(moved, [*segments, Segment(t + 7200, t + 9000, BUSY)], at(0, 2))
    assert later is not None and later.weeks == ((MONDAY, 1800.0, 0.0),)
    # an ended lease is counted to its end, not beyond
    ended = LeaseInterval(
        **{
            **lease.__dict__,
            "ended_at": at(
                -1,
                23,
            )
            + timedelta(minutes=10),
        }
    )
    credit = credit_activity(ended, segments, at(0, 2))
    assert credit is not None and (credit.busy, credit.idle, credit.until) == (
        600.0,
        0.0,
        ended.ended_at,
    )


def test_unknown_counts_as_neither_busy_nor_idle():
    start, end = week_of(MONDAY)
    key = UsageKey("ada", "students", "a100")
    [u] = week_usage([interval(at(0), at(0, 10))], {key: (2 * H, 3 * H)}, start, end, at(1))
    assert (u.held, u.busy, u.idle, u.unknown) == (10 * H, 2 * H, 3 * H, 5 * H)
    assert u.idle_share == 0.3
    # nothing known: all unknown, never idle
    [u] = week_usage([interval(at(0), at(0, 10))], {}, start, end, at(1))
    assert (u.idle, u.unknown, u.idle_share) == (0.0, 10 * H, 0.0)


def test_devices_of_a_server_are_matched_to_its_leases():
    segs = {"GPU-a": [Segment(0, 1, BUSY)], "GPU-b": [Segment(0, 1, IDLE)]}
    named = [interval(at(0), id=1, device="GPU-b")]
    assert device_segments(named, segs) == {1: segs["GPU-b"]}
    units = [interval(at(0), id=1, device=None), interval(at(0), id=2, device=None)]
    assert device_segments(units, {"0": segs["GPU-a"]}) == {1: segs["GPU-a"], 2: ()}


def test_hoarders_rank_by_idle_hours_and_totals_by_group():
    usage = [
        Usage("ada", "students", "a100", 10 * H, 1 * H, 2 * H),
        Usage("bob", "staff", "a100", 5 * H, 0, 4 * H),
        Usage("cy", "students", "a100", 20 * H, 19 * H, 1 * H),
    ]
    assert [u.user for u in hoarders(usage)] == ["bob", "ada", "cy"]
    by_group = totals(usage)
    assert by_group[("students", "a100")].held == 30 * H
    assert by_group[("students", "a100")].idle == 3 * H


def test_hours_are_shown_rounded_down():
    assert [hours_text(s) for s in (0, 1, 900, 40 * H - 1, 40 * H, 2.5 * H, 1234.5 * H)] == [
        "0",
        "0",
        "0.25",
        "39.99",
        "40",
        "2.5",
        "1234.5",
    ]


def test_csv_cells_never_start_a_formula():
    assert csv_cell('=HYPERLINK("x")') == '\'=HYPERLINK("x")'
    for hostile in ("+1", "-1+2", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(hostile).startswith("'")
    assert csv_cell("ada") == "ada" and csv_cell("") == ""


# -- budgets -------------------------------------------------------------------------------------

QUOTAS = quota_config_from_dict(
    {
        "default": {"max_gpus": 1},
        "groups": {
            "students": {"max_gpus": 1, "weekly_gpu_hours": 40},
            "interns": {"weekly_gpu_hours": 10},
            "staff": {"max_gpus": 4, "weekly_gpu_hours": "unlimited"},
            "researchers": {"max_gpus": 2},
        },
        "users": {"ada": {"weekly_gpu_hours": 2.5}},
    }
)


def gpus(n: int) -> Selection:
    return Selection("jupyterlab", "pytorch", n, "gpu")


def test_the_budget_message_says_use_budget_whose_and_renewal():
    budget = effective_budget("bob", ["students"], QUOTAS)
    assert (budget.hours, budget.source) == (40.0, "group students")
    with pytest.raises(BudgetExceeded) as e:
        check_budget(gpus(1), 40 * H, budget)
    assert str(e.value) == (
        "you used 40 of the 40 GPU-hours of group students this week; "
        "the budget renews Monday 00:00 UTC"
    )
    check_budget(gpus(1), 40 * H - 1, budget)  # one second left: admitted
    with pytest.raises(BudgetExceeded, match=r"^you used 40\.01 of the 40 GPU-hours"):
        check_budget(gpus(1), 40.019 * H, budget)
    check_budget(gpus(0), 100 * H, budget)  # no GPU: always admitted


def test_which_budget_applies():
    # the most generous of the user's groups; unlimited beats a number
    assert effective_budget("bob", ["students", "interns"], QUOTAS).hours == 40.0
    assert effective_budget("bob", ["students", "staff"], QUOTAS).hours is None
    # a budget of a group the user is not in never applies; no budget at all: none
    assert effective_budget("bob", ["researchers"], QUOTAS).hours is None
    assert effective_budget("bob", [], QUOTAS).hours is None
    # a per-user entry wins
    assert effective_budget("ada", ["students"], QUOTAS).hours == 2.5
    with pytest.raises(BudgetExceeded, match=r"you used 2\.5 of the 2\.5 GPU-hours of user ada"):
        check_budget(gpus(1), 2.5 * H, effective_budget("ada", ["students"], QUOTAS))
    # hub admins: held to it, unless the site exempts them; exempting never frees a non-admin
    assert user_budget("bob", ["students"], QUOTAS, admin=True).hours == 40.0
    assert user_budget("bob", ["students"], QUOTAS, admin=True, exempt_admins=True).hours is None
    assert user_budget("bob", ["students"], QUOTAS, exempt_admins=True).hours == 40.0


def test_the_group_hours_count_for_follows_the_quotas():
    assert accounting_group("bob", ["students", "interns"], QUOTAS) == "students"
    assert accounting_group("bob", ["researchers"], QUOTAS) == "researchers"  # its GPU limit
    assert accounting_group("bob", ["physics"], QUOTAS) == ""  # the default applies
    assert accounting_group("bob", ["staff", "students"], QUOTAS) == "staff"


@pytest.mark.parametrize("bad", [-1, "lots", True, float("nan"), float("inf"), [40]])
def test_a_bad_budget_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match=r"^quotas\.groups\.students\.weekly_gpu_hours: must be"):
        quota_config_from_dict({"groups": {"students": {"weekly_gpu_hours": bad}}})
