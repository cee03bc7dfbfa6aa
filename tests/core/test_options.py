from __future__ import annotations

from pathlib import Path

import pytest

from gpuhub.core.catalog import catalog_from_dict
from gpuhub.core.options import OptionsError, Selection, form_choices, options_from_form, parse

CATALOG = catalog_from_dict(
    {
        "environments": [
            {"id": "pytorch"},
            {"id": "tensorflow", "interfaces": ["jupyterlab"]},
            {"id": "secret", "groups": ["staff"]},
            {"id": "old", "enabled": False},
        ],
        "gpu_types": [
            {"id": "a100", "max_per_server": 4},
            {"id": "mig", "resource": "nvidia.com/mig-1g.10gb", "sharing": "mig"},
            {"id": "h100", "groups": ["staff"], "max_per_server": 8},
        ],
        "defaults": {"interface": "vscode", "environment": "pytorch", "gpu_type": "a100"},
    }
)


def test_defaults_fill_missing_keys():
    assert parse({}, CATALOG, []) == Selection("vscode", "pytorch", 0, "a100")


def test_full_selection_and_numeric_strings():
    assert parse(
        {"interface": "jupyterlab", "environment": "tensorflow", "gpus": "2", "gpu_type": "a100"},
        CATALOG,
        [],
    ) == Selection("jupyterlab", "tensorflow", 2, "a100")


def test_default_interface_falls_back_to_what_the_environment_supports():
    assert parse({"environment": "tensorflow"}, CATALOG, []).interface == "jupyterlab"


def test_default_environment_falls_back_to_an_allowed_one():
    catalog = catalog_from_dict(
        {"environments": [{"id": "staff", "groups": ["staff"]}, {"id": "open"}]}
    )
    assert parse({}, catalog, ["students"]).environment == "open"


def test_group_restricted_choices_are_allowed_to_members():
    s = parse({"environment": "secret", "gpu_type": "h100", "gpus": 8}, CATALOG, ["staff"])
    assert s == Selection("vscode", "secret", 8, "h100")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"gpus": True}, "gpus"),
        ({"gpus": " 1"}, None),  # whitespace around a number from a form is fine
        ({"gpus": 5}, "gpus"),
        ({"gpus": 2, "gpu_type": "mig"}, "gpus"),
        ({"environment": "old"}, "environment"),
        ({"environment": "secret"}, "environment"),
        ({"gpu_type": "h100", "gpus": 1}, "gpu_type"),
        ({"interface": "vscode", "environment": "tensorflow"}, "interface"),
        ({"extra": 1}, "extra"),
        ({"interface": None, "environment": None, "gpus": None, "gpu_type": None}, None),
    ],
)
def test_invalid_options_name_the_field(options, field):
    if field is None:
        parse(options, CATALOG, [])
        return
    with pytest.raises(OptionsError) as e:
        parse(options, CATALOG, [])
    assert e.value.field == field


def test_null_means_the_default_as_the_readme_says():
    nulls = {"interface": None, "environment": None, "gpus": None, "gpu_type": None}
    assert parse(nulls, CATALOG, []) == parse({}, CATALOG, [])
    for key in nulls:
        assert parse({key: None}, CATALOG, []) == parse({}, CATALOG, [])
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "given as JSON `null`, takes its default" in readme


def test_capacity_limits_requests_to_the_pool():
    with pytest.raises(OptionsError, match="the pool has 3"):
        parse({"gpus": 4}, CATALOG, [], capacity={"a100": 3})
    assert parse({"gpus": 3}, CATALOG, [], capacity={"a100": 3}).gpus == 3


def test_gpu_type_ignored_for_cpu_only_but_still_validated():
    assert parse({"gpus": 0, "gpu_type": "h100"}, CATALOG, []).gpus == 0
    with pytest.raises(OptionsError):
        parse({"gpus": 0, "gpu_type": "nope"}, CATALOG, [])


def test_options_from_form_takes_first_values_and_drops_xsrf():
    form = {"interface": ["vscode"], "gpus": ["2", "3"], "_xsrf": ["t"], "gpu_type": [""]}
    assert options_from_form(form) == {"interface": "vscode", "gpus": "2"}


def test_form_choices_follow_groups_and_capacity():
    choices = form_choices(CATALOG, ["students"], {"a100": (4, 1), "mig": (7, 7)})
    assert [e.id for e in choices.environments] == ["pytorch", "tensorflow"]
    assert [(c.gpu_type.id, c.total, c.free, c.counts) for c in choices.gpu_choices] == [
        ("a100", 4, 1, (1, 2, 3, 4)),
        ("mig", 7, 7, (1,)),
    ]
    again = form_choices(CATALOG, [], {}, previous={"environment": "tensorflow", "gpus": 1})
    assert again.selected.environment == "tensorflow"


# -- when_no_gpu: wait (the default) or start on CPU and keep the place -------------------------


def test_when_no_gpu_defaults_to_wait_and_start_on_cpu_is_kept():
    assert parse({"gpus": 1}, CATALOG, []).when_no_gpu == "wait"
    assert parse({"gpus": 1, "when_no_gpu": None}, CATALOG, []).when_no_gpu == "wait"
    chosen = parse({"gpus": 1, "when_no_gpu": "start-on-cpu"}, CATALOG, [])
    assert chosen.when_no_gpu == "start-on-cpu" and chosen.starts_on_cpu
    assert chosen.as_user_options()["when_no_gpu"] == "start-on-cpu"
    # the default is not written into the stored options (they stay as they were)
    assert "when_no_gpu" not in parse({"gpus": 1}, CATALOG, []).as_user_options()
    # without GPUs there is nothing to wait for
    cpu = parse({"gpus": 0, "when_no_gpu": "start-on-cpu"}, CATALOG, [])
    assert cpu.when_no_gpu == "wait" and not cpu.starts_on_cpu


@pytest.mark.parametrize(
    "value", ["later", "", "START-ON-CPU", 1, True, ["start-on-cpu"], {"x": 1}, "x" * 500]
)
def test_forged_when_no_gpu_is_refused_naming_the_field(value):
    with pytest.raises(OptionsError) as e:
        parse({"gpus": 1, "when_no_gpu": value}, CATALOG, [])
    assert e.value.field == "when_no_gpu"
    assert len(str(e.value)) < 200


def test_the_form_sends_the_choice_and_an_empty_one_is_the_default():
    form = {"gpus": ["1"], "when_no_gpu": ["start-on-cpu"], "_xsrf": ["x"]}
    assert parse(options_from_form(form), CATALOG, []).starts_on_cpu
    assert (
        parse(options_from_form({"gpus": ["1"], "when_no_gpu": [""]}), CATALOG, []).when_no_gpu
        == "wait"
    )
