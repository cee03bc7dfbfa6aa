"""The admin pages (`/services/gpuhub/admin...`) and their JSON API (`api/admin/...`): every GPU,
the queue, recent actions, releasing a GPU or stopping a server with a reason, environments,
group quotas and user registration. gpuhub admins only: everyone else gets 403."""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

from tornado import web

from ...core.accounting import csv_cell
from ...core.overrides import InputError
from ...core.registration import RegistrationError, parse_csv
from ..hubapi import HubClient
from .base import ApiHandler, BaseHandler
from .context import ActionRefused
from .oauth import REGISTRATION_SCOPES, has_scopes, step_up_url
from .registration import PrivilegedGroups, privileged_groups

log = logging.getLogger("gpuhub.service")

MAX_REASON = 500


def check_reason(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise web.HTTPError(400, "reason: say why (the user reads it)")
    value = " ".join(value.split())
    if len(value) > MAX_REASON:
        raise web.HTTPError(400, "reason: at most %d characters", MAX_REASON)
    return value


def check_name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise web.HTTPError(400, "%s: required", field)
    return value


class AdminPageHandler(BaseHandler):
    admin_only = True


class AdminApiHandler(ApiHandler):
    admin_only = True


# -- overview ------------------------------------------------------------------------------------


class AdminPage(AdminPageHandler):
    @web.authenticated
    async def get(self) -> None:
        overview = await self.pages.admin_overview()
        self.render_page("admin.html", overview=overview, page="admin")


class GpuHoursPage(AdminPageHandler):
    """GET `admin/gpu-hours[?week=this|last|YYYY-MM-DD]`: holders ranked by idle GPU-hours."""

    @web.authenticated
    async def get(self) -> None:
        week = self.get_query_argument("week", "this")
        try:
            hours = self.pages.gpu_hours(week)
        except InputError as e:
            raise web.HTTPError(400, "%s: %s", e.field, e.message) from e
        self.render_page("gpu_hours.html", hours=hours, week=week, page="gpu-hours")


CSV_COLUMNS = (
    "week_start",
    "user",
    "group",
    "gpu_type",
    "held_hours",
    "busy_hours",
    "idle_hours",
    "unknown_hours",
    "idle_share",
)


def gpu_hours_csv(hours: dict[str, Any]) -> str:
    """The holders as CSV; names a spreadsheet would read as formulas are neutralised."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in hours["holders"]:
        writer.writerow(
            [
                hours["week_start"],
                csv_cell(row["user"]),
                csv_cell(row["group"]),
                csv_cell(row["gpu_type"]),
                row["held_hours"],
                row["busy_hours"],
                row["idle_hours"],
                row["unknown_hours"],
                "" if row["idle_share"] is None else row["idle_share"],
            ]
        )
    return out.getvalue()


class GpuHoursApi(AdminApiHandler):
    """GET `api/admin/gpu-hours[?week=...]` (JSON) and `api/admin/gpu-hours.csv[?week=...]`."""

    @web.authenticated
    async def get(self, fmt: str | None = None) -> None:
        try:
            hours = self.pages.gpu_hours(self.get_query_argument("week", "this"))
        except InputError as e:
            raise web.HTTPError(400, "%s: %s", e.field, e.message) from e
        if fmt != ".csv":
            self.write_json(hours)
            return
        self.set_header("Content-Type", "text/csv; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        day = hours["week_start"][:10]
        self.set_header("Content-Disposition", f'attachment; filename="gpu-hours-{day}.csv"')
        self.finish(gpu_hours_csv(hours))


class ServerActionForm(AdminPageHandler):
    """POST `admin/release` or `admin/stop` (`user`, `server`, `reason`)."""

    @web.authenticated
    async def post(self, action: str) -> None:
        user = check_name(self.field("user"), "user")
        server = self.field("server")
        try:
            reason = check_reason(self.field("reason"))
        except web.HTTPError as e:
            self.back("admin", str(e.log_message), "danger")
            return
        label = f"{user}/{server}" if server else user
        if action == "release":
            await self.pages.release(user, server, reason, actor=self.user_name)
            self.back("admin", f"Releasing the GPU of {label}: snapshot, then restart without it.")
        else:
            await self.pages.stop(user, server, reason, actor=self.user_name)
            self.back("admin", f"Stopping {label}: snapshot, then stop.")


# -- environments --------------------------------------------------------------------------------

FORM_DEFAULTS: dict[str, Any] = {
    "id": "",
    "display_name": "",
    "description": "",
    "image": "",
    "local": {"python": "", "kernel_display_name": ""},
    "interfaces": [],
    "groups": [],
    "enabled": True,
}


class EnvironmentsPage(AdminPageHandler):
    @web.authenticated
    async def get(self) -> None:
        self.render_page(
            "environments.html",
            environments=self.pages.environments(),
            page="environments",
        )

    @web.authenticated
    async def post(self) -> None:
        """Save the environment form (`mode` create or edit)."""
        create = self.field("mode") != "edit"
        data = {
            "id": self.field("id"),
            "display_name": self.field("display_name"),
            "description": self.field("description"),
            "image": self.field("image") or None,
            "local": {
                "python": self.field("local_python") or None,
                "kernel_display_name": self.field("kernel_display_name") or None,
            },
            "interfaces": self.get_body_arguments("interfaces") or None,
            "groups": self.field("groups") or None,
            "enabled": self.field("enabled") == "on",
        }
        if not create:
            current = self.pages.environment(data["id"])
            env_vars = ((current or {}).get("local") or {}).get("env")
            if env_vars:  # kept as they are: the form does not edit them
                data["local"]["env"] = env_vars
        try:
            entry = self.pages.save_environment(data, self.user_name, create=create)
        except InputError as e:
            self.render_form(data, create, error=e, status=400)
            return
        self.back("admin/environments", f"Environment {entry['id']} saved.")

    def render_form(
        self, data: dict[str, Any], create: bool, error: InputError | None = None, status: int = 200
    ) -> None:
        form = {**FORM_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
        form["local"] = {**FORM_DEFAULTS["local"], **(data.get("local") or {})}
        if isinstance(form["groups"], list):
            form["groups"] = ", ".join(form["groups"])
        self.render_page(
            "environment_form.html",
            status=status,
            form=form,
            create=create,
            error=error,
            interfaces=self.pages.catalog().interfaces,
            registries=self.pages.settings.allowed_registries,
            interpreters=self.pages.base_catalog().file_interpreters(),
            page="environments",
        )


class EnvironmentFormPage(EnvironmentsPage):
    """GET `admin/environments/new` or `admin/environments/<id>`: the form."""

    @web.authenticated
    async def get(self, env_id: str | None = None) -> None:
        if env_id is None:
            form = dict(FORM_DEFAULTS)
            form["interfaces"] = [i.id for i in self.pages.catalog().interfaces]
            self.render_form(form, create=True)
            return
        entry = self.pages.environment(env_id)
        if entry is None:
            raise web.HTTPError(404, "no environment %r", env_id)
        self.render_form(entry, create=False)


class EnvironmentActionForm(AdminPageHandler):
    """POST `admin/environments/<id>/(disable|enable|reset)`."""

    @web.authenticated
    async def post(self, env_id: str, action: str) -> None:
        try:
            if action == "reset":
                self.pages.reset_environment(env_id, self.user_name)
                self.back(
                    "admin/environments", f"Environment {env_id}: back to the catalogue file."
                )
                return
            self.pages.set_environment_enabled(env_id, action == "enable", self.user_name)
        except LookupError as e:
            raise web.HTTPError(404, "%s", e) from e
        self.back("admin/environments", f"Environment {env_id} {action}d.")


# -- quotas --------------------------------------------------------------------------------------


class QuotasPage(AdminPageHandler):
    @web.authenticated
    async def get(self) -> None:
        self.render_quotas()

    def render_quotas(
        self, error: InputError | None = None, form: dict[str, str] | None = None, status: int = 200
    ) -> None:
        self.render_page(
            "quotas.html",
            status=status,
            quotas=self.pages.quotas(),
            error=error,
            form=form or {"group": "", "max_gpus": "", "max_servers": ""},
            page="quotas",
        )

    @web.authenticated
    async def post(self) -> None:
        form = {k: self.field(k) for k in ("group", "max_gpus", "max_servers")}
        if self.field("action") == "reset":
            self.pages.reset_quota(form["group"], self.user_name)
            self.back("admin/quotas", f"Quota of group {form['group']}: back to the configuration.")
            return
        try:
            quota = self.pages.save_quota(
                form["group"], form["max_gpus"], form["max_servers"], self.user_name
            )
        except InputError as e:
            self.render_quotas(error=e, form=form, status=400)
            return
        self.back("admin/quotas", f"Quota of group {quota.group} saved.")


# -- users ---------------------------------------------------------------------------------------


class UsersPage(AdminPageHandler):
    """GET/POST `admin/users`: register users and groups from a CSV file. It takes the hub
    admin's own rights, which the pages ask for only here ("Allow registering users"), and a
    confirmation for groups that give rights."""

    def render_users(self, status: int = 200, **context: Any) -> None:
        values: dict[str, Any] = {"report": None, "errors": None, "privileged": None}
        values.update(context)
        self.render_page(
            "users.html",
            status=status,
            can_register=has_scopes(self.current_user, REGISTRATION_SCOPES),
            page="users",
            **values,
        )

    @web.authenticated
    async def get(self) -> None:
        self.render_users()

    @web.authenticated
    async def post(self) -> None:
        files = self.request.files.get("csv") or []
        text = self.get_body_argument("text", "")
        if files:
            data = files[0]["body"]
        elif text.strip():
            data = text.encode()
        else:
            self.render_users(400, errors=["csv: choose a file (or paste its lines)"])
            return
        if len(data) > self.pages.settings.max_upload_bytes:
            raise web.HTTPError(
                413, "csv: larger than %d bytes", self.pages.settings.max_upload_bytes
            )
        if not has_scopes(self.current_user, REGISTRATION_SCOPES):
            self.render_users(403, errors=[NO_REGISTRATION_RIGHTS])
            return
        dry_run = self.get_body_argument("dry_run", "") == "on"
        confirmed = self.get_body_argument("allow_privileged_groups", "") == "on"
        try:
            report = await register_checked(self, data, dry_run=dry_run, confirmed=confirmed)
        except RegistrationError as e:
            self.render_users(400, errors=[str(err) for err in e.errors])
            return
        except PrivilegedGroups as e:
            self.render_users(400, errors=[str(e)], privileged=e.found)
            return
        except ActionRefused as e:
            self.render_users(403, errors=[str(e)])
            return
        self.render_users(report=report, privileged=report["privileged_groups"] or None)


class UsersAuthorize(AdminPageHandler):
    """GET `admin/users/authorize`: ask the hub (again) for this login, with the registration
    scopes added; the hub grants them only to those who hold them (hub admins)."""

    @web.authenticated
    async def get(self) -> None:
        scopes = [*self.hub_auth.login_scopes, *REGISTRATION_SCOPES]
        next_url = self.pages.prefix + "admin/users"
        self.redirect(step_up_url(self, self.hub_auth, scopes, next_url))


NO_REGISTRATION_RIGHTS = (
    "registering users needs the hub's admin rights (admin:users, admin:groups, groups): "
    "this login to the pages does not carry them; a hub admin allows it on this page first"
)


async def register_checked(
    handler: BaseHandler, data: bytes, *, dry_run: bool, confirmed: bool
) -> dict[str, Any]:
    """Register the file's users with the admin's own token, refusing privileged groups the
    admin has not confirmed (a dry run reports them)."""
    registration = parse_csv(data)
    token = handler.hub_auth.get_token(handler)
    pages = handler.pages
    hub = HubClient(pages.hub.api_url, token, retries=0)
    try:
        found = await privileged_groups(hub, registration, pages.settings.privileged_groups)
    finally:
        hub.close()
    if found and not dry_run and not confirmed:
        raise PrivilegedGroups(found)
    report = await pages.register_users(data, handler.user_name, token, dry_run=dry_run)
    if found and not dry_run:
        log.warning(
            "gpuhub: %s added users to privileged groups (confirmed): %s",
            handler.user_name,
            ", ".join(found),
        )
    return {**report, "privileged_groups": found}


# -- JSON API ------------------------------------------------------------------------------------


class AdminOverviewApi(AdminApiHandler):
    """GET `api/admin/gpus`, `api/admin/capacity`, `api/admin/servers`, `api/admin/queue`,
    `api/admin/keeps` (the keeps in force), `api/admin/limits` (the release policy and each GPU
    server's idle limit, with why), `api/admin/actions`."""

    @web.authenticated
    async def get(self, part: str) -> None:
        if part == "queue":
            self.write_json(self.pages.queue())
            return
        if part == "actions":
            self.write_json(self.pages.recent_actions())
            return
        if part == "keeps":
            self.write_json(self.pages.active_keeps())
            return
        if part == "limits":
            self.write_json(self.pages.release_limits_view())
            return
        if part == "capacity":
            self.write_json(self.pages.capacity(self.pages.catalog()))
            return
        overview = await self.pages.admin_overview()
        self.write_json(overview[part])


class ServerActionApi(AdminApiHandler):
    """POST `api/admin/release` or `api/admin/stop` `{"user", "server", "reason"}`: 202."""

    @web.authenticated
    async def post(self, action: str) -> None:
        body = self.body({"user": str, "server": str, "reason": str})
        user = check_name(body.get("user"), "user")
        server = body.get("server") or ""
        reason = check_reason(body.get("reason"))
        if action == "release":
            await self.pages.release(user, server, reason, actor=self.user_name)
        else:
            await self.pages.stop(user, server, reason, actor=self.user_name)
        self.write_json({"user": user, "server": server, "action": action}, status=202)


class EnvironmentsApi(AdminApiHandler):
    """GET `api/admin/environments`; POST one (201, 409 if the id exists)."""

    @web.authenticated
    async def get(self) -> None:
        self.write_json(self.pages.environments())

    @web.authenticated
    async def post(self) -> None:
        try:
            entry = self.pages.save_environment(self.body(), self.user_name, create=True)
        except InputError as e:
            raise web.HTTPError(400, "%s: %s", e.field, e.message) from e
        self.write_json(entry, status=201)


class EnvironmentApi(AdminApiHandler):
    """GET / PUT (create or replace) / DELETE (back to the file's) `api/admin/environments/<id>`;
    POST `.../enable`, `.../disable`."""

    @web.authenticated
    async def get(self, env_id: str, action: str | None = None) -> None:
        entry = self.pages.environment(env_id)
        if entry is None or action:
            raise web.HTTPError(404, "no environment %r", env_id)
        self.write_json(entry)

    @web.authenticated
    async def put(self, env_id: str, action: str | None = None) -> None:
        if action:
            raise web.HTTPError(405)
        data = self.body()
        if data.get("id", env_id) != env_id:
            raise web.HTTPError(400, "id: %r does not match the URL's %r", data.get("id"), env_id)
        try:
            entry = self.pages.save_environment(
                {**data, "id": env_id}, self.user_name, create=False
            )
        except InputError as e:
            raise web.HTTPError(400, "%s: %s", e.field, e.message) from e
        self.write_json(entry)

    @web.authenticated
    async def post(self, env_id: str, action: str | None = None) -> None:
        if action not in ("enable", "disable"):
            raise web.HTTPError(405)
        try:
            entry = self.pages.set_environment_enabled(env_id, action == "enable", self.user_name)
        except LookupError as e:
            raise web.HTTPError(404, "%s", e) from e
        self.write_json(entry)

    @web.authenticated
    async def delete(self, env_id: str, action: str | None = None) -> None:
        if action:
            raise web.HTTPError(405)
        if not self.pages.reset_environment(env_id, self.user_name):
            raise web.HTTPError(404, "no stored entry for environment %r", env_id)
        self.set_status(204)
        self.finish()


class QuotasApi(AdminApiHandler):
    """GET `api/admin/quotas`."""

    @web.authenticated
    async def get(self) -> None:
        self.write_json(self.pages.quotas())


class QuotaApi(AdminApiHandler):
    """PUT `api/admin/quotas/<group>` `{"max_gpus", "max_servers"}`; DELETE: back to config."""

    @web.authenticated
    async def put(self, group: str) -> None:
        body = self.body({"max_gpus": (int, str), "max_servers": (int, str)})
        try:
            quota = self.pages.save_quota(
                group, body.get("max_gpus"), body.get("max_servers"), self.user_name
            )
        except InputError as e:
            raise web.HTTPError(400, "%s: %s", e.field, e.message) from e
        self.write_json(
            {"group": quota.group, "max_gpus": quota.max_gpus, "max_servers": quota.max_servers}
        )

    @web.authenticated
    async def delete(self, group: str) -> None:
        if not self.pages.reset_quota(group, self.user_name):
            raise web.HTTPError(404, "no stored quota for group %r", group)
        self.set_status(204)
        self.finish()


class UsersImportApi(AdminApiHandler):
    """POST `api/admin/users/import[?dry_run=1][&allow_privileged_groups=1]` with the CSV file as
    the body (the token's own rights register them)."""

    @web.authenticated
    async def post(self) -> None:
        data = self.request.body or b""
        if len(data) > self.pages.settings.max_upload_bytes:
            raise web.HTTPError(
                413, "csv: larger than %d bytes", self.pages.settings.max_upload_bytes
            )
        dry_run = self.get_query_argument("dry_run", "0") in ("1", "true", "yes")
        confirmed = self.get_query_argument("allow_privileged_groups", "0") in ("1", "true", "yes")
        try:
            report = await register_checked(self, data, dry_run=dry_run, confirmed=confirmed)
        except PrivilegedGroups as e:
            self.write_json(
                {"status": 400, "message": str(e), "privileged_groups": e.found}, status=400
            )
            return
        except RegistrationError as e:
            self.set_status(400)
            self.write_json(
                {
                    "status": 400,
                    "message": str(e),
                    "errors": [
                        {"line": err.line, "field": err.field, "message": err.message}
                        for err in e.errors
                    ],
                },
                status=400,
            )
            return
        self.write_json(report)
