"""Every pod GPUKubeSpawner can build, validated against the Kubernetes OpenAPI schemas."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_asyncio.client import ApiClient
from tornado import web

from gpuhub import paths
from gpuhub.core.catalog import load_catalog
from gpuhub.core.options import Selection
from gpuhub.spawner.kube_objects import PodBase, label_value, pod_settings

KUBE_VERSIONS = ["1.30.0", "1.33.0"]
KUBE_CATALOG = paths.config_dir() / "catalog-kubernetes.yaml"
CATALOG = load_catalog(KUBE_CATALOG)
GPU_RESOURCES = {g.resource for g in CATALOG.gpu_types}

SELECTIONS = [
    *(
        Selection(i.id, e.id, 1, g.id)
        for i, e, g in itertools.product(
            CATALOG.interfaces, CATALOG.environments, CATALOG.gpu_types
        )
    ),
    *(
        Selection(i.id, e.id, 0, None)
        for i, e in itertools.product(CATALOG.interfaces, CATALOG.environments)
    ),
    Selection("jupyterlab", "pytorch", 4, "a100"),
]


#: Kubernetes' own rule for label values (the OpenAPI schemas do not check it).
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


#: Only its serializer is used; built without `__init__`, it opens no HTTP session.
_SERIALIZER = ApiClient.__new__(ApiClient)


def plain(obj: Any) -> dict[str, Any]:
    """A kubernetes_asyncio model as the JSON the API server receives."""
    return _SERIALIZER.sanitize_for_serialization(obj)


def test_kubernetes_versions_are_available() -> None:
    """The schema versions the manifests are checked against ship with kubernetes-validate."""
    versions = kubernetes_validate.utils.all_versions()
    for version in KUBE_VERSIONS:
        assert version in versions


def test_strict_validation_refuses_unknown_fields() -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "c", "image": "i", "gpu": 1}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, "1.33.0", strict=True)


@pytest.mark.parametrize(
    "selection", SELECTIONS, ids=lambda s: f"{s.interface}-{s.environment}-{s.gpus}x{s.gpu_type}"
)
async def test_pod_manifest_is_valid(make_spawner, selection: Selection) -> None:  # type: ignore[no-untyped-def]
    spawner = make_spawner(user="ada", server="exp1")
    await spawner.apply_gpuhub_options(selection.as_user_options())
    pod = plain(await spawner.get_pod_manifest())
    pvc = plain(spawner.get_pvc_manifest())
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
        kubernetes_validate.validate(pvc, version, strict=True)

    environment = CATALOG.environment(selection.environment)
    interface = CATALOG.interface(selection.interface)
    assert environment is not None and interface is not None
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["image"] == environment.image
    limits = container.get("resources", {}).get("limits", {})
    gpu_limits = {k: v for k, v in limits.items() if k in GPU_RESOURCES}
    tolerated = {t.get("key") for t in spec.get("tolerations", [])}
    env = {e["name"]: e.get("value") for e in container["env"]}
    labels = pod["metadata"]["labels"]
    if selection.gpus:
        gpu_type = CATALOG.gpu_type(selection.gpu_type or "")
        assert gpu_type is not None
        assert gpu_limits == {gpu_type.resource: str(selection.gpus)}
        for key, value in gpu_type.node_selector.items():
            assert spec["nodeSelector"][key] == value
        assert "nvidia.com/gpu" in tolerated
        assert "NVIDIA_VISIBLE_DEVICES" not in env
        assert labels["gpuhub.io/gpu-type"] == gpu_type.id
    else:
        assert gpu_limits == {}
        assert "nvidia.com/gpu" not in tolerated
        assert not any(k.startswith("nvidia.com/") for k in spec.get("nodeSelector", {}))
        assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
        assert labels["gpuhub.io/gpu-type"] == "none"
    assert labels["gpuhub.io/gpus"] == str(selection.gpus)
    assert labels["gpuhub.io/interface"] == selection.interface
    assert labels["gpuhub.io/environment"] == selection.environment
    assert labels["gpuhub.io/user"] == "ada"
    assert labels["gpuhub.io/server"] == "exp1"
    assert pod["metadata"]["annotations"]["gpuhub.io/user"] == "ada"
    assert env["JUPYTERHUB_DEFAULT_URL"] == interface.default_url
    assert env["GPUHUB_INTERFACE"] == selection.interface

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    home = volumes[mounts["/home/jovyan"]]
    assert (
        home["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"] == "claim-ada--exp1"
    )
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert spawner.storage_pvc_ensure and not spawner.delete_pvc


async def test_gpu_selection_then_cpu_selection_leaves_no_gpu_behind(make_spawner) -> None:  # type: ignore[no-untyped-def]
    """The same spawner restarted without GPUs (after the GPU was released) gets a clean pod."""
    spawner = make_spawner(extra_resource_limits={"nvidia.com/gpu": "2", "example.com/fpga": "1"})
    await spawner.apply_gpuhub_options({"environment": "pytorch", "gpus": 2, "gpu_type": "a100"})
    limits = plain(await spawner.get_pod_manifest())["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2" and limits["example.com/fpga"] == "1"
    spawner.free_leases()
    await spawner.apply_gpuhub_options({"environment": "pytorch", "gpus": 0})
    pod = plain(await spawner.get_pod_manifest())
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"example.com/fpga": "1"}
    assert "tolerations" not in pod["spec"] or not pod["spec"]["tolerations"]
    assert not any(k.startswith("nvidia.com/") for k in pod["spec"].get("nodeSelector") or {})
    assert [v["name"] for v in pod["spec"]["volumes"]].count("gpuhub-shm") == 1


async def test_admin_pod_configuration_is_kept(make_spawner) -> None:  # type: ignore[no-untyped-def]
    spawner = make_spawner(
        node_selector={"pool": "users"},
        tolerations=[
            {"key": "pool", "operator": "Equal", "value": "users", "effect": "NoSchedule"}
        ],
        volumes={"data": {"name": "data", "nfs": {"server": "nfs.example.org", "path": "/data"}}},
        volume_mounts={"data": {"name": "data", "mountPath": "/data", "readOnly": True}},
        environment={"TZ": "Europe/Paris"},
        extra_labels={"team": "ml"},
    )
    await spawner.apply_gpuhub_options(
        {"environment": "tensorflow", "gpus": 1, "gpu_type": "t4-shared"}
    )
    pod = plain(await spawner.get_pod_manifest())
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"pool": "users", "nvidia.com/gpu.product": "Tesla-T4-SHARED"}
    assert {t["key"] for t in spec["tolerations"]} == {"pool", "nvidia.com/gpu"}
    assert {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]} == {
        "/data",
        "/home/jovyan",
        "/dev/shm",
    }
    assert pod["metadata"]["labels"]["team"] == "ml"
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["TZ"] == "Europe/Paris"


async def test_home_volume_of_the_chart_is_not_mounted_twice(make_spawner) -> None:  # type: ignore[no-untyped-def]
    """Zero to JupyterHub's `singleuser.storage.type: dynamic` already mounts a home volume."""
    spawner = make_spawner(
        volumes={
            "volume-{user_server}": {
                "persistentVolumeClaim": {"claimName": "{pvc_name}"},
                "name": "volume-{user_server}",
            }
        },
        volume_mounts={
            "volume-{user_server}": {"mountPath": "/home/jovyan", "name": "volume-{user_server}"}
        },
    )
    await spawner.apply_gpuhub_options({"gpus": 0})
    pod = plain(await spawner.get_pod_manifest())
    kubernetes_validate.validate(pod, "1.33.0", strict=True)
    mounts = [m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]]
    assert mounts.count("/home/jovyan") == 1


