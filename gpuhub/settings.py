"""`GpuhubConfig`: the settings the hub (its spawners), the gpuhub service and its pages share.

Each is declared once, here, and read by all three, so they cannot disagree: the store's URL, the
catalogue file and when a queue entry stops counting. In the hub they are `c.GpuhubConfig.<name>`;
the service gets the hub's values through its environment (`service_environment`, which the
demo's and the Helm example's configuration pass to the managed service), since each setting
defaults to an environment variable:

    GPUHUB_STORE_URL           store_url
    GPUHUB_CATALOG_FILE        catalog_file
    GPUHUB_QUEUE_STALE_AFTER   queue_stale_after
    GPUHUB_BUDGET_EXEMPT_ADMINS budget_exempt_admins

Every value is checked when the hub (`check_hub_config`) or the service starts: a bad one stops
the start with the setting, the field and what is wrong. The names these settings had before
(`c.GPUSpawnerMixin.store_url`, `c.GpuhubService.catalog_file`, ...) are still read, with a
warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from traitlets import Bool, Float, TraitError, Unicode, default, validate
from traitlets.config import Config, Configurable

from . import paths
from .core.catalog import CatalogError

log = logging.getLogger(__name__)

STORE_URL_ENV = "GPUHUB_STORE_URL"
CATALOG_FILE_ENV = "GPUHUB_CATALOG_FILE"
QUEUE_STALE_AFTER_ENV = "GPUHUB_QUEUE_STALE_AFTER"
BUDGET_EXEMPT_ADMINS_ENV = "GPUHUB_BUDGET_EXEMPT_ADMINS"
DEFAULT_STORE_URL = "sqlite:///gpuhub.sqlite"
DEFAULT_QUEUE_STALE_AFTER = 60.0

#: The classes that declared these settings before `GpuhubConfig` did (their config sections are
#: still read, with a warning).
LEGACY_SECTIONS = (
    "GPUSpawnerMixin",
    "GPUQueueMixin",
    "LocalGPUSpawner",
    "SharedUserLocalGPUSpawner",
    "GPUKubeSpawner",
    "GpuhubService",
    "GpuhubPages",
)
SHARED = ("store_url", "catalog_file", "queue_stale_after")


def default_store_url() -> str:
    """$GPUHUB_STORE_URL, else a SQLite file in the working directory."""
    return os.environ.get(STORE_URL_ENV, "").strip() or DEFAULT_STORE_URL


def _legacy_values(config: Config) -> dict[str, Any]:
    """The shared settings found under their former classes' names in `config`."""
    found: dict[str, tuple[str, Any]] = {}
    for section in LEGACY_SECTIONS:
        if section not in config:
            continue
        for name in SHARED:
            if name not in config[section]:
                continue
            value = config[section][name]
            where = f"c.{section}.{name}"
            if name in found and found[name][1] != value:
                raise TraitError(
                    f"{found[name][0]} and {where} disagree ({found[name][1]!r} and {value!r}): "
                    f"set c.GpuhubConfig.{name} once instead"
                )
            found[name] = (where, value)
    for name, (where, _value) in found.items():
        log.warning("gpuhub: %s is now c.GpuhubConfig.%s; reading it there", where, name)
    return {name: value for name, (_where, value) in found.items()}


