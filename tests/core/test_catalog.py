from __future__ import annotations

from pathlib import Path

import pytest

from gpuhub import paths
from gpuhub.core.catalog import CatalogError, catalog_from_dict, devices_by_type, load_catalog

MINIMAL = {"environments": [{"id": "pytorch"}]}


def test_default_catalogue_has_pytorch_and_tensorflow_in_both_interfaces():
    catalog = load_catalog(paths.default_catalog_file())
    assert [e.id for e in catalog.environments] == ["pytorch", "tensorflow"]
    for env in catalog.environments:
        assert env.interfaces == ("jupyterlab", "vscode")
        assert env.local.python and env.local.python.endswith(f".envs/{env.id}/bin/python")
        assert env.image
    assert catalog.default_gpu_type == "gpu"


def test_minimal_catalogue_takes_defaults():
    catalog = catalog_from_dict(MINIMAL)
    assert catalog.default_environment == "pytorch"
    assert catalog.default_interface == "jupyterlab"
    assert catalog.default_gpu_type is None
    assert catalog.interface("vscode").default_url == "/vscode/"


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        ([], "", "must be a mapping"),
        ({}, "environments", "must list at least one environment"),
        ({"environments": {"id": "x"}}, "environments", "must be a list"),
        ({"environments": [{"display_name": "x"}]}, "environments[0].id", "is required"),
        ({"environments": [{"id": "Bad Id"}]}, "environments[0].id", "is not a valid id"),
        ({"environments": [{"id": "a"}, {"id": "a"}]}, "environments[1].id", "duplicate"),
        ({"environments": [{"id": "a", "imgae": "x"}]}, "environments[0].imgae", "unknown field"),
        (
            {"environments": [{"id": "a", "interfaces": ["emacs"]}]},
            "environments[0].interfaces[0]",
            "unknown interface 'emacs'",
        ),
        (
            {"environments": [{"id": "a", "interfaces": []}]},
            "environments[0].interfaces",
            "at least",
        ),
        ({"environments": [{"id": "a", "groups": "staff"}]}, "environments[0].groups", "list"),
        (
            {"environments": [{"id": "a", "enabled": "yes"}]},
            "environments[0].enabled",
            "true or false",
        ),
        (
            {**MINIMAL, "gpu_types": [{"id": "g", "max_per_server": 0}]},
            "gpu_types[0].max_per_server",
            ">= 1",
        ),
        (
            {**MINIMAL, "gpu_types": [{"id": "g", "max_per_server": True}]},
            "gpu_types[0].max_per_server",
            "integer",
        ),
        (
            {**MINIMAL, "gpu_types": [{"id": "g", "sharing": "magic"}]},
            "gpu_types[0].sharing",
            "one of",
        ),
        (
            {**MINIMAL, "gpu_types": [{"id": "g", "resource": "gpu"}]},
            "gpu_types[0].resource",
            "extended resource",
        ),
        (
            {**MINIMAL, "gpu_types": [{"id": "g", "node_selector": ["x"]}]},
            "gpu_types[0].node_selector",
            "mapping",
        ),
        (
            {**MINIMAL, "defaults": {"environment": "nope"}},
            "defaults.environment",
            "unknown environment",
        ),
        ({**MINIMAL, "defaults": {"gpu_type": "nope"}}, "defaults.gpu_type", "unknown GPU type"),
        ({**MINIMAL, "colour": "blue"}, "colour", "unknown field"),
        ({"interfaces": [{"id": "emacs"}], **MINIMAL}, "interfaces[0].id", "unknown interface"),
    ],
)
def test_bad_catalogue_names_field_and_problem(data, field, problem):
    with pytest.raises(CatalogError) as e:
        catalog_from_dict(data, source="test.yaml")
    assert e.value.field == field
    assert problem in e.value.problem
    assert str(e.value).startswith(f"test.yaml: {field}: ")


def test_bad_yaml_file_names_the_line(tmp_path: Path):
    path = tmp_path / "catalog.yaml"
    path.write_text("environments:\n  - id: a\n   bad: [\n")
    with pytest.raises(CatalogError) as e:
        load_catalog(path)
    assert str(path) in str(e.value) and "line" in e.value.field


def test_missing_file(tmp_path: Path):
    with pytest.raises(CatalogError, match="cannot be read"):
        load_catalog(tmp_path / "nope.yaml")


def test_relative_python_is_resolved_against_the_file_without_following_symlinks(tmp_path: Path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "catalog.yaml"
    path.write_text("environments:\n  - id: a\n    local: {python: ../venv/bin/python}\n")
    assert load_catalog(path).environments[0].local.python == str(tmp_path / "venv/bin/python")


def test_group_restrictions():
    catalog = catalog_from_dict(
        {
            "environments": [{"id": "open"}, {"id": "staff", "groups": ["staff"]}],
            "gpu_types": [{"id": "g"}, {"id": "big", "groups": ["staff", "admins"]}],
        }
    )
    assert [e.id for e in catalog.environments_for(["students"])] == ["open"]
    assert [e.id for e in catalog.environments_for(["admins", "staff"])] == ["open", "staff"]
    assert [g.id for g in catalog.gpu_types_for([])] == ["g"]


def test_devices_are_sorted_into_types_by_name():
    catalog = catalog_from_dict(
        {
            **MINIMAL,
            "gpu_types": [
                {"id": "mig-small", "local_match": "1g.10gb"},
                {"id": "any"},
                {"id": "h100", "local_match": "H100"},
            ],
        }
    )
    names = {
        "GPU-1": "NVIDIA A100-SXM4-80GB",
        "MIG-1": "NVIDIA A100-SXM4-80GB MIG 1g.10gb",
        "GPU-2": "NVIDIA H100 80GB HBM3",
    }
    assert devices_by_type(catalog.gpu_types, names) == {
        "mig-small": ["MIG-1"],
        "any": ["GPU-1"],
        "h100": ["GPU-2"],
    }