@pytest.mark.parametrize(
    "options, field",
    [
        ({"gpus": 1, "gpu_type": "h100"}, "gpu_type"),
        ({"gpus": 9, "gpu_type": "a100"}, "gpus"),
        ({"environment": "../../etc"}, "environment"),
        ({"image": "evil/miner:latest"}, "image"),
        ({"interface": "rstudio"}, "interface"),
        ({"gpus": "1; rm -rf /"}, "gpus"),
    ],
)
async def test_forged_options_never_change_the_pod(make_spawner, options, field) -> None:  # type: ignore[no-untyped-def]
    spawner = make_spawner()
    before = plain(await spawner.get_pod_manifest())
    with pytest.raises(web.HTTPError) as info:
        await spawner.apply_gpuhub_options(options)
    assert info.value.status_code == 400
    assert field in info.value.log_message % info.value.args
    assert plain(await spawner.get_pod_manifest()) == before
    assert spawner.store.leases() == []


def test_user_names_become_valid_label_values() -> None:
    for name in ["ada", "ada@example.org", "Ünïcode user", "x" * 200, "-odd-", "a{b}c"]:
        value = label_value(name)
        assert LABEL_VALUE.fullmatch(value), value
        assert len(value) <= 63
    assert label_value("ada@example.org") != label_value("ada-example.org")


