"""`GPUSpawnerMixin`: everything a gpuhub spawner does that does not depend on the backend.

The spawn form, parsing `user_options` into a `Selection` (through JupyterHub's
`apply_user_options` hook, so errors reach the caller as HTTP 400), quotas, the spawner state,
and freeing GPU leases when the server stops. A backend implements `gpu_capacity` and
`apply_selection` (and frees what it holds in `release_gpus`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
from tornado import web
from traitlets import Dict, Instance, List, Unicode, default
from traitlets.config import Configurable

from .. import paths
from ..catalog import Catalog, CatalogError, catalog_from_dict, load_catalog
from ..options import OptionsError, Selection, form_choices, options_from_form, parse
from ..overrides import GroupQuota, merge_environments, merge_group_quotas
from ..policy import (
    Limit,
    QuotaConfig,
    QuotaExceeded,
    Usage,
    admit,
    effective_quota,
    gpu_quota_exceeded,
    quota_config_from_dict,
)
from ..store import GpuLease, GpuQuotaReached, Store

_catalog_cache: dict[tuple[str, int], Catalog] = {}
_reconciled_stores: set[str] = set()


def cached_catalog(path: str) -> Catalog:
    """The catalogue in `path`, loaded again only when the file changes."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = -1
    key = (path, mtime)
    if key not in _catalog_cache:
        _catalog_cache.clear()
        _catalog_cache[key] = load_catalog(path)
    return _catalog_cache[key]


