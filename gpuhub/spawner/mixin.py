"""`GPUSpawnerMixin`: everything a gpuhub spawner does that does not depend on the backend.

The spawn form, parsing `user_options` into a `Selection` (through JupyterHub's
`apply_user_options` hook, so errors reach the caller as HTTP 400), quotas, the spawner state,
and freeing GPU leases when the server stops. A backend implements `gpu_capacity` and
`apply_selection` (and frees its leases in `free_leases`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import jinja2
from sqlalchemy.orm import object_session
from sqlalchemy.orm.exc import UnmappedInstanceError
from tornado import web
from traitlets import Dict, Instance, List, TraitError, Unicode, default, validate
from traitlets.config import Configurable

from .. import paths
from ..catalog_cache import cached_catalog
from ..core.accounting import RENEWAL, hours_text, week_start
from ..core.catalog import Catalog, CatalogError, catalog_from_dict
from ..core.options import OptionsError, Selection, form_choices, options_from_form, parse
from ..core.overrides import GroupQuota, merge_environments, merge_group_quotas
from ..core.quotas import (
    Budget,
    BudgetExceeded,
    Limit,
    QuotaConfig,
    QuotaExceeded,
    Usage,
    accounting_group,
    admit,
    budget_owner,
    check_budget,
    effective_quota,
    gpu_quota_exceeded,
    quota_config_from_dict,
    user_budget,
)
from ..settings import SharesGpuhubConfig
from ..store import GpuLease, GpuQuotaReached, Store, utcnow

_reconciled_stores: set[str] = set()
#: the `quotas` and `catalog` settings, parsed once per value (not at each spawn)
_parsed_quotas: dict[str, QuotaConfig] = {}
_parsed_catalogs: dict[str, Catalog] = {}


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def parsed_quotas(
    quotas: Mapping[str, Any], setting: str = "c.GPUSpawnerMixin.quotas"
) -> QuotaConfig:
    """`quotas` as a `QuotaConfig`, parsed at its first use; `TraitError` naming the setting and
    the field when it is wrong."""
    key = _key(quotas)
    if key not in _parsed_quotas:
        try:
            _parsed_quotas[key] = quota_config_from_dict(quotas)
        except ValueError as e:
            raise TraitError(f"{setting}: {e}") from e
    return _parsed_quotas[key]


def parsed_catalog(
    catalog: Mapping[str, Any], setting: str = "c.GPUSpawnerMixin.catalog"
) -> Catalog:
    key = _key(catalog)
    if key not in _parsed_catalogs:
        try:
            _parsed_catalogs[key] = catalog_from_dict(catalog, source=setting)
        except CatalogError as e:
            raise TraitError(str(e)) from e
    return _parsed_catalogs[key]


def catalog_in_force(
    store: Store, catalog: Mapping[str, Any], catalog_file: str, log: Any = None
) -> Catalog:
    """The configured catalogue (`catalog` when set, else the file) with the environments admins
    registered or changed at runtime laid over it; `log` hears of stored ones left out."""
    base = parsed_catalog(catalog) if catalog else cached_catalog(catalog_file)
    merged = merge_environments(base, [e.data for e in store.catalog_entries()])
    if log is not None:
        for env_id, problem in merged.problems:
            log.warning("gpuhub: stored environment %s is left out: %s", env_id, problem)
    return merged.catalog


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


class GPUSpawnerMixin(SharesGpuhubConfig, Configurable):
    """GPU selection, quotas and leases for a JupyterHub spawner (put it before the spawner)."""

    catalog = Dict(
        config=True,
        help="""The environment catalogue as a dict, in the same shape as the YAML file.

        When set, it replaces `c.GpuhubConfig.catalog_file` for the spawners (the service and the
        pages still read the file). Checked when set: a bad one stops the hub, naming the field.
        """,
    )

    @validate("catalog")
    def _check_catalog(self, proposal: Any) -> dict[str, Any]:
        if proposal["value"]:
            parsed_catalog(proposal["value"])
        return proposal["value"]

    quotas = Dict(
        config=True,
        help="""Limits on what a user holds at once, by group and by user.

        `{"default": {"max_gpus": 1, "max_servers": 2},
          "groups": {"staff": {"max_gpus": 4}},
          "users": {"ada": {"max_gpus": "unlimited"}}}`.
        A user in several groups gets the most generous limit; a per-user entry wins.
        Missing limits are unlimited. Each entry may also set `weekly_gpu_hours`, the GPU-hours
        a user may hold per week (Monday 00:00 UTC to Monday): once used up, spawns with GPUs
        are refused with HTTP 403 until the week ends (docs/configuration.md). Checked when
        set: a bad value stops the hub, naming the field.
        """,
    )

    service_url = Unicode(
        "",
        config=True,
        help="""The gpuhub service's URL prefix as servers reach it (e.g.
        http://127.0.0.1:8000/services/gpuhub/ through the proxy, or
        http://proxy-public/services/gpuhub/ on Kubernetes), given to every server as
        $GPUHUB_SERVICE_URL. Servers report their status there with their own token and pick up
        the service's commands (docs/security.md). Empty: servers do not report, and keep their
        GPUs only up to the maximum GPU lease.""",
    )

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        if self.service_url:
            env["GPUHUB_SERVICE_URL"] = self.service_url
        return env

    @validate("quotas")
    def _check_quotas(self, proposal: Any) -> dict[str, Any]:
        parsed_quotas(proposal["value"])
        return proposal["value"]

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

    # -- shared settings (gpuhub.settings), catalogue, groups, store ----------------------------

    def check_settings(self) -> None:
        """Check the settings now (the hub's start, `gpuhub.settings.check_hub_config`)."""
        self.gpuhub_config.check()
        parsed_quotas(self.quotas)
        if self.catalog:
            parsed_catalog(self.catalog)

    def load_catalog(self) -> Catalog:
        """The catalogue in force now: the file's (re-read when it changes) or `catalog`, with
        the environments admins registered or changed at runtime (in the store) laid over it."""
        return catalog_in_force(self.store, self.catalog, self.catalog_file, self.log)

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
            self.leases_freed(freed)

    def leases_freed(self, leases: list[GpuLease]) -> None:
        """Leases that ended without their server's stop (a backend takes back what it gave)."""

    def quota_config(self) -> QuotaConfig:
        """The configured quotas, with the group quotas admins set at runtime (in the store)."""
        stored = [GroupQuota(q.group, q.max_gpus, q.max_servers) for q in self.store.group_quotas()]
        return merge_group_quotas(parsed_quotas(self.quotas), stored)

    # -- GPU-hours and weekly budgets (gpuhub.core.accounting) ----------------------------------

    def accounting_group(self) -> str:
        """The group this user's GPU-hours count for (the quotas' rule; "" for none)."""
        return accounting_group(self.user.name, self.user_groups(), self.quota_config())

    def gpu_budget(self) -> Budget:
        """The user's weekly GPU-hour budget (hours None: none applies)."""
        return user_budget(
            self.user.name,
            self.user_groups(),
            self.quota_config(),
            admin=bool(getattr(self.user, "admin", False)),
            exempt_admins=self.gpuhub_config.budget_exempt_admins,
        )

    def budget_status(self) -> tuple[Budget, float]:
        """The budget and the GPU-seconds the user held this week, up to now."""
        budget = self.gpu_budget()
        if budget.seconds is None:
            return budget, 0.0
        now = utcnow()
        return budget, self.store.gpu_seconds_held(self.user.name, week_start(now), now)

    def check_gpu_budget(self, selection: Selection) -> None:
        """HTTP 403 for a spawn with GPUs once the week's budget is used up."""
        if not selection.gpus:
            return
        budget, used = self.budget_status()
        try:
            check_budget(selection, used, budget)
        except BudgetExceeded as e:
            raise http_error(403, str(e)) from e

    def budget_view(self) -> dict[str, Any] | None:
        """What the spawn page says of the budget (None: no budget applies)."""
        budget, used = self.budget_status()
        if budget.seconds is None:
            return None
        remaining = budget.remaining(used) or 0.0
        return {
            "used": hours_text(used),
            "limit": hours_text(budget.seconds),
            "remaining": hours_text(remaining),
            "source": budget_owner(budget.source),
            "exhausted": remaining <= 0,
            "renews": RENEWAL,
        }

    # -- what a backend provides ------------------------------------------------------------------

    def gpu_capacity(self, catalog: Catalog) -> dict[str, tuple[int, int]]:
        """`(total, free)` GPUs of each type in the pool right now."""
        raise NotImplementedError

    def admissible_totals(
        self, catalog: Catalog, capacity: Mapping[str, tuple[int, int]]
    ) -> dict[str, int]:
        """The most GPUs of each type a spawn may ask for (more is refused, fewer may wait):
        the pool's total. A backend whose capacity comes and goes says more."""
        return {k: total for k, (total, _free) in capacity.items()}

    def capacity_note(self, catalog: Catalog, gpu_type: str) -> str:
        """Why some GPUs of `gpu_type` cannot be had now, for the queue's message ("")."""
        return ""

    async def apply_selection(self, selection: Selection, catalog: Catalog) -> None:
        """Make the server start with `selection` (take GPUs, set image or process env)."""
        raise NotImplementedError

    def free_leases(self) -> None:
        """Free the leases of the GPUs this server holds (called when it stops)."""
        freed = self.store.free_leases(self.user.name, self.name)
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
            budget=self.budget_view(),
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
                user_options, catalog, groups, self.admissible_totals(catalog, capacity)
            )
        except OptionsError as e:
            raise http_error(400, f"Invalid option {e.field!r}: {e.message}") from e
        quota = effective_quota(self.user.name, groups, self.quota_config())
        try:
            admit(selection, self.current_usage(), quota)
        except QuotaExceeded as e:
            raise http_error(403, str(e)) from e
        self.check_gpu_budget(selection)
        self.free_leases()  # leftovers of a failed earlier start of this server
        self.selection = selection
        self.user_options = selection.as_user_options()
        self.persist_user_options()
        self.default_url = catalog.interface(selection.interface).default_url  # type: ignore[union-attr]
        try:
            await self.apply_selection(selection, catalog)
            # what starts: without the GPUs when they wait for the server's turn (start-on-cpu)
            selection = self.selection or selection
        except GpuQuotaReached as e:
            self.log.warning("gpuhub: %s refused when taking its GPUs: %s", self._log_name, e)
            limit = effective_quota(self.user.name, self.user_groups(), self.quota_config()).gpus
            if limit.value is None or limit.value > e.limit:  # changed again since: as counted
                limit = Limit(e.limit, limit.source)
            refusal = gpu_quota_exceeded(Usage(gpus=e.held), e.wanted, limit)
            raise http_error(403, str(refusal)) from e
        self.log.info(
            "gpuhub: %s starts %s in %s with %s",
            self._log_name,
            selection.environment,
            selection.interface,
            describe_gpus(selection),
        )
        return selection

    def persist_user_options(self) -> None:
        """Write the normalised options (defaults filled in) where JupyterHub keeps the request.

        JupyterHub stores the options as requested (`orm_spawner.user_options`) and builds the
        spawner from them after a restart; the hub's REST model shows them too. Saving the
        selection there makes the model, the spawner state and the gpuhub service agree.
        """
        orm_spawner = getattr(self, "orm_spawner", None)
        if orm_spawner is None or self.selection is None:
            return
        options = self.selection.as_user_options()
        if getattr(orm_spawner, "user_options", None) == options:
            return
        orm_spawner.user_options = options
        try:
            session = object_session(orm_spawner)
        except UnmappedInstanceError:  # not a database row (spawners built without a hub)
            session = None
        if session is not None:
            session.commit()

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
            else:
                # A server started before the options were saved normalised: fix the record.
                self.user_options = self.selection.as_user_options()
                self.persist_user_options()

    def clear_state(self) -> None:
        super().clear_state()  # type: ignore[misc]
        self.selection = None

    async def stop(self, now: bool = False) -> None:
        try:
            await super().stop(now=now)  # type: ignore[misc]
        finally:
            self.free_leases()


def describe_gpus(selection: Selection) -> str:
    """`1 a100 GPU(s)`, or `no GPU` (a CPU-only server names no GPU type)."""
    if not selection.gpus:
        return "no GPU"
    return f"{selection.gpus} {selection.gpu_type} GPU(s)"