def test_pod_settings_refuse_a_selection_of_another_catalog() -> None:
    with pytest.raises(ValueError):
        pod_settings(Selection("jupyterlab", "nope", 0, None), CATALOG, PodBase(image="x"), "ada")


async def test_normalised_options_are_saved_where_the_hub_keeps_them(make_spawner) -> None:  # type: ignore[no-untyped-def]
    """The hub rebuilds a spawner from `orm_spawner.user_options` after a restart: the defaults
    gpuhub filled in (here the GPU type) must be there, not only the raw request."""
    spawner = make_spawner()
    await spawner.apply_gpuhub_options({"gpus": 1})
    expected = {"interface": "jupyterlab", "environment": "pytorch", "gpus": 1}
    saved = spawner.orm_spawner.user_options
    assert {k: saved[k] for k in expected} == expected
    assert saved["gpu_type"] == spawner.load_catalog().default_gpu_type is not None
    assert spawner.user_options == saved == spawner.get_state()["selection"]


async def test_state_of_an_older_server_fixes_the_saved_options(make_spawner) -> None:  # type: ignore[no-untyped-def]
    spawner = make_spawner()
    spawner.orm_spawner.user_options = {"gpus": 1}  # as saved before the options were normalised
    selection = {"interface": "vscode", "environment": "pytorch", "gpus": 1, "gpu_type": "a100"}
    spawner.load_state({"selection": selection})
    assert spawner.user_options == spawner.orm_spawner.user_options == selection


async def test_a_cpu_only_server_names_no_gpu_type(make_spawner, caplog) -> None:  # type: ignore[no-untyped-def]
    spawner = make_spawner()
    with caplog.at_level("INFO"):
        await spawner.apply_gpuhub_options({"environment": "pytorch", "gpus": 0})
    pod = plain(await spawner.get_pod_manifest())
    annotation = json.loads(pod["metadata"]["annotations"]["gpuhub.io/selection"])
    assert annotation["gpus"] == 0 and annotation["gpu_type"] is None
    assert pod["metadata"]["labels"]["gpuhub.io/gpu-type"] == "none"
    started = [r.getMessage() for r in caplog.records if "starts" in r.getMessage()]
    assert started and started[-1].endswith("with no GPU"), started
    assert "GPU(s)" not in started[-1]


async def test_named_servers_get_their_own_home_claim(make_spawner) -> None:  # type: ignore[no-untyped-def]
    default, named = make_spawner(), make_spawner(server="train")
    assert (default.pvc_name, named.pvc_name) == ("claim-ada", "claim-ada--train")


async def test_a_shared_readwriteonce_home_refuses_a_second_server_at_once(make_spawner) -> None:  # type: ignore[no-untyped-def]
    """A site that shares one claim among a user's servers on block storage: the second server
    is refused with a message naming the running one, never left as a stuck pod."""
    running = make_spawner(pvc_name_template="claim-{username}")
    second = make_spawner(server="train", pvc_name_template="claim-{username}")
    running._spawn_pending = True  # the default server is starting (it will mount the claim)
    second.user.spawners = {"": running, "train": second}
    with pytest.raises(web.HTTPError) as error:
        await second.apply_gpuhub_options({"environment": "pytorch", "gpus": 0})
    assert error.value.status_code == 409
    message = error.value.log_message % error.value.args
    assert "one home volume (claim-ada)" in message and "default server is running" in message
    # With a ReadWriteMany class the servers may share it.
    second.storage_access_modes = ["ReadWriteMany"]
    await second.apply_gpuhub_options({"environment": "pytorch", "gpus": 0})
