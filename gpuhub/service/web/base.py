"""Handlers' common ground: the hub's OAuth, who is an admin, rendering, errors, CSRF, flashes.

Pages and API calls are authenticated by JupyterHub (`HubOAuthenticated`): a browser logs in
through the hub's OAuth and keeps a cookie; scripts send a hub token (`Authorization: token ...`).
Forms and cookie-authenticated API calls that change something carry the `_xsrf` token (the
hub's XSRF rules, which `HubOAuth` applies); token-authenticated calls need none.
"""

from __future__ import annotations

import json
import logging
import traceback
from http import HTTPStatus
from pathlib import Path
from typing import Any

import jinja2
from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from markupsafe import Markup
from tornado import web

from .context import ActionRefused, Pages
from .oauth import HUB_ADMIN_SCOPE
from .snapshots import SnapshotError
from .sparkline import sparkline_svg

log = logging.getLogger("gpuhub.service")

TEMPLATES = Path(__file__).resolve().parent / "templates"
FLASH_COOKIE = "gpuhub-flash"

_env: jinja2.Environment | None = None


def template_env() -> jinja2.Environment:
    global _env
    if _env is None:
        _env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        _env.globals["sparkline"] = lambda values, **kw: Markup(sparkline_svg(values, **kw))
        _env.filters["pct"] = lambda v: "" if v is None else f"{v:.0f} %"
        _env.filters["fraction"] = lambda v: "" if v is None else f"{100 * v:.0f} %"
    return _env


class SettingsHubAuth:
    """The `HubOAuth` of the application's settings (one per service, configured there)."""

    @property
    def hub_auth(self) -> Any:
        auth = self.settings.get("hub_auth")  # type: ignore[attr-defined]
        return auth if auth is not None else HubOAuth.instance()

    @hub_auth.setter
    def hub_auth(self, value: Any) -> None:
        pass


class OAuthCallback(SettingsHubAuth, HubOAuthCallbackHandler):
    """Where the hub's OAuth sends the browser back to (`oauth_callback`)."""


class BaseHandler(SettingsHubAuth, HubOAuthenticated, web.RequestHandler):
    """A page of the gpuhub service (HTML)."""

    admin_only = False

    def initialize(self, pages: Pages) -> None:
        self.pages = pages

    async def prepare(self) -> None:
        # Identify the user without blocking the event loop (the result is cached per request;
        # get_current_user then finds it).
        await self.hub_auth.get_user(self, sync=False)
        if self.admin_only and self.current_user and not self.is_admin:
            raise web.HTTPError(403, "This page is for gpuhub admins.")

    # -- who --------------------------------------------------------------------------------

    @property
    def user_name(self) -> str:
        return str(self.current_user["name"])

    @property
    def is_admin(self) -> bool:
        return is_admin(self.current_user, self.pages.settings)

    # -- rendering --------------------------------------------------------------------------

    def render_page(self, template: str, status: int = 200, **context: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        values = {**self.page_context(), **context}
        self.finish(template_env().get_template(template).render(**values))

    def page_context(self) -> dict[str, Any]:
        hub_prefix = self.hub_auth.hub_prefix
        user = self.current_user if self._current_user_known() else None
        return {
            "prefix": self.pages.prefix,
            "hub_prefix": hub_prefix,
            "hub_static": f"{hub_prefix}static/",
            "user": user,
            "is_admin": bool(user) and self.is_admin,
            "xsrf_token": self.xsrf_token.decode() if user else "",
            "flash": self.take_flash() if user and self.request.method == "GET" else None,
            "path": self.request.path,
            "page": "",
        }

    def _current_user_known(self) -> bool:
        try:
            return bool(self.current_user)
        except Exception:
            return False

    # -- flashes (the message shown after a form's redirect) ---------------------------------

    def flash(self, text: str, kind: str = "success") -> None:
        self.set_signed_cookie(
            FLASH_COOKIE,
            json.dumps({"text": text, "kind": kind}),
            path=self.pages.prefix,
            expires_days=None,
            httponly=True,
            samesite="Lax",
        )

    def take_flash(self) -> dict[str, str] | None:
        raw = self.get_signed_cookie(FLASH_COOKIE, max_age_days=1)
        if not raw:
            return None
        self.clear_cookie(FLASH_COOKIE, path=self.pages.prefix)
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        kind = data.get("kind") if data.get("kind") in ("success", "danger", "warning") else "info"
        return {"text": str(data.get("text", "")), "kind": kind}

    def back(self, path: str, text: str, kind: str = "success") -> None:
        """After a form: flash `text` and redirect to `path` (under the service's prefix)."""
        self.flash(text, kind)
        self.redirect(self.pages.prefix + path.lstrip("/"))

    # -- form fields ----------------------------------------------------------------------------

    def field(self, name: str, default: str = "") -> str:
        return self.get_body_argument(name, default, strip=True)

    # -- errors ---------------------------------------------------------------------------------

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = error_message(status_code, kwargs.get("exc_info"))
        if status_code >= 500 and "exc_info" in kwargs:
            log.error("gpuhub pages: %s", "".join(traceback.format_exception(*kwargs["exc_info"])))
        try:
            self.render_page(
                "error.html", status=status_code, status_code=status_code, message=message
            )
        except Exception:
            log.exception("gpuhub pages: the error page failed")
            self.finish(f"{status_code}: {message}")

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ActionRefused | SnapshotError):
            return
        super().log_exception(typ, value, tb)

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, ActionRefused):
            e = web.HTTPError(409, "%s", str(e))
        elif isinstance(e, SnapshotError):
            e = web.HTTPError(e.status, "%s", str(e))
        super()._handle_request_exception(e)  # type: ignore[arg-type]


