"""Environments and group quotas admins change at runtime: validation and merging."""

from __future__ import annotations

import pytest

from gpuhub.core.catalog import catalog_from_dict
from gpuhub.core.options import form_choices
from gpuhub.core.overrides import (
    DEFAULT_REGISTRIES,
    GroupQuota,
    InputError,
    check_environment,
    check_quota,
    environment_entry,
    merge_environments,
    merge_group_quotas,
    parse_image,
    registry_allowed,
)
from gpuhub.core.quotas import QuotaConfig, effective_quota, quota_config_from_dict

CATALOG = catalog_from_dict(
    {
        "environments": [
            {
                "id": "pytorch",
                "display_name": "PyTorch",
                "image": "quay.io/gpuhub/pytorch:1",
                "local": {"python": "/opt/envs/torch/bin/python", "env": {"TORCH_HOME": "/t"}},
            },
            {"id": "tensorflow", "image": "quay.io/gpuhub/tensorflow:1", "groups": ["staff"]},
        ],
        "gpu_types": [{"id": "gpu"}],
    }
)


@pytest.mark.parametrize(
    ("reference", "registry", "repository", "tag", "digest"),
    [
        ("python", "docker.io", "library/python", None, None),
        ("python:3.12-slim", "docker.io", "library/python", "3.12-slim", None),
        ("jupyter/base-notebook", "docker.io", "jupyter/base-notebook", None, None),
        ("quay.io/gpuhub/pytorch:0.1.0", "quay.io", "gpuhub/pytorch", "0.1.0", None),
        ("localhost:5000/team/img", "localhost:5000", "team/img", None, None),
        ("registry.example.org:443/a/b/c:v1", "registry.example.org:443", "a/b/c", "v1", None),
        ("nvcr.io/nvidia/pytorch:24.01-py3", "nvcr.io", "nvidia/pytorch", "24.01-py3", None),
        (
            "ghcr.io/org/img@sha256:" + "a" * 64,
            "ghcr.io",
            "org/img",
            None,
            "sha256:" + "a" * 64,
        ),
    ],
)
def test_image_references_are_split_as_docker_reads_them(
    reference, registry, repository, tag, digest
):
    ref = parse_image(reference)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )


@pytest.mark.parametrize(
    "reference",
    [
        "",
        "Quay.io/Upper/Case",
        "quay.io/org/img:",
        "quay.io//img",
        "img:tag with space",
        "img@sha256:short",
        "-leading/dash",
        "quay.io/org/img:" + "t" * 129,
        "a/" * 130 + "b",
        "<img src=x onerror=alert(1)>",
        "quay.io/org/img;rm -rf /",
    ],
)
def test_what_is_not_an_image_reference_is_refused(reference):
    with pytest.raises(InputError) as info:
        parse_image(reference)
    assert info.value.field == "image"


def test_registry_allow_list_by_registry_namespace_or_wildcard():
    pytorch = parse_image("quay.io/gpuhub/pytorch:1")
    assert registry_allowed(pytorch, ["quay.io"])
    assert registry_allowed(pytorch, ["quay.io/gpuhub"])
    assert registry_allowed(pytorch, ["quay.io/gpuhub/"])
    assert not registry_allowed(pytorch, ["quay.io/gpu"])  # a prefix of a name is not a folder
    assert not registry_allowed(pytorch, ["docker.io", "ghcr.io"])
    assert not registry_allowed(pytorch, [])
    assert registry_allowed(pytorch, ["*"])
    assert registry_allowed(parse_image("python:3"), ["docker.io"])
    assert not registry_allowed(parse_image("python:3"), DEFAULT_REGISTRIES)
    assert not registry_allowed(parse_image("evil.example.com/x"), DEFAULT_REGISTRIES)


def entry(**fields):
    return {"id": "jax", "display_name": "JAX", "image": "quay.io/gpuhub/jax:1", **fields}


def test_a_valid_environment_is_normalised():
    stored = check_environment(
        entry(interfaces="jupyterlab, vscode", groups="staff,students  staff", description=" x "),
        CATALOG,
        ["quay.io"],
    )
    assert stored == {
        "id": "jax",
        "display_name": "JAX",
        "description": "x",
        "image": "quay.io/gpuhub/jax:1",
        "interfaces": ["jupyterlab", "vscode"],
        "groups": ["staff", "students"],
        "enabled": True,
    }


