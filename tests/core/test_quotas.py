from __future__ import annotations

import pytest

from gpuhub.core.options import Selection
from gpuhub.core.quotas import (
    Quota,
    QuotaConfig,
    QuotaExceeded,
    Usage,
    admit,
    effective_quota,
    quota_config_from_dict,
)

CONFIG = quota_config_from_dict(
    {
        "default": {"max_gpus": 1, "max_servers": 2},
        "groups": {
            "students": {"max_gpus": 1, "max_servers": 1},
            "researchers": {"max_gpus": 2},
            "staff": {"max_gpus": "unlimited"},
        },
        "users": {"ada": {"max_gpus": 8}},
    }
)


def gpus(n: int) -> Selection:
    return Selection("jupyterlab", "pytorch", n, "gpu")


def test_group_limit_message():
    quota = effective_quota("bob", ["students"], CONFIG)
    with pytest.raises(QuotaExceeded) as e:
        admit(gpus(1), Usage(gpus=1, servers=0), quota)
    assert str(e.value) == (
        "you hold 1 of the 1 GPU allowed to group students; 1 more would go over the limit"
    )


def test_gpus_waited_for_in_the_queue_count_as_held():
    quota = effective_quota("nobody", [], CONFIG)  # default: 1 GPU, 2 servers
    with pytest.raises(QuotaExceeded) as e:
        admit(gpus(1), Usage(gpus=0, servers=1, queued_gpus=1), quota)
    assert str(e.value) == (
        "you hold 0 and wait for 1 of the 1 GPU allowed; 1 more would go over the limit"
    )
    admit(gpus(0), Usage(servers=1, queued_gpus=1), quota)  # a CPU-only server still fits


def test_most_generous_group_wins_per_limit():
    quota = effective_quota("bob", ["students", "researchers"], CONFIG)
    assert (quota.gpus.value, quota.gpus.source) == (2, "group researchers")
    # researchers set no server limit, so the students' one applies
    assert (quota.servers.value, quota.servers.source) == (1, "group students")


def test_unlimited_beats_numbers_and_user_entries_win():
    assert effective_quota("x", ["staff", "students"], CONFIG).gpus.value is None
    assert effective_quota("ada", ["staff"], CONFIG).gpus.value == 8


def test_default_applies_without_groups():
    quota = effective_quota("nobody", [], CONFIG)
    assert (quota.gpus.value, quota.servers.value) == (1, 2)
    with pytest.raises(QuotaExceeded, match="you hold 1 of the 1 GPU allowed;"):
        admit(gpus(1), Usage(gpus=1), quota)


def test_server_limit():
    quota = effective_quota("bob", ["students"], CONFIG)
    with pytest.raises(QuotaExceeded, match="you run 1 of the 1 server allowed to group students"):
        admit(gpus(0), Usage(servers=1), quota)


def test_cpu_only_needs_no_gpu_quota():
    admit(gpus(0), Usage(gpus=5), effective_quota("bob", ["students"], CONFIG))


def test_no_config_means_unlimited():
    quota = effective_quota("x", ["g"], QuotaConfig())
    admit(gpus(100), Usage(gpus=100, servers=100), quota)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"groups": {"a": {"max_gpus": -1}}}, "quotas.groups.a.max_gpus"),
        ({"groups": {"a": {"max_gpus": True}}}, "quotas.groups.a.max_gpus"),
        ({"groups": {"a": {"gpus": 1}}}, "quotas.groups.a.gpus: unknown field"),
        ({"teams": {}}, "quotas.teams: unknown field"),
        ({"users": []}, "quotas.users: must be a mapping"),
    ],
)
def test_bad_quota_config(data, message):
    with pytest.raises(ValueError, match=message):
        quota_config_from_dict(data)


def test_quota_dataclass_defaults_mean_not_set():
    assert Quota() == Quota(None, None)
