"""gpuhub's settings: checked once when the hub or the service starts (a bad value stops it with the
setting, the field and the problem), parsed once rather than at each spawn, and the shared ones
(`GpuhubConfig`) read alike by the spawners, the service and the pages."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, text
from traitlets import TraitError
from traitlets.config import Config

from gpuhub import catalog_cache, paths, schema
from gpuhub.service.app import GpuhubService
from gpuhub.service.web.config import GpuhubPages
from gpuhub.settings import GpuhubConfig, check_hub_config, service_environment
from gpuhub.spawner import mixin
from gpuhub.spawner.local import LocalGPUSpawner
from gpuhub.store import Store

GOOD_CATALOG = paths.default_catalog_file()
CHECKOUT = paths.config_dir().parent


def hub_config(tmp_path: Path, **shared: object) -> Config:
    c = Config()
    c.GpuhubConfig.store_url = f"sqlite:///{tmp_path / 'gpuhub.sqlite'}"
    c.GpuhubConfig.catalog_file = str(GOOD_CATALOG)
    for name, value in shared.items():
        setattr(c.GpuhubConfig, name, value)
    return c


def refused(c: Config) -> str:
    with pytest.raises(SystemExit) as stop:
        check_hub_config(c)
    return str(stop.value)


def test_good_settings_pass_and_open_the_store(tmp_path: Path) -> None:
    c = hub_config(tmp_path)
    c.GPUSpawnerMixin.quotas = {"default": {"max_gpus": 1}, "groups": {"staff": {"max_gpus": 4}}}
    check_hub_config(c)
    assert (tmp_path / "gpuhub.sqlite").exists(), "the store was opened (and created) at start"


@pytest.mark.parametrize(
    "quotas, expected",
    [
        (
            {"groups": {"staff": {"max_gpus": -2}}},
            "quotas.groups.staff.max_gpus: must be an integer",
        ),
        ({"groupz": {}}, "quotas.groupz: unknown field"),
        ({"users": {"ada": {"max_gpu": 1}}}, "quotas.users.ada.max_gpu: unknown field"),
        (
            {"groups": {"students": {"weekly_gpu_hours": "forty"}}},
            "quotas.groups.students.weekly_gpu_hours: must be a number of hours >= 0",
        ),
    ],
)
def test_bad_quotas_stop_the_hub(tmp_path: Path, quotas: dict, expected: str) -> None:
    c = hub_config(tmp_path)
    c.GPUSpawnerMixin.quotas = quotas
    message = refused(c)
    assert "c.GPUSpawnerMixin.quotas" in message and expected in message


def test_a_bad_catalogue_file_stops_the_hub_and_the_service(tmp_path: Path) -> None:
    bad = tmp_path / "catalog.yaml"
    bad.write_text(GOOD_CATALOG.read_text().replace("display_name:", "display_nam:", 1))
    message = refused(hub_config(tmp_path, catalog_file=str(bad)))
    assert "c.GpuhubConfig.catalog_file" in message and str(bad) in message
    assert "display_nam" in message

    c = Config()
    c.GpuhubService.api_token = "t"
    c.GpuhubConfig.store_url = f"sqlite:///{tmp_path / 's.sqlite'}"
    c.GpuhubConfig.catalog_file = str(bad)
    with pytest.raises(
        SystemExit, match=r"bad setting: c.GpuhubConfig.catalog_file: .*display_nam"
    ):
        GpuhubService(config=c).setup()


def test_a_bad_catalogue_dict_stops_the_hub(tmp_path: Path) -> None:
    c = hub_config(tmp_path)
    c.GPUSpawnerMixin.catalog = {"interfaces": [], "environments": "pytorch"}
    message = refused(c)
    assert "c.GPUSpawnerMixin.catalog" in message


@pytest.mark.parametrize(
    "setting, value, expected",
    [
        ("store_url", "mysql://db/gpuhub", "'mysql' databases are not supported"),
        ("store_url", "not a url", "not a database URL"),
        ("queue_stale_after", 0.0, "must be > 0 seconds"),
    ],
)
def test_bad_shared_settings_stop_the_hub(tmp_path, setting, value, expected) -> None:  # type: ignore[no-untyped-def]
    message = refused(hub_config(tmp_path, **{setting: value}))
    assert f"c.GpuhubConfig.{setting}" in message and expected in message


def test_a_store_newer_than_the_hub_stops_it(tmp_path: Path) -> None:
    c = hub_config(tmp_path)
    url = c.GpuhubConfig.store_url
    Store(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0999'"))
    engine.dispose()
    assert "revision 0999, newer than this gpuhub" in refused(c)

    service = Config()
    service.GpuhubService.api_token = "t"
    service.GpuhubConfig.store_url = url
    with pytest.raises(SystemExit, match=r"store cannot be used: .*revision 0999, newer"):
        GpuhubService(config=service).setup()


def test_the_demo_hub_refuses_to_start_with_bad_quotas(tmp_path: Path) -> None:
    """The real thing: `jupyterhub -f config/jupyterhub_config.py` ends at once, saying why."""
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text("default:\n  max_gpus: lots\n")
    env = {
        **os.environ,
        "GPUHUB_STATE_DIR": str(tmp_path / "state"),
        "GPUHUB_QUOTAS": str(quotas),
        "GPUHUB_DEMO_PASSWORD": "x",
        "GPUHUB_DEMO_SERVICE": "off",
        "GPUHUB_DEMO_PORT": "29871",
    }
    jupyterhub = Path(sys.executable).with_name("jupyterhub")
    result = subprocess.run(
        [str(jupyterhub), "-f", str(paths.config_dir() / "jupyterhub_config.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert (
        "gpuhub: bad setting: c.GPUSpawnerMixin.quotas: quotas.default.max_gpus: must be an "
        "integer >= 0 or 'unlimited', not 'lots'" in result.stderr
    )


# -- one owner per setting ------------------------------------------------------------------------


def test_the_hub_the_service_and_the_pages_read_one_value(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(GOOD_CATALOG.read_text())
    c = hub_config(
        tmp_path, catalog_file=str(catalog), queue_stale_after=42.0, budget_exempt_admins=True
    )
    spawner = LocalGPUSpawner(
        config=c, user=SimpleNamespace(name="ada", groups=[]), orm_spawner=None
    )
    hub_side = (
        spawner.store_url,
        spawner.catalog_file,
        spawner.queue_stale_after,
        spawner.gpuhub_config.budget_exempt_admins,
    )
    assert hub_side == (c.GpuhubConfig.store_url, str(catalog), 42.0, True)

    # The hub hands its values to the managed service, which reads them from its environment.
    entry: dict = {"name": "gpuhub", "command": ["python3", "-m", "gpuhub.service"]}
    monkeypatch.setenv("PGPASSWORD", "s3cret")
    service_environment(c, entry)
    assert entry["environment"]["PGPASSWORD"] == "s3cret"
    for name, value in entry["environment"].items():
        monkeypatch.setenv(name, value)
    service = GpuhubService(config=Config({"GpuhubService": {"api_token": "t"}}))
    service.setup()
    pages = GpuhubPages(parent=service)
    pages_side = (
        service.store_url,
        service.catalog_file,
        pages.queue_stale_after,
        pages.shared.budget_exempt_admins,
    )
    assert pages_side == hub_side


def test_former_names_are_read_and_must_agree(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    c = Config()
    c.GPUSpawnerMixin.store_url = url
    c.GPUQueueMixin.queue_stale_after = 5.0
    with caplog.at_level(logging.WARNING, logger="gpuhub.settings"):
        shared = GpuhubConfig(config=c)
    assert (shared.store_url, shared.queue_stale_after) == (url, 5.0)
    assert "c.GPUSpawnerMixin.store_url is now c.GpuhubConfig.store_url" in caplog.text

    c.GpuhubService.store_url = "sqlite:///elsewhere.sqlite"
    both = r"c\.GPUSpawnerMixin\.store_url and c\.GpuhubService\.store_url"
    with pytest.raises(TraitError, match=both):
        GpuhubConfig(config=c)


# -- parsed once ----------------------------------------------------------------------------------


def test_quotas_and_catalogue_are_not_parsed_per_spawn(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = {"quotas": 0, "catalog": 0}
    parse_quotas, load = mixin.quota_config_from_dict, catalog_cache.load_catalog

    def counted_quotas(data):  # type: ignore[no-untyped-def]
        calls["quotas"] += 1
        return parse_quotas(data)

    def counted_load(path):  # type: ignore[no-untyped-def]
        calls["catalog"] += 1
        return load(path)

    monkeypatch.setattr(mixin, "quota_config_from_dict", counted_quotas)
    monkeypatch.setattr(catalog_cache, "load_catalog", counted_load)
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(GOOD_CATALOG.read_text())
    c = hub_config(tmp_path, catalog_file=str(catalog))
    c.GPUSpawnerMixin.quotas = {"default": {"max_gpus": 3, "max_servers": 7}}
    check_hub_config(c)
    for name in ("ada", "bo", "cy"):
        spawner = LocalGPUSpawner(
            config=c, user=SimpleNamespace(name=name, groups=[]), orm_spawner=None
        )
        for _ in range(3):  # what each spawn and each form reads
            assert spawner.quota_config().default.max_gpus == 3
            assert spawner.load_catalog().environments
    assert calls == {"quotas": 1, "catalog": 1}


def test_a_broken_catalogue_edit_keeps_the_last_good_one(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(GOOD_CATALOG.read_text())
    good = catalog_cache.cached_catalog(str(catalog))
    catalog.write_text("environments: [")
    os.utime(catalog, ns=(1, 10**18))  # a new modification time, whatever the clock's resolution
    with caplog.at_level(logging.ERROR, logger="gpuhub.catalog_cache"):
        assert catalog_cache.cached_catalog(str(catalog)) is good
    assert "the last good one is" in caplog.text and "not valid YAML" in caplog.text
    with pytest.raises(Exception, match="cannot be read"):
        catalog_cache.cached_catalog(str(tmp_path / "never-there.yaml"))