def test_a_hostile_display_name_is_kept_as_text():
    name = "<img src=x onerror=alert(1)>"
    stored = check_environment(entry(display_name=name), CATALOG, ["quay.io"])
    assert stored["display_name"] == name


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([], "environment"),
        (entry(id="JAX"), "id"),
        (entry(id="<img src=x>"), "id"),
        (entry(id=None), "id"),
        (entry(color="red"), "color"),
        (entry(display_name="x" * 101), "display_name"),
        (entry(display_name="bell\x07"), "display_name"),
        (entry(display_name=5), "display_name"),
        (entry(image="evil.example.com/miner:1"), "image"),
        (entry(image="not an image"), "image"),
        (entry(image=None), "image"),  # neither image nor local python
        (entry(interfaces=["emacs"]), "interfaces[0]"),
        (entry(interfaces=[]), "interfaces"),
        (entry(groups=5), "groups"),
        (entry(enabled="yes"), "enabled"),
        (entry(local={"python": "relative/python"}), "local.python"),
        (entry(local={"shell": "/bin/sh"}), "local.shell"),
        (entry(local={"env": {"A": ["list"]}}), "local.env"),
        (entry(local={"env": {"LD_PRELOAD": "/tmp/x.so"}}), "local.env"),
        (entry(local={"python": "/tmp/evil/python"}), "local.python"),
        (entry(id="pytorch"), "id"),  # the file's environment cannot be replaced
        (entry(local=[1]), "local"),
    ],
)
def test_bad_environments_are_refused_naming_the_field(data, field):
    with pytest.raises(InputError) as info:
        check_environment(data, CATALOG, ["quay.io"])
    assert info.value.field == field, info.value


def test_local_python_is_checked_with_the_given_predicate():
    data = entry(image=None, local={"python": "/opt/envs/torch/bin/python"})
    with pytest.raises(InputError) as info:
        check_environment(data, CATALOG, [], python_exists=lambda p: False)
    assert info.value.field == "local.python"
    stored = check_environment(data, CATALOG, [], python_exists=lambda p: True)
    assert stored["local"] == {"python": "/opt/envs/torch/bin/python"}  # not the file's env vars


def test_by_default_no_image_can_be_set_at_runtime():
    assert DEFAULT_REGISTRIES == ()
    for image in ("quay.io/gpuhub/jax:1", "docker.io/library/python:3", "ghcr.io/x/y:1"):
        with pytest.raises(InputError) as info:
            check_environment(entry(image=image), CATALOG, DEFAULT_REGISTRIES)
        assert info.value.field == "image"
        assert "allowed: none; the site lists them in c.GpuhubPages.allowed_registries" in str(
            info.value
        )
    assert check_environment(entry(image="python:3"), CATALOG, ["*"])["image"] == "python:3"


def test_a_local_interpreter_comes_from_the_catalogue_file_only():
    with pytest.raises(InputError, match=r"not an interpreter of the catalogue file \(allowed: "):
        check_environment(entry(local={"python": "/usr/bin/python3"}), CATALOG, ["quay.io"])
    # an interpreter of an environment added at runtime does not count as the file's
    added = entry(id="mine", image=None, local={"python": "/opt/envs/torch/bin/python"})
    merged = merge_environments(CATALOG, [check_environment(added, CATALOG, [])]).catalog
    assert merged.runtime_ids == {"mine"}
    assert merged.file_interpreters() == ["/opt/envs/torch/bin/python"]
    # ... and it can be edited again (it is not a file environment)
    check_environment({**added, "display_name": "Mine"}, merged, [])


def test_stored_entries_replace_in_place_or_come_after_the_files():
    jax = check_environment(entry(), CATALOG, ["quay.io"])
    torch_off = {**environment_entry(CATALOG.environment("pytorch")), "enabled": False}
    merged = merge_environments(CATALOG, [jax, torch_off])
    assert merged.problems == ()
    assert [e.id for e in merged.catalog.environments] == ["pytorch", "tensorflow", "jax"]
    assert merged.catalog.environment("pytorch").enabled is False
    assert [e.id for e in merged.catalog.environments_for(["students"])] == ["jax"]
    # The spawn form shows what the merged catalogue allows, and still works with the default
    # environment disabled.
    choices = form_choices(merged.catalog, ["students"], {"gpu": (1, 1)})
    assert [e.id for e in choices.environments] == ["jax"]
    assert choices.selected.environment == "jax"


