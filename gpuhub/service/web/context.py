"""What the pages read and do, through the owners of each fact.

`Pages` holds the service's collaborators: the hub API client (users, servers, and the servers'
own API through the proxy), the store (leases, queue, action history, runtime environments and
quotas), the catalogue file and configured quotas, the action executor (releases, stops, giving
a GPU back, each snapshotted first) and the activity log for sparklines. Handlers call its
methods; its methods return the plain dicts of `views`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from ...core.accounting import hoarders, week_from_text, week_of
from ...core.catalog import Catalog
from ...core.decide import ReleaseGpu, StopServer
from ...core.overrides import (
    GroupQuota,
    InputError,
    check_environment,
    check_quota,
    environment_entry,
    merge_environments,
    merge_group_quotas,
)
from ...core.protocol import UserRequest
from ...core.quotas import QuotaConfig, effective_quota, user_budget
from ...core.registration import parse_csv
from ...store import ActionStatus, Store, utcnow
from ..hubapi import HubAPIError, HubClient
from . import user_gpu, views
from .activity import ActivityLog
from .config import GpuhubPages
from .snapshots import SnapshotAccess

log = logging.getLogger("gpuhub.service")


class ActionRefused(Exception):
    """An action the pages cannot take now; the message says why (HTTP 409)."""


@dataclass
class Pages:
    hub: HubClient
    store: Store
    settings: GpuhubPages
    base_catalog: Callable[[], Catalog]
    base_quotas: Callable[[], QuotaConfig]
    executor: Any = None  # gpuhub.service.actions.Executor
    keeps: Any = None  # gpuhub.service.keeps.Keeps: the keeps in force
    board: Any = None  # gpuhub.service.reports.ReportBoard: the servers' reports and commands
    #: gpuhub.service.requests.UserRequests: the users' requests (keep, give back, switch...)
    #: and the notices each server is told
    requests: Any = None
    devices: Callable[[], list[Any]] = field(default=lambda: [])
    activity: ActivityLog = field(default_factory=ActivityLog)
    host: str = field(default_factory=socket.gethostname)
    #: (user, server, hub model) -> the status document to show, or None (the service's reports)
    status: Callable[[str, str, Mapping[str, Any]], Mapping[str, Any] | None] = field(
        default=lambda user, server, model: None
    )
    prefix: str = field(
        default_factory=lambda: os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/gpuhub/")
    )
    #: the release policy in force ("flat" or "learned"), the flat GPU idle timeout (seconds),
    #: and the learned per-server limits of the latest cycle (`LearnedRelease.thresholds`)
    release_policy: Callable[[], tuple[str, float | None]] = field(default=lambda: ("flat", None))
    release_limits: Callable[[], list[dict[str, Any]]] = field(default=lambda: [])

    def __post_init__(self) -> None:
        self.snapshots = SnapshotAccess(self.board, self.settings)

    # -- catalogue and quotas -------------------------------------------------------------------

    def catalog(self) -> Catalog:
        """The catalogue in force: the file's, with the stored environments laid over it."""
        merged = merge_environments(
            self.base_catalog(), [e.data for e in self.store.catalog_entries()]
        )
        return merged.catalog

    def catalog_problems(self) -> list[tuple[str, str]]:
        merged = merge_environments(
            self.base_catalog(), [e.data for e in self.store.catalog_entries()]
        )
        return list(merged.problems)

    def quota_config(self) -> QuotaConfig:
        stored = [GroupQuota(q.group, q.max_gpus, q.max_servers) for q in self.store.group_quotas()]
        return merge_group_quotas(self.base_quotas(), stored)

    # -- statuses -------------------------------------------------------------------------------

    async def status_of(
        self, model: Mapping[str, Any], user: str = "", server: str = ""
    ) -> tuple[Mapping[str, Any] | None, str | None]:
        """A ready server's status as the service last saw it (its report, with each GPU's state
        from the trusted source), or why there is none."""
        if not model.get("ready"):
            return None, None
        document = self.status(user, server, model)
        if document is None:
            return None, (
                "the server has not reported its GPUs recently (gpuhub's extension is off, or "
                "the server does not answer)"
            )
        return document, None

    # -- the user's page ------------------------------------------------------------------------
    # -- the user's page ------------------------------------------------------------------------

    async def user_servers(self, name: str) -> dict[str, Any]:
        model = await self.hub.user(name)
        return dict((model or {}).get("servers") or {})

    async def user_overview(self, name: str, *, with_snapshots: bool = True) -> dict[str, Any]:
        model = await self.hub.user(name)
        if model is None:
            model = {"name": name, "groups": [], "servers": {}}
        now = utcnow()
        catalog = self.catalog()
        servers = model.get("servers") or {}
        leases = self.store.leases(name)
        held: dict[str, int] = {}
        for lease in leases:
            held[lease.server] = held.get(lease.server, 0) + 1
        names = sorted(set(servers) | set(held))
        statuses = await asyncio.gather(
            *(self.status_of(servers.get(n) or {}, name, n) for n in names)
        )
        entries = []
        for server_name, (status, error) in zip(names, statuses, strict=True):
            entries.append(
                views.server_entry(
                    name,
                    server_name,
                    servers.get(server_name),
                    status,
                    error,
                    held.get(server_name, 0),
                    catalog,
                    now,
                )
            )
        self._mark_gpu_again(name, entries)
        self._mark_gpu_notices(name, entries, now)
        groups = [g for g in model.get("groups") or () if isinstance(g, str)]
        quota = effective_quota(name, groups, self.quota_config())
        active = sum(1 for m in servers.values() if m.get("ready") or m.get("pending"))
        out: dict[str, Any] = {
            "user": name,
            "groups": groups,
            "servers": entries,
            "quota": views.quota_usage(quota, len(leases), active),
            "gpu_hours": self.my_gpu_hours(name, groups, admin=model.get("admin") is True),
            "queue": self.queue(user=name),
            "history": [
                views.action_entry(a, now)
                for a in self.store.actions(
                    name,
                    kinds=("release", "stop", "give-back", "keep"),
                    limit=self.settings.history_limit,
                )
            ],
        }
        if with_snapshots:
            out["snapshots"] = await self.snapshots.listing(name, servers)
        return out

    def my_gpu_hours(self, name: str, groups: list[str], admin: bool = False) -> dict[str, Any]:
        """`name`'s GPU-hours this week: held, busy, idle, unknown, and their weekly budget."""
        now = utcnow()
        start, _end = week_of(now)
        usage = self.store.week_usage(start, now, user=name)
        budget = user_budget(
            name,
            groups,
            self.quota_config(),
            admin=admin,
            exempt_admins=self.settings.shared.budget_exempt_admins,
        )
        return views.my_gpu_hours(usage, budget, start)

    def gpu_hours(self, week: str = "this") -> dict[str, Any]:
        """The hoarders view of a week ("this", "last" or a date in it): holders ranked by idle
        GPU-hours. `InputError` naming `week` for anything else."""
        now = utcnow()
        try:
            start, end = week_from_text(week, now)
        except ValueError as e:
            raise InputError("week", str(e).removeprefix("week: ")) from e
        usage = self.store.week_usage(start, now) if start <= now else []
        return views.gpu_hours_view(start, end, hoarders(usage), now)

    def _mark_gpu_again(self, user: str, entries: list[dict[str, Any]]) -> None:
        """Which servers may ask for their GPU back: those whose GPU was released last."""
        for entry in entries:
            entry["gpu_again"] = None
            if not entry["can_request_gpu"]:
                continue
            released = self.store.actions(
                user, entry["name"], kinds=("release",), statuses=(ActionStatus.DONE,), limit=1
            )
            if released and released[0].gpus:
                entry["gpu_again"] = {"gpus": released[0].gpus, "gpu_type": released[0].gpu_type}

    def _mark_gpu_notices(self, user: str, entries: list[dict[str, Any]], now: Any) -> None:
        """What each server is told about its GPU (JupyterLab's warnings, for every interface)."""
        names = {g.id: g.display_name for g in self.catalog().gpu_types}
        for entry in entries:
            notices = self.requests.answer((user, entry["name"])) if self.requests else {}
            entry["notices"] = user_gpu.gpu_notices(notices, now, names)

    async def user_request(
        self, user: str, server: str, kind: str, seconds: float | None = None
    ) -> dict[str, Any]:
        """One of `user`'s requests for their own `server` (keep, give back now, switch now,
        not now, leave the queue), carried out as JupyterLab's are; `ActionRefused` when it
        is not possible now."""
        if self.requests is None:
            raise ActionRefused("the service runs without its request handling")
        if kind not in user_gpu.PAGE_REQUESTS:
            raise ActionRefused(f"{kind!r} cannot be asked for here")
        servers = await self.user_servers(user)
        if server not in servers:
            raise ActionRefused(f"you have no {views.server_label(server)} server")
        request = UserRequest("page", kind, seconds)
        (result,) = await self.requests.handle(user, server, [request])
        if not result.ok:
            raise ActionRefused(result.message)
        return {"server": server, "kind": kind, "ok": True, "message": result.message}

    def queue(self, user: str | None = None) -> list[dict[str, Any]]:
        entries = self.store.queue()
        if not entries:
            return []
        catalog = self.catalog()
        leases = self.store.leases()
        held: dict[str, list[Any]] = {}
        for lease in leases:
            held.setdefault(lease.gpu_type, []).append(lease.leased_at)
        totals: dict[str, int] = {}
        for device_type, count in self._device_counts(catalog).items():
            totals[device_type] = count
        free = {t: max(0, n - len(held.get(t, []))) for t, n in totals.items()}
        # On Kubernetes the hub's cluster watch counts the free GPUs (other workloads included).
        for gpu_type, c in self.store.measured_capacity().items():
            if c.fresh():
                free[gpu_type] = min(c.free, free.get(gpu_type, c.free))
        return views.queue_view(
            entries,
            free,
            held,
            utcnow(),
            timedelta(seconds=self.settings.queue_stale_after),
            timedelta(seconds=self.settings.typical_gpu_hold),
            {g.id: g.display_name for g in catalog.gpu_types},
            user=user,
        )

    def _device_counts(self, catalog: Catalog) -> dict[str, int]:
        from ...core.catalog import devices_by_type

        names = {d.uuid: d.name for d in self.devices()}
        return {t: len(d) for t, d in devices_by_type(catalog.gpu_types, names).items()}

    # -- the admin's pages ----------------------------------------------------------------------

    async def ready_servers(self) -> list[tuple[str, str, dict[str, Any]]]:
        users = await self.hub.ready_users()
        out = []
        for user in users:
            for server_name, model in (user.get("servers") or {}).items():
                if isinstance(model, dict) and model.get("ready"):
                    out.append((user["name"], server_name, model))
        return sorted(out, key=lambda s: (s[0], s[1]))

    async def admin_overview(self) -> dict[str, Any]:
        now = utcnow()
        catalog = self.catalog()
        running = await self.ready_servers()
        results = await asyncio.gather(*(self.status_of(m, u, s) for u, s, m in running))
        self.activity.forget_others({(u, s) for u, s, _m in running})
        statuses = {
            (u, s): status for (u, s, _m), (status, _e) in zip(running, results, strict=True)
        }
        errors = {(u, s): e for (u, s, _m), (_st, e) in zip(running, results, strict=True) if e}
        leases = self.store.leases()
        held: dict[tuple[str, str], int] = {}
        for lease in leases:
            held[(lease.user, lease.server)] = held.get((lease.user, lease.server), 0) + 1
        rows = views.gpu_rows(
            self.devices(),
            leases,
            {k: v for k, v in statuses.items() if v is not None},
            host=self.host,
            series=lambda uuid: self.activity.series(uuid, now.timestamp()),
        )
        servers = [
            views.server_entry(
                u, s, m, statuses[(u, s)], errors.get((u, s)), held.get((u, s), 0), catalog, now
            )
            | {"user": u}
            for u, s, m in running
        ]
        return {
            "gpus": rows,
            "capacity": self.capacity(catalog),
            "servers": servers,
            "queue": self.queue(),
            "keeps": self.active_keeps(),
            "actions": self.recent_actions(),
            "limits": self.release_limits_view(),
        }

    def release_limits_view(self) -> dict[str, Any]:
        """The release policy in force and each GPU server's current idle limit, with why."""
        policy, flat = self.release_policy()
        limits = self.release_limits() if policy == "learned" else []
        return views.release_limit_rows(limits, policy, flat)

    def active_keeps(self) -> list[dict[str, Any]]:
        """The keeps in force: who postponed the release of their GPU, until when."""
        if self.keeps is None:
            return []
        now = utcnow()
        return [views.keep_entry(k, now) for k in self.keeps.active(now.timestamp())]

    def capacity(self, catalog: Catalog) -> list[dict[str, Any]]:
        """The cluster's GPU counts the hub publishes (Kubernetes), type by type, with their age."""
        names = {g.id: g.display_name for g in catalog.gpu_types}
        return views.capacity_rows(self.store.measured_capacity().values(), names, utcnow())

    def recent_actions(self) -> list[dict[str, Any]]:
        now = utcnow()
        return [
            views.action_entry(a, now)
            for a in self.store.actions(limit=self.settings.history_limit)
        ]

    # -- actions --------------------------------------------------------------------------------

    def _executor(self) -> Any:
        if self.executor is None:
            raise ActionRefused("the service runs without its action executor")
        return self.executor

    async def _running(self, user: str, server: str) -> Any:
        from ..servers import RunningServer

        model = await self.hub.user(user)
        if model is None:
            raise ActionRefused(f"no user {user!r}")
        server_model = (model.get("servers") or {}).get(server)
        if not server_model or not server_model.get("ready"):
            raise ActionRefused(f"{views.server_label(server)} server of {user} is not running")
        groups = frozenset(g for g in model.get("groups") or () if isinstance(g, str))
        return RunningServer(user, server, groups, server_model)

    async def release(self, user: str, server: str, reason: str, actor: str) -> None:
        """Snapshot the server's kernels, then restart it without its GPUs; `reason` is what
        the user reads in their history and in the notice inside their server."""
        executor = self._executor()
        running = await self._running(user, server)
        if not running.gpus and not self.store.leases_of(user, server):
            raise ActionRefused(f"{running.label} holds no GPU")
        if executor.busy(running.key):
            raise ActionRefused(f"an action on {running.label} is under way")
        action = ReleaseGpu(
            user, server, rule="admin", reason=reason, gpus=running.gpus, gpu_type=running.gpu_type
        )
        executor.run_for(running.key, executor.act(action, running, actor=actor))

    async def stop(self, user: str, server: str, reason: str, actor: str) -> None:
        executor = self._executor()
        running = await self._running(user, server)
        if executor.busy(running.key):
            raise ActionRefused(f"an action on {running.label} is under way")
        action = StopServer(
            user, server, rule="admin", reason=reason, gpus=running.gpus, gpu_type=running.gpu_type
        )
        executor.run_for(running.key, executor.act(action, running, actor=actor))

    async def gpu_again(self, user: str, server: str) -> None:
        executor = self._executor()
        try:
            await executor.gpu_again(user, server, actor=user)
        except LookupError as e:
            raise ActionRefused(str(e)) from e
        except RuntimeError as e:
            raise ActionRefused(str(e)) from e

    # -- environments ---------------------------------------------------------------------------

    def environments(self) -> list[dict[str, Any]]:
        """Every environment: the file's and the stored ones, with where each comes from."""
        base = self.base_catalog()
        stored = {e.id: e for e in self.store.catalog_entries()}
        problems = dict(self.catalog_problems())
        out = []
        for env in self.catalog().environments:
            record = stored.get(env.id)
            in_file = base.environment(env.id) is not None
            out.append(
                {
                    "description": "",
                    "image": None,
                    "local": {},
                    "problem": None,
                    **environment_entry(env),
                    "groups": sorted(env.groups),
                    "origin": ("changed here" if in_file else "added here")
                    if record
                    else "catalogue file",
                    "in_file": in_file,
                    "stored": record is not None,
                    "updated_by": record.updated_by if record else None,
                    "updated_at": views.iso(record.updated_at) if record else None,
                }
            )
        for env_id, record in stored.items():
            if env_id in problems:
                out.append(
                    {
                        "id": env_id,
                        "display_name": str(record.data.get("display_name") or env_id),
                        "description": "",
                        "image": None,
                        "local": {},
                        "enabled": False,
                        "origin": "added here",
                        "in_file": base.environment(env_id) is not None,
                        "stored": True,
                        "problem": problems[env_id],
                        "groups": [],
                        "interfaces": [],
                        "updated_by": record.updated_by,
                        "updated_at": views.iso(record.updated_at),
                    }
                )
        return out

    def environment(self, env_id: str) -> dict[str, Any] | None:
        env = self.catalog().environment(env_id)
        return environment_entry(env) if env else None

    def _python_exists(self) -> Callable[[str], bool] | None:
        if not self.settings.check_local_python:
            return None
        return lambda path: os.path.isfile(path) and os.access(path, os.X_OK)

    def save_environment(self, data: Any, actor: str, *, create: bool) -> dict[str, Any]:
        """Validate and store an environment; `InputError` (400) or `ActionRefused` (409)."""
        catalog = self.catalog()
        entry = check_environment(
            data, catalog, self.settings.allowed_registries, python_exists=self._python_exists()
        )
        if create and catalog.environment(entry["id"]) is not None:
            raise ActionRefused(f"an environment {entry['id']!r} exists already: edit it instead")
        self.store.put_catalog_entry(entry["id"], entry, actor)
        log.info("gpuhub: %s saved environment %s", actor, entry["id"])
        return entry

    def set_environment_enabled(self, env_id: str, enabled: bool, actor: str) -> dict[str, Any]:
        env = self.catalog().environment(env_id)
        if env is None:
            raise LookupError(f"no environment {env_id!r}")
        entry = {**environment_entry(env), "enabled": enabled}
        self.store.put_catalog_entry(env_id, entry, actor)
        log.info(
            "gpuhub: %s %s environment %s", actor, "enabled" if enabled else "disabled", env_id
        )
        return entry

    def reset_environment(self, env_id: str, actor: str) -> bool:
        """Forget the stored entry: the file's environment comes back, or an added one goes."""
        deleted = self.store.delete_catalog_entry(env_id)
        if deleted:
            log.info("gpuhub: %s reset environment %s", actor, env_id)
        return deleted

    # -- quotas ---------------------------------------------------------------------------------

    def quotas(self) -> dict[str, Any]:
        configured = self.base_quotas()
        stored = {q.group: q for q in self.store.group_quotas()}
        groups = []
        for group in sorted(set(configured.groups) | set(stored)):
            record = stored.get(group)
            base = configured.groups.get(group)
            current = record or base
            groups.append(
                {
                    "group": group,
                    "max_gpus": current.max_gpus if current else None,
                    "max_servers": current.max_servers if current else None,
                    "configured": {"max_gpus": base.max_gpus, "max_servers": base.max_servers}
                    if base
                    else None,
                    "stored": record is not None,
                    "updated_by": record.updated_by if record else None,
                    "updated_at": views.iso(record.updated_at) if record else None,
                }
            )
        return {
            "default": {
                "max_gpus": configured.default.max_gpus,
                "max_servers": configured.default.max_servers,
            },
            "groups": groups,
            "users": {
                name: {"max_gpus": q.max_gpus, "max_servers": q.max_servers}
                for name, q in sorted(configured.users.items())
            },
            # weekly GPU-hour budgets: from the quotas file only (docs/configuration.md)
            "weekly_gpu_hours": {
                "default": configured.default.weekly_gpu_hours,
                "groups": {
                    g: q.weekly_gpu_hours
                    for g, q in sorted(configured.groups.items())
                    if q.weekly_gpu_hours is not None
                },
                "users": {
                    u: q.weekly_gpu_hours
                    for u, q in sorted(configured.users.items())
                    if q.weekly_gpu_hours is not None
                },
            },
        }

    def save_quota(self, group: Any, max_gpus: Any, max_servers: Any, actor: str) -> GroupQuota:
        quota = check_quota(group, max_gpus, max_servers)
        self.store.put_group_quota(quota.group, quota.max_gpus, quota.max_servers, actor)
        log.info(
            "gpuhub: %s set the quota of group %s: %s GPUs, %s servers",
            actor,
            quota.group,
            quota.max_gpus,
            quota.max_servers,
        )
        return quota

    def reset_quota(self, group: str, actor: str) -> bool:
        deleted = self.store.delete_group_quota(group)
        if deleted:
            log.info("gpuhub: %s reset the quota of group %s", actor, group)
        return deleted

    # -- users ----------------------------------------------------------------------------------

    async def register_users(
        self, data: bytes, actor: str, token: str, *, dry_run: bool
    ) -> dict[str, Any]:
        """Register the users and groups of a CSV file with the admin's own hub token (the
        service's token cannot create users): `RegistrationError` lists bad lines,
        `ActionRefused` says what the hub refused."""
        from .registration import register

        registration = parse_csv(data)
        hub = HubClient(self.hub.api_url, token, retries=0)
        try:
            report = await register(hub, registration, dry_run=dry_run)
        except HubAPIError as e:
            if e.status == 403:
                raise ActionRefused(
                    "the hub refused: registering users needs the hub's admin rights "
                    f"(admin:users, admin:groups, groups) ({e.message})"
                ) from e
            raise ActionRefused(f"the hub refused: {e.status} {e.message}") from e
        finally:
            hub.close()
        if not dry_run:
            log.info("gpuhub: %s registered users: %s", actor, report["summary"])
        return report
