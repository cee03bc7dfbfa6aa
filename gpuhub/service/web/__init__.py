"""gpuhub's pages in the hub, served by the gpuhub service under its prefix (`/services/gpuhub/`).

`routes(service)` returns the tornado handlers and `settings(service)` the application settings
the service's web app adds (see `gpuhub.service.app`). The pages and their JSON API are described
in docs/pages.md.
"""

from __future__ import annotations

import os
from typing import Any

from ... import paths
from ...core.quotas import QuotaConfig, quota_config_from_dict
from ...expiring import ExpiringCache
from . import admin, user
from .activity import ActivityLog
from .base import OAuthCallback
from .config import GpuhubPages
from .context import Pages
from .oauth import HUB_ADMIN_SCOPE, PagesHubOAuth

__all__ = ["GpuhubPages", "Pages", "handlers", "make_pages", "routes", "settings"]

_ID = r"([a-z0-9][a-z0-9._-]{0,62})"
_SEGMENT = r"([^/]+)"


def handlers(pages: Pages) -> list[tuple[str, type, dict[str, Any]]]:
    """The handlers, with patterns relative to the service prefix."""
    init = {"pages": pages}
    routes: list[tuple[str, type]] = [
        ("", user.UserPage),
        ("gpu-again", user.GpuAgainForm),
        ("request", user.GpuRequestForm),
        (r"snapshots/(restore-next|delete|restore-latest)", user.SnapshotForm),
        ("admin", admin.AdminPage),
        ("admin/(release|stop)", admin.ServerActionForm),
        ("admin/gpu-hours", admin.GpuHoursPage),
        ("admin/environments", admin.EnvironmentsPage),
        ("admin/environments/new", admin.EnvironmentFormPage),
        (rf"admin/environments/{_ID}", admin.EnvironmentFormPage),
        (rf"admin/environments/{_ID}/(enable|disable|reset)", admin.EnvironmentActionForm),
        ("admin/quotas", admin.QuotasPage),
        ("admin/users", admin.UsersPage),
        ("admin/users/authorize", admin.UsersAuthorize),
        # JSON API
        ("api/me", user.MeApi),
        ("api/me/gpu-again", user.MeGpuAgainApi),
        ("api/me/requests", user.MeRequestApi),
        ("api/me/snapshots", user.MeSnapshotsApi),
        (rf"api/me/snapshots/{_SEGMENT}/restore-next", user.MeRestoreLatestApi),
        (rf"api/me/snapshots/{_SEGMENT}/{_SEGMENT}", user.MeSnapshotApi),
        (rf"api/me/snapshots/{_SEGMENT}/{_SEGMENT}/(restore-next)", user.MeSnapshotApi),
        ("api/admin/(gpus|capacity|servers|queue|keeps|limits|actions)", admin.AdminOverviewApi),
        ("api/admin/(release|stop)", admin.ServerActionApi),
        (r"api/admin/gpu-hours(\.csv)?", admin.GpuHoursApi),
        ("api/admin/environments", admin.EnvironmentsApi),
        (rf"api/admin/environments/{_ID}", admin.EnvironmentApi),
        (rf"api/admin/environments/{_ID}/(enable|disable)", admin.EnvironmentApi),
        ("api/admin/quotas", admin.QuotasApi),
        (rf"api/admin/quotas/{_SEGMENT}", admin.QuotaApi),
        ("api/admin/users/import", admin.UsersImportApi),
    ]
    out: list[tuple[str, type, dict[str, Any]]] = [(p + "$", h, init) for p, h in routes]
    out.append(("oauth_callback$", OAuthCallback, {}))
    return out


def _cached(seconds: float, load: Any) -> Any:
    cache: ExpiringCache[None, Any] = ExpiringCache(seconds)
    return lambda: cache.get_or_load(None, load)


def make_pages(service: Any) -> Pages:
    """`Pages` over the service's collaborators (client, store, executor, catalogue file)."""
    from ...catalog_cache import cached_catalog

    config = GpuhubPages(parent=service)
    catalog_file = getattr(service, "catalog_file", "") or str(paths.default_catalog_file())

    def base_quotas() -> QuotaConfig:
        if not config.quotas_file:
            return QuotaConfig()
        import yaml

        with open(config.quotas_file) as f:
            return quota_config_from_dict(yaml.safe_load(f) or {})

    def devices() -> list[Any]:
        from ... import nvml

        try:
            return list(nvml.inventory().devices)
        except Exception:
            return []

    from ..hubapi import HubClient

    # the pages' own client: their requests never take the cycle's slots, and are not retried
    hub = HubClient(
        service.hub_api_url,
        service.api_token,
        timeout=config.status_timeout,
        connect_timeout=service.connect_timeout,
        retries=1,
        backoff=service.retry_backoff,
        concurrency=config.hub_concurrency,
        page_size=service.page_size,
    )
    return Pages(
        hub=hub,
        board=service.board,
        status=service.page_status,
        store=service.store,
        settings=config,
        base_catalog=lambda: cached_catalog(catalog_file),
        base_quotas=_cached(10, base_quotas),
        executor=getattr(service, "executor", None),
        keeps=getattr(service, "keeps", None),
        requests=getattr(service, "user_requests", None),
        devices=_cached(30, devices),
        activity=ActivityLog(window=config.activity_window),
        prefix=service.service_prefix,
        release_policy=lambda: (
            getattr(service, "release_policy", "flat"),
            getattr(service, "gpu_idle_timeout", None),
        ),
        release_limits=lambda: (
            service.learning.thresholds() if getattr(service, "learning", None) else []
        ),
    )


def routes(service: Any) -> list[tuple[str, type, dict[str, Any]]]:
    pages = make_pages(service)
    service.gpuhub_pages = pages
    listeners = getattr(service, "status_listeners", None)
    if listeners is not None:  # every server's status at each cycle feeds the sparklines
        listeners.append(
            lambda server, status: pages.activity.remember(server.user, server.server, status)
        )
    return handlers(pages)


def settings(service: Any) -> dict[str, Any]:
    """Tornado settings for the pages: the hub's OAuth, and the secret that signs its cookies."""
    config = GpuhubPages(parent=service)
    return {
        # at login the pages ask only for gpuhub's admin scope and the hub's admin-ui (oauth.py)
        "hub_auth": PagesHubOAuth(
            api_url=service.hub_api_url,
            api_token=service.api_token,
            cache_max_age=60,
            login_scopes=[config.admin_scope, HUB_ADMIN_SCOPE],
        ),
        "cookie_secret": cookie_secret(),
    }


def cookie_secret() -> bytes:
    """$GPUHUB_SERVICE_COOKIE_SECRET (hex), so that logins to the pages survive a restart of the
    service; without it a random one (people go through the hub's OAuth again, unnoticed)."""
    secret = os.environ.get("GPUHUB_SERVICE_COOKIE_SECRET", "").strip()
    if not secret:
        return os.urandom(32)
    try:
        value = bytes.fromhex(secret)
    except ValueError:
        raise SystemExit("gpuhub service: GPUHUB_SERVICE_COOKIE_SECRET must be hex") from None
    if len(value) < 16:
        raise SystemExit("gpuhub service: GPUHUB_SERVICE_COOKIE_SECRET: at least 32 hex digits")
    return value