class GpuhubConfig(Configurable):
    """Settings of gpuhub that the hub, the gpuhub service and the pages share."""

    store_url = Unicode(
        DEFAULT_STORE_URL,  # shown in the reference; the default below reads the environment
        config=True,
        help="""SQLAlchemy URL of gpuhub's store (GPU leases, queue, action history, settings
        admins change at runtime), shared by the hub, the service and the pages. Default:
        $GPUHUB_STORE_URL, else the SQLite file gpuhub.sqlite in the working directory. A
        PostgreSQL database (`postgresql+psycopg://user@host:5432/gpuhub`) lets the hub and
        the service run on different machines (docs/upgrades.md).""",
    )

    @default("store_url")
    def _default_store_url(self) -> str:
        return default_store_url()

    @validate("store_url")
    def _check_store_url(self, proposal: Any) -> str:
        value = str(proposal["value"]).strip()
        try:
            url = make_url(value)
        except ArgumentError as e:
            raise TraitError(f"c.GpuhubConfig.store_url: not a database URL: {value!r}") from e
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise TraitError(
                f"c.GpuhubConfig.store_url: {url.get_backend_name()!r} databases are not "
                "supported: use sqlite:///FILE or postgresql+psycopg://..."
            )
        return value

    catalog_file = Unicode(
        config=True,
        help="""The environment catalogue, a YAML file (docs/configuration.md), read by the
        spawners, the service (GPU types of the local pool) and the pages. Default:
        $GPUHUB_CATALOG_FILE, else the catalogue shipped with gpuhub. A spawner's `catalog`
        replaces it for that spawner. Checked when the hub and the service start.""",
    )

    @default("catalog_file")
    def _default_catalog_file(self) -> str:
        return os.environ.get(CATALOG_FILE_ENV, "").strip() or str(paths.default_catalog_file())

    @validate("catalog_file")
    def _check_catalog_file(self, proposal: Any) -> str:
        from .catalog_cache import cached_catalog

        path = str(proposal["value"]).strip() or str(paths.default_catalog_file())
        try:
            cached_catalog(path)
        except CatalogError as e:
            raise TraitError(f"c.GpuhubConfig.catalog_file: {e}") from e
        return path

    queue_stale_after = Float(
        DEFAULT_QUEUE_STALE_AFTER,
        config=True,
        help="""Seconds after which a queue entry whose spawn is no longer seen waiting (its hub
        restarted, its user left) stops holding up the others and stops counting as demand, for
        the spawners, the service and the pages alike. Default: $GPUHUB_QUEUE_STALE_AFTER, else
        60. The entry keeps its place for the spawners' `queue_keep_place` seconds.""",
    )

    @default("queue_stale_after")
    def _default_queue_stale_after(self) -> float:
        raw = os.environ.get(QUEUE_STALE_AFTER_ENV, "").strip()
        if not raw:
            return DEFAULT_QUEUE_STALE_AFTER
        try:
            return float(raw)
        except ValueError:
            raise TraitError(f"${QUEUE_STALE_AFTER_ENV}: not a number: {raw!r}") from None

    @validate("queue_stale_after")
    def _check_queue_stale_after(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not value > 0:
            raise TraitError(f"c.GpuhubConfig.queue_stale_after: must be > 0 seconds, not {value}")
        return value

    budget_exempt_admins = Bool(
        False,
        config=True,
        help="""Hub admins are not held to the weekly GPU-hour budgets (`weekly_gpu_hours` in
        the quotas), at admission and on the pages alike. Off by default: admins are held to
        them like everyone; a per-user entry with `weekly_gpu_hours: unlimited` exempts one
        person. Default: $GPUHUB_BUDGET_EXEMPT_ADMINS ("1"/"true"), else False.""",
    )

    @default("budget_exempt_admins")
    def _default_budget_exempt_admins(self) -> bool:
        raw = os.environ.get(BUDGET_EXEMPT_ADMINS_ENV, "").strip().lower()
        if raw in ("", "0", "false", "no"):
            return False
        if raw in ("1", "true", "yes"):
            return True
        raise TraitError(f"${BUDGET_EXEMPT_ADMINS_ENV}: not a boolean: {raw!r}")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        own = self.config.GpuhubConfig if "GpuhubConfig" in self.config else {}
        for name, value in _legacy_values(self.config).items():
            if name not in own:
                setattr(self, name, value)

    def check(self) -> None:
        """Read (and so validate) every setting now; raises `TraitError` naming the bad one."""
        # explicitly: traitlets skips the validators of a configured value equal to the trait's
        # static default (0.0, "") while it loads the configuration
        self._check_store_url({"value": self.store_url})
        self._check_catalog_file({"value": self.catalog_file})
        self._check_queue_stale_after({"value": self.queue_stale_after})

    def environment(self) -> dict[str, str]:
        """These settings as the environment variables their defaults come from: what a managed
        gpuhub service is given, so that it reads the hub's values."""
        return {
            STORE_URL_ENV: self.store_url,
            CATALOG_FILE_ENV: os.path.abspath(self.catalog_file),
            QUEUE_STALE_AFTER_ENV: repr(self.queue_stale_after),
            BUDGET_EXEMPT_ADMINS_ENV: "1" if self.budget_exempt_admins else "0",
        }


#: libpq reads these from the environment (PGPASSWORD, PGSSLMODE, ...): a service that reaches
#: the same PostgreSQL server as the hub needs them as well.


class SharesGpuhubConfig:
    """For a configurable (the spawners, the service): its `c.GpuhubConfig`, made once with it as
    parent, and the shared settings read from there, so that none is declared twice."""

    @property
    def gpuhub_config(self) -> GpuhubConfig:
        """The settings shared by the hub, the service and the pages (`c.GpuhubConfig`)."""
        shared = self.__dict__.get("_gpuhub_config")
        if shared is None:
            shared = self.__dict__["_gpuhub_config"] = GpuhubConfig(parent=self)
        return shared

    @property
    def store_url(self) -> str:
        return self.gpuhub_config.store_url

    @property
    def catalog_file(self) -> str:
        return self.gpuhub_config.catalog_file

    @property
    def queue_stale_after(self) -> float:
        return self.gpuhub_config.queue_stale_after


def _libpq_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("PG")}


def service_environment(c: Config, service: dict[str, Any]) -> None:
    """Give the managed service `service` (an entry of `c.JupyterHub.services`) the hub's shared
    settings, and the libpq variables (PGPASSWORD, ...) of the hub's environment."""
    shared = GpuhubConfig(config=c)
    shared.check()
    environment = dict(service.get("environment") or {})
    environment.update(_libpq_environment())
    environment.update(shared.environment())
    service["environment"] = environment


def service_entry(c: Config, name: str = "gpuhub") -> dict[str, Any] | None:
    """The entry of `c.JupyterHub.services` named `name`, if configured (Zero to JupyterHub's
    `hub.services` are, before `hub.extraConfig` runs)."""
    services = c.JupyterHub.services if "services" in c.JupyterHub else []
    if not isinstance(services, list):
        return None
    return next((s for s in services if isinstance(s, dict) and s.get("name") == name), None)


def check_hub_config(c: Config) -> None:
    """Check gpuhub's settings in the hub's configuration `c` now (the last lines of
    jupyterhub_config.py), and open the store (upgrading it): a bad value or an unusable store
    stops the hub with the setting, the field and what is wrong, instead of failing spawns.
    Also hands the shared settings to a managed service named `gpuhub`."""
    import sys

    from .schema import SchemaError
    from .spawner.mixin import GPUSpawnerMixin
    from .spawner.queueing import GPUQueueMixin
    from .store import Store

    try:
        shared = GpuhubConfig(config=c)
        shared.check()
        GPUSpawnerMixin(config=c).check_settings()
        GPUQueueMixin(config=c)
        Store.at(shared.store_url)
    except (TraitError, CatalogError, SchemaError) as e:
        sys.exit(f"gpuhub: bad setting: {e}")
    except Exception as e:  # the database cannot be reached, a driver is missing, ...
        sys.exit(f"gpuhub: the store at c.GpuhubConfig.store_url cannot be opened: {e}")
    service = service_entry(c)
    if service is not None and "command" in service:
        service_environment(c, service)