def test_a_stale_stored_entry_is_left_out_and_reported():
    lab_only = catalog_from_dict(
        {
            "interfaces": [{"id": "jupyterlab"}],
            "environments": [{"id": "pytorch"}],
        }
    )
    stale = entry(interfaces=["vscode"])
    merged = merge_environments(lab_only, [stale, {"nonsense": 1}])
    assert [e.id for e in merged.catalog.environments] == ["pytorch"]
    assert [p[0] for p in merged.problems] == ["jax", "?"]
    assert "vscode" in merged.problems[0][1]


def test_a_stored_entry_never_replaces_a_file_environment():
    env = CATALOG.environment("pytorch")
    with pytest.raises(InputError) as info:
        check_environment(environment_entry(env), CATALOG, ["*"])
    assert info.value.field == "id" and "catalogue file" in info.value.message
    # an entry written to the store anyway (or before these rules) only enables or disables it
    hostile = {
        **environment_entry(env),
        "image": "docker.io/evil/miner:1",
        "local": {"python": "/tmp/evil/python", "env": {"LD_PRELOAD": "/tmp/evil.so"}},
        "groups": ["nobody"],
        "enabled": False,
    }
    merged = merge_environments(CATALOG, [hostile])
    assert merged.problems == ()
    assert merged.catalog.environment("pytorch") == env.__class__(
        **{**env.__dict__, "enabled": False}
    )


def test_a_stored_runtime_entry_with_local_settings_not_from_the_file_is_left_out():
    stale = [
        entry(id="a", local={"python": "/tmp/evil/python"}),
        entry(id="b", local={"python": "/opt/envs/torch/bin/python", "env": {"X": "1"}}),
    ]
    merged = merge_environments(CATALOG, stale)
    assert [e.id for e in merged.catalog.environments] == ["pytorch", "tensorflow"]
    assert [(i, p.split(":")[0]) for i, p in merged.problems] == [
        ("a", "local.python"),
        ("b", "local.env"),
    ]


@pytest.mark.parametrize(
    ("gpus", "servers", "expected"),
    [
        ("2", "", (2, None)),
        (3, None, (3, None)),
        ("unlimited", "1", ("unlimited", 1)),
        (" Unlimited ", "0", ("unlimited", 0)),
    ],
)
def test_group_quota_input(gpus, servers, expected):
    q = check_quota("students", gpus, servers)
    assert (q.max_gpus, q.max_servers) == expected


@pytest.mark.parametrize(
    ("group", "gpus", "servers", "field"),
    [
        ("", 1, 1, "group"),
        ("a,b", 1, 1, "group"),
        ("students", "-1", 1, "max_gpus"),
        ("students", "1.5", 1, "max_gpus"),
        ("students", True, 1, "max_gpus"),
        ("students", 1, "lots", "max_servers"),
        ("students", 1, 10**7, "max_servers"),
    ],
)
def test_bad_group_quotas_are_refused_naming_the_field(group, gpus, servers, field):
    with pytest.raises(InputError) as info:
        check_quota(group, gpus, servers)
    assert info.value.field == field


def test_stored_group_quotas_win_over_configured_ones():
    config = quota_config_from_dict(
        {"default": {"max_gpus": 1}, "groups": {"students": {"max_gpus": 1, "max_servers": 1}}}
    )
    merged = merge_group_quotas(
        config,
        [GroupQuota("students", 2, None), GroupQuota("interns", 0, 1)],
    )
    students = effective_quota("ada", ["students"], merged)
    assert students.gpus.value == 2 and students.gpus.source == "group students"
    assert students.servers.value is None  # the stored entry leaves servers to the default
    interns = effective_quota("bob", ["interns"], merged)
    assert interns.gpus.value == 0 and interns.servers.value == 1
    assert merge_group_quotas(QuotaConfig(), []) == QuotaConfig()
