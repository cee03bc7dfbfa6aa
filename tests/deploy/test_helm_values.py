"""The Zero to JupyterHub values in helm-values/: valid for the chart, and their loosely typed
parts (hub.extraConfig, hub.services, hub.loadRoles, the catalogue file) checked on their own.

The chart's default values and schema are data in ../shared/z2jh (next to the checkout): each
values file is deep-merged over the defaults the way `helm install` does and validated with
jsonschema, alone and as the base file with each cluster example on top.
"""

from __future__ import annotations

import copy
from typing import Any
from unittest import mock

import jsonschema
import pytest
import yaml
from jupyterhub.scopes import scope_definitions
from traitlets.config import Config

from gpuhub import paths
from gpuhub.core.catalog import catalog_from_dict
from gpuhub.service.scopes import scopes as service_scopes

CHECKOUT = paths.config_dir().parent
VALUES_DIR = CHECKOUT / "helm-values"
Z2JH = CHECKOUT.parent / "shared" / "z2jh"
BASE = "gpuhub.yaml"
#: The JupyterHub the chart in ../shared/z2jh deploys (its appVersion).
CHART_JUPYTERHUB_VERSION = "5.5.0"
VALUES = sorted(p.name for p in VALUES_DIR.glob("*.yaml"))
OVERLAYS = [name for name in VALUES if name != BASE]