@functools.lru_cache(maxsize=8)
def template_environment(search_path: tuple[str, ...]) -> jinja2.Environment:
    """One Jinja environment per search path: templates are compiled once, and reloaded when
    their file changes."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(list(search_path)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        auto_reload=True,
    )


def http_error(status: int, message: str) -> web.HTTPError:
    """An HTTPError whose message reaches the REST client and the spawn page as is."""
    error = web.HTTPError(status, "%s", message)
    error.reason = {400: "Bad Request", 403: "Forbidden", 409: "Conflict"}.get(status)
    return error


class GPUSpawnerMixin(Configurable):
    """GPU selection, quotas and leases for a JupyterHub spawner (put it before the spawner)."""

    catalog_file = Unicode(
        config=True,
        help="""The environment catalogue, a YAML file (see docs/configuration.md).

        Defaults to the catalogue shipped with gpuhub. Ignored when `catalog` is set.
        """,
    )

    @default("catalog_file")
    def _default_catalog_file(self) -> str:
        return str(paths.default_catalog_file())

    catalog = Dict(
        config=True,
        help="""The environment catalogue as a dict, in the same shape as the YAML file.

        When set, it replaces `catalog_file`.
        """,
    )

    quotas = Dict(
        config=True,
        help="""Limits on what a user holds at once, by group and by user.

        `{"default": {"max_gpus": 1, "max_servers": 2},
          "groups": {"staff": {"max_gpus": 4}},
          "users": {"ada": {"max_gpus": "unlimited"}}}`.
        A user in several groups gets the most generous limit; a per-user entry wins.
        Missing limits are unlimited.
        """,
    )

    store_url = Unicode(
        "sqlite:///gpuhub.sqlite",
        config=True,
        help="""SQLAlchemy URL of gpuhub's store (GPU leases, queue, history).

        A SQLite file by default, relative to the hub's working directory. Use a server database
        (PostgreSQL, MySQL) when the hub and the gpuhub service run on different machines.
        """,
    )

    form_template = Unicode(
        "spawn_form.html",
        config=True,
        help="Jinja template of the spawn form, looked up in `form_template_paths`.",
    )

    form_template_paths = List(
        Unicode(),
        config=True,
        help="Folders searched for the spawn form template before gpuhub's own templates.",
    )

    selection = Instance(Selection, allow_none=True, help="The validated selection being run.")

    # -- catalogue, groups, store -----------------------------------------------------------------

    def load_catalog(self) -> Catalog:
        """The catalogue in force now: the file's (re-read when it changes) or `catalog`, with
        the environments admins registered or changed at runtime (in the store) laid over it."""
        if self.catalog:
            base = catalog_from_dict(self.catalog, source="c.GPUSpawnerMixin.catalog")
        else:
            base = cached_catalog(self.catalog_file)
        merged = merge_environments(base, [e.data for e in self.store.catalog_entries()])
        for env_id, problem in merged.problems:
            self.log.warning("gpuhub: stored environment %s is left out: %s", env_id, problem)
        return merged.catalog

    def user_groups(self) -> set[str]:
        return {g.name for g in getattr(self.user, "groups", [])}

    @property
    def store(self) -> Store:
        store = Store.at(self.store_url)
        if self.store_url not in _reconciled_stores:
            _reconciled_stores.add(self.store_url)
            self.reconcile_leases(store)
        return store

    def reconcile_leases(self, store: Store) -> None:
        """Free the leases of servers the hub does not know as running (once per hub process).

        Servers the hub still lists but that died while it was down are stopped by the hub at
        start-up, and `stop` frees their leases.
        """
        db = getattr(self.user, "db", None)
        if db is None:
            return
        from jupyterhub import orm

        active = {
            (s.user.name, s.name)
            for s in db.query(orm.Spawner).filter(orm.Spawner.server_id.isnot(None))
        }
        freed = store.reconcile(active)
        for lease in freed:
            self.log.warning(
                "gpuhub: freed GPU %s of %s/%s: the hub runs no such server",
                lease.device or lease.gpu_type,
                lease.user,
                lease.server,
            )
        if freed:
            self.gpus_freed(freed)

    def gpus_freed(self, leases: list[GpuLease]) -> None:
        """Leases that ended without their server's stop (a backend takes back what it gave)."""

    def quota_config(self) -> QuotaConfig:
        """The configured quotas, with the group quotas admins set at runtime (in the store)."""
        stored = [GroupQuota(q.group, q.max_gpus, q.max_servers) for q in self.store.group_quotas()]
        return merge_group_quotas(quota_config_from_dict(self.quotas), stored)

    # -- what a backend provides ------------------------------------------------------------------

    def gpu_capacity(self, catalog: Catalog) -> dict[str, tuple[int, int]]:
        """`(total, free)` GPUs of each type in the pool right now."""
        raise NotImplementedError

    async def apply_selection(self, selection: Selection, catalog: Catalog) -> None:
        """Make the server start with `selection` (take GPUs, set image or process env)."""
        raise NotImplementedError

    def release_gpus(self) -> None:
        """Free the GPUs this server holds (called when it stops)."""
        freed = self.store.release(self.user.name, self.name)
        if freed:
            self.log.info("gpuhub: freed %d GPU(s) of %s", len(freed), self._log_name)

    # -- the spawn form ---------------------------------------------------------------------------

    @default("options_form")
    def _default_options_form(self):  # type: ignore[no-untyped-def]
        return lambda spawner: spawner.render_options_form()

    def _template_env(self) -> jinja2.Environment:
        search = (*self.form_template_paths, str(paths.templates_dir()))
        return template_environment(search)

    async def render_options_form(self) -> str:
        catalog = self.load_catalog()
        groups = self.user_groups()
        capacity = self.gpu_capacity(catalog)
        previous = getattr(getattr(self, "orm_spawner", None), "user_options", None) or {}
        choices = form_choices(catalog, groups, capacity, previous)
        template = self._template_env().get_template(self.form_template)
        return template.render(
            choices=choices,
            catalog=catalog,
            simulated=self.gpus_simulated(),
            user=self.user.name,
        )

    def gpus_simulated(self) -> bool:
        return False

    def options_from_form(self, formdata: Mapping[str, list[str]]) -> dict[str, Any]:
        return options_from_form(formdata)

    # -- applying user options --------------------------------------------------------------------

    @default("apply_user_options")
    def _default_apply_user_options(self):  # type: ignore[no-untyped-def]
        return lambda spawner, user_options: spawner.apply_gpuhub_options(user_options)

    def gpu_limit(self) -> int | None:
        """The user's GPU quota now (None: unlimited), checked again when GPUs are taken."""
        quota = effective_quota(self.user.name, self.user_groups(), self.quota_config())
        return quota.gpus.value

    def current_usage(self) -> Usage:
        """What the user holds in their other servers."""
        servers = sum(
            1
            for name, sp in getattr(self.user, "spawners", {}).items()
            if name != self.name and (sp.active or sp.ready)
        )
        return Usage(
            gpus=self.store.gpus_held(self.user.name, except_server=self.name), servers=servers
        )

    async def apply_gpuhub_options(self, user_options: Any) -> Selection:
        """Validate `user_options`, check quotas, and hand the selection to the backend.

        Bad options end as HTTP 400 naming the field, quotas as 403; nothing is started.
        """
        try:
            catalog = self.load_catalog()
        except CatalogError as e:
            self.log.error("gpuhub: the catalogue cannot be used: %s", e)
            raise http_error(500, f"the environment catalogue cannot be used: {e}") from e
        groups = self.user_groups()
        capacity = self.gpu_capacity(catalog)
        try:
            selection = parse(
                user_options, catalog, groups, {k: total for k, (total, _f) in capacity.items()}
            )
        except OptionsError as e:
            raise http_error(400, f"Invalid option {e.field!r}: {e.message}") from e
        quota = effective_quota(self.user.name, groups, self.quota_config())
        try:
            admit(selection, self.current_usage(), quota)
        except QuotaExceeded as e:
            raise http_error(403, str(e)) from e
        self.release_gpus()  # leftovers of a failed earlier start of this server
        self.selection = selection
        self.user_options = selection.as_user_options()
        self.default_url = catalog.interface(selection.interface).default_url  # type: ignore[union-attr]
        try:
            await self.apply_selection(selection, catalog)
        except GpuQuotaReached as e:
            self.log.warning("gpuhub: %s refused when taking its GPUs: %s", self._log_name, e)
            limit = effective_quota(self.user.name, self.user_groups(), self.quota_config()).gpus
            if limit.value is None or limit.value > e.limit:  # changed again since: as counted
                limit = Limit(e.limit, limit.source)
            refusal = gpu_quota_exceeded(Usage(gpus=e.held), e.wanted, limit)
            raise http_error(403, str(refusal)) from e
        self.log.info(
            "gpuhub: %s starts %s in %s with %d %s GPU(s)",
            self._log_name,
            selection.environment,
            selection.interface,
            selection.gpus,
            selection.gpu_type or "-",
        )
        return selection

    # -- state ------------------------------------------------------------------------------------

    def held_devices(self) -> list[str]:
        return [
            lease.device
            for lease in self.store.leases_of(self.user.name, self.name)
            if lease.device is not None
        ]

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()  # type: ignore[misc]
        state["gpus"] = self.held_devices()
        if self.selection is not None:
            state["selection"] = self.selection.as_user_options()
        if self.gpus_simulated():
            state["gpus_simulated"] = True
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)  # type: ignore[misc]
        selection = state.get("selection")
        if isinstance(selection, dict):
            try:
                self.selection = Selection(**selection)
            except TypeError:
                self.log.warning(
                    "gpuhub: ignoring unreadable selection in %s's state", self._log_name
                )

    def clear_state(self) -> None:
        super().clear_state()  # type: ignore[misc]
        self.selection = None

    async def stop(self, now: bool = False) -> None:
        try:
            await super().stop(now=now)  # type: ignore[misc]
        finally:
            self.release_gpus()


def ensure_dir(path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