def error_message(status_code: int, exc_info: Any) -> str:
    error = exc_info[1] if exc_info else None
    if isinstance(error, ActionRefused | SnapshotError):
        return str(error)
    if isinstance(error, web.HTTPError) and error.log_message:
        if error.args:
            try:
                return str(error.log_message % error.args)
            except TypeError:
                return str(error.log_message)
        return str(error.log_message)
    if status_code >= 500:
        return "Something went wrong on gpuhub's side; it is logged."
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "Error"


def is_admin(user: dict[str, Any] | None, settings: Any) -> bool:
    """A gpuhub admin: the token (or OAuth login) carries gpuhub's admin scope, or, for a hub
    admin (`hub_admins_are_admins`), the hub's `admin-ui` scope. The `admin` flag of the user
    model alone never is enough: it is the person's, not the token's (a hub admin's token made
    for a script with a few scopes would otherwise administer gpuhub)."""
    if not user:
        return False
    scopes = user.get("scopes") or ()
    if settings.admin_scope in scopes:
        return True
    return bool(settings.hub_admins_are_admins and user.get("admin") and HUB_ADMIN_SCOPE in scopes)


class ApiHandler(BaseHandler):
    """A JSON endpoint of the gpuhub service: 403 instead of a login redirect."""

    def get_login_url(self) -> str:
        raise web.HTTPError(403, "authentication required (a hub token or the hub's login)")

    def check_xsrf_cookie(self) -> None:
        return self.hub_auth.check_xsrf_cookie(self)

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data, default=str))

    def body(self, allowed: dict[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
        raw = self.request.body or b""
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise web.HTTPError(400, "body: not valid JSON (%s)", e) from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "body: must be a JSON object, not %s", type(data).__name__)
        if allowed is not None:
            for name, value in data.items():
                if name not in allowed:
                    raise web.HTTPError(
                        400, "%s: unknown field (allowed: %s)", name, ", ".join(sorted(allowed))
                    )
                if value is not None and not isinstance(value, allowed[name]):
                    raise web.HTTPError(400, "%s: wrong type %s", name, type(value).__name__)
        return data

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = error_message(status_code, kwargs.get("exc_info"))
        if status_code >= 500 and "exc_info" in kwargs:
            log.error("gpuhub API: %s", "".join(traceback.format_exception(*kwargs["exc_info"])))
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": message}))