def deep_merge(base: Any, override: Any) -> Any:
    """Helm's merge: mappings key by key, lists and scalars replace."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((VALUES_DIR / name).read_text())


@pytest.fixture(scope="module")
def chart() -> tuple[dict[str, Any], dict[str, Any]]:
    assert (Z2JH / "values.yaml").is_file(), f"the chart's values are expected in {Z2JH}"
    defaults = yaml.safe_load((Z2JH / "values.yaml").read_text())
    schema = yaml.safe_load((Z2JH / "values.schema.yaml").read_text())
    return defaults, schema


def merged(chart: tuple[dict[str, Any], dict[str, Any]], *names: str) -> dict[str, Any]:
    values = chart[0]
    for name in names:
        values = deep_merge(values, load(name))
    return values


#: Every file alone (the chart must accept each), and the base with each cluster example on top.
COMBINATIONS = [(name,) for name in VALUES] + [(BASE, overlay) for overlay in OVERLAYS]
#: What gets deployed: the base, alone or with a cluster example.
DEPLOYED = [(BASE,)] + [(BASE, overlay) for overlay in OVERLAYS]


def test_there_are_values_for_a_time_sliced_and_a_mig_cluster() -> None:
    assert {BASE, "time-sliced.yaml", "mig.yaml"} <= set(VALUES)


def test_merge_is_helms() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [3]}, "e": 2}) == {"a": {"b": 1, "c": [3]}, "d": 1, "e": 2}


@pytest.mark.parametrize("names", COMBINATIONS, ids="+".join)
def test_values_are_valid_for_the_chart(chart, names) -> None:  # type: ignore[no-untyped-def]
    values = merged(chart, *names)
    validator = jsonschema.Draft7Validator(chart[1])
    errors = sorted(validator.iter_errors(values), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


def test_the_schema_catches_mistakes(chart) -> None:  # type: ignore[no-untyped-def]
    """The check above can fail: a typo in a strictly typed part is refused."""
    values = deep_merge(merged(chart, BASE), {"hub": {"imagee": {"name": "x"}}})
    assert list(jsonschema.Draft7Validator(chart[1]).iter_errors(values))


def run_extra_config(values: dict[str, Any], checked: list[Config] | None = None) -> Config:
    """hub.extraConfig as the chart runs it: every snippet, sorted by key, with `c`, after the
    chart's own configuration has listed `hub.services`. gpuhub's start check
    (`check_hub_config`, which opens the store and reads the catalogue file of the hub pod) is
    recorded in `checked` instead of run."""
    c = Config()
    c.JupyterHub.services = [
        {"name": name, **copy.deepcopy(service)}
        for name, service in values["hub"].get("services", {}).items()
    ]
    calls = checked if checked is not None else []
    with mock.patch("gpuhub.settings.check_hub_config", calls.append):
        for key in sorted(values["hub"]["extraConfig"]):
            code = compile(values["hub"]["extraConfig"][key], f"hub.extraConfig.{key}", "exec")
            exec(code, {"c": c, "get_config": lambda: c})
    return c


@pytest.mark.parametrize("names", DEPLOYED, ids="+".join)
def test_extra_config_selects_gpuhub_and_its_catalogue(chart, names) -> None:  # type: ignore[no-untyped-def]
    values = merged(chart, *names)
    checked: list[Config] = []
    c = run_extra_config(values, checked)
    assert c.JupyterHub.spawner_class == "gpuhub.spawner.kube.GPUKubeSpawner"
    assert checked == [c], "gpuhub's settings are checked at the hub's start, once, last"
    assert c.GpuhubConfig.store_url == "sqlite:////srv/jupyterhub/gpuhub.sqlite"
    files = {f["mountPath"]: f for f in values["hub"]["extraFiles"].values()}
    catalog_file = c.GpuhubConfig.catalog_file
    assert catalog_file in files, "the catalogue the spawner reads is mounted"
    catalog = catalog_from_dict(files[catalog_file]["data"], source=catalog_file)
    assert catalog.gpu_types, "a GPU cluster's catalogue names its GPU types"
    for env in catalog.environments:
        image = env.image or ""
        assert image and (CHECKOUT / "images" / image.split("/")[-1].split(":")[0]).is_dir()
    assert values["cull"]["enabled"] is False
    assert values["hub"]["image"]["name"] == "quay.io/gpuhub/hub"


@pytest.mark.parametrize("names", DEPLOYED, ids="+".join)
def test_services_and_roles(chart, names) -> None:  # type: ignore[no-untyped-def]
    values = merged(chart, *names)
    c = run_extra_config(values)
    custom = dict(c.JupyterHub.custom_scopes)
    assert "custom:gpuhub:admin" in custom
    services = values["hub"]["services"]
    gpuhub = services["gpuhub"]
    assert gpuhub["url"].startswith("http://hub:")
    port = int(gpuhub["url"].rsplit(":", 1)[1])
    assert any(p["port"] == port for p in values["hub"]["service"]["extraPorts"])
    assert all(isinstance(part, str) for part in gpuhub["command"])
    assert gpuhub["command"][:3] == ["python3", "-m", "gpuhub.service"]

    roles = values["hub"]["loadRoles"]
    for name, role in roles.items():
        assert set(role) <= {"description", "scopes", "users", "groups", "services"}, name
        for service in role.get("services", []):
            assert service in services, f"role {name} names unknown service {service}"
        for scope in role["scopes"]:
            base = scope.split("!", 1)[0]
            assert base in scope_definitions or base in custom, f"{name}: unknown scope {scope}"
    service_roles = [r for r in roles.values() if "gpuhub" in r.get("services", [])]
    assert len(service_roles) == 1
    granted = set(service_roles[0]["scopes"])
    # Exactly what the service asks for with the chart's JupyterHub (5.x), nothing more.
    assert granted == set(service_scopes(CHART_JUPYTERHUB_VERSION))


@pytest.mark.parametrize(
    "overlay, resources",
    [
        ("time-sliced.yaml", {"nvidia.com/gpu.shared", "nvidia.com/gpu"}),
        ("mig.yaml", {"nvidia.com/mig-1g.10gb", "nvidia.com/mig-3g.40gb"}),
    ],
)
def test_cluster_examples_offer_their_gpus(chart, overlay, resources) -> None:  # type: ignore[no-untyped-def]
    values = merged(chart, BASE, overlay)
    c = run_extra_config(values)
    files = {f["mountPath"]: f for f in values["hub"]["extraFiles"].values()}
    catalog = catalog_from_dict(files[c.GpuhubConfig.catalog_file]["data"])
    assert {g.resource for g in catalog.gpu_types} == resources


def rbac(name: str) -> list[dict[str, Any]]:
    import kubernetes_validate

    docs = list(yaml.safe_load_all((CHECKOUT / "kubernetes" / name).read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33.0", strict=True)
    return docs


def test_capacity_rbac_manifest_is_valid_and_minimal() -> None:
    """Least privilege by default: the ClusterRole reads nodes only (pods are read in the hub's
    namespace with the chart's Role); reading every pod is a separate, opt-in manifest."""
    (rule,) = rbac("hub-gpu-capacity-rbac.yaml")[0]["rules"]
    assert rule["resources"] == ["nodes"]
    assert set(rule["verbs"]) == {"get", "list", "watch"}, "read only"
    (rule,) = rbac("hub-gpu-capacity-all-pods-rbac.yaml")[0]["rules"]
    assert rule["resources"] == ["pods"]
    assert set(rule["verbs"]) == {"get", "list", "watch"}, "read only"


def test_the_spawner_reads_other_namespaces_only_on_opt_in() -> None:
    from gpuhub.spawner.kube import GPUKubeSpawner

    assert GPUKubeSpawner.class_traits()["gpu_capacity_all_namespaces"].default_value is False


@pytest.mark.parametrize("image", ["pytorch", "tensorflow"])
def test_single_user_images(image: str) -> None:
    text = (CHECKOUT / "images" / image / "Dockerfile").read_text()
    assert "FROM ${CUDA_IMAGE}" in text and "ARG CUDA_IMAGE=nvidia/cuda:" in text
    assert '"/tmp/gpuhub[server]"' in text
    assert "code-server" in text and "jupyter_vscode_proxy" in text
    assert 'CMD ["jupyterhub-singleuser"]' in text
    assert "USER ${NB_UID}" in text, "servers do not run as root"


def test_hub_image() -> None:
    text = (CHECKOUT / "images" / "hub" / "Dockerfile").read_text()
    assert "quay.io/jupyterhub/k8s-hub:4." in text
    assert "import gpuhub.spawner.kube" in text


def test_the_store_on_the_hubs_postgresql(chart, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy.engine import make_url

    values = merged(chart, BASE, "postgresql.yaml")
    hub_db = make_url(values["hub"]["db"]["url"])
    assert values["hub"]["db"]["type"] == "postgres"
    store = make_url(values["hub"]["extraEnv"]["GPUHUB_STORE_URL"])
    assert store.drivername == "postgresql+psycopg"
    assert (store.host, store.port, store.username) == (hub_db.host, hub_db.port, hub_db.username)
    assert store.database != hub_db.database, "a database of its own on the same server"
    assert store.password is None, "the password comes from PGPASSWORD, not the values"
    monkeypatch.setenv("GPUHUB_STORE_URL", str(values["hub"]["extraEnv"]["GPUHUB_STORE_URL"]))
    c = run_extra_config(values)
    assert c.GpuhubConfig.store_url == values["hub"]["extraEnv"]["GPUHUB_STORE_URL"]
    (service,) = [s for s in c.JupyterHub.services if s["name"] == "gpuhub"]
    assert not any("store" in arg or "catalog" in arg for arg in service["command"]), (
        "the service takes the store and the catalogue from the hub (check_hub_config)"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_user_scheduler_packs_every_gpu_resource(chart, overlay) -> None:  # type: ignore[no-untyped-def]
    """MostAllocated with every GPU resource the catalogue uses weighed (kube-scheduler takes
    weights 1-100), and NodeResourcesFit still enabled for scoring in the chart's plugins."""
    values = merged(chart, BASE, overlay)
    scheduler = values["scheduling"]["userScheduler"]
    assert scheduler["enabled"]
    [fit] = [p for p in scheduler["pluginConfig"] if p["name"] == "NodeResourcesFit"]
    strategy = fit["args"]["scoringStrategy"]
    assert strategy["type"] == "MostAllocated"
    weights = {r["name"]: r["weight"] for r in strategy["resources"]}
    assert all(1 <= w <= 100 for w in weights.values())
    c = run_extra_config(values)
    files = {f["mountPath"]: f for f in values["hub"]["extraFiles"].values()}
    catalog = catalog_from_dict(files[c.GpuhubConfig.catalog_file]["data"])
    for gpu_type in catalog.gpu_types:
        assert weights.get(gpu_type.resource, 0) > weights["cpu"], gpu_type.resource
    enabled = {p["name"] for p in scheduler["plugins"]["score"]["enabled"]}
    assert "NodeResourcesFit" in enabled


def test_named_servers_get_a_home_claim_each() -> None:
    storage = load(BASE)["singleuser"]["storage"]
    assert "{user_server}" in storage["dynamic"]["pvcNameTemplate"]
