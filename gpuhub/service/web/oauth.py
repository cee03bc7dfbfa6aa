"""The pages' OAuth with the hub: the fewest scopes at login, more only when asked for.

The hub grants an OAuth token the scopes its client requests, limited to the client's
`oauth_client_allowed_scopes` and to what the person holds. Without a `scope` parameter it grants
all of them, so every hub admin who opened the pages would hand the service a token with
`admin:users`. `PagesHubOAuth` asks at login only for `LOGIN_SCOPES` (gpuhub's admin scope, and
the hub's `admin-ui` that marks a hub admin's token); the registration scopes are asked for only
when an admin registers users (`step_up_url`, "Allow registering users" on that page), and only
for that login session.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from jupyterhub.services.auth import HubOAuth
from tornado.httputil import url_concat
from traitlets import List, Unicode, default

from .config import ADMIN_SCOPE

#: The hub's own scope that only its `admin` role holds by default: it lets a token see the hub's
#: admin page, nothing more; on the pages it marks the token of a hub admin.
HUB_ADMIN_SCOPE = "admin-ui"

#: What the pages ask for when someone logs in.
LOGIN_SCOPES = (ADMIN_SCOPE, HUB_ADMIN_SCOPE)

#: What registering users and groups takes (held by hub admins), asked for only to register.
REGISTRATION_SCOPES = (
    "admin:users",
    "admin:groups",
    "groups",
    "list:users",
    "read:users",
    "list:groups",
    "read:groups",
    "read:roles",
)


class PagesHubOAuth(HubOAuth):
    """`HubOAuth` whose login asks only for `login_scopes`."""

    login_scopes = List(
        Unicode(),
        default_value=list(LOGIN_SCOPES),
        help="The scopes the pages request when someone logs in (the rest on demand).",
    )

    @default("login_url")
    def _login_url(self) -> str:
        return self.authorize_url(self.login_scopes)

    def authorize_url(self, scopes: Iterable[str]) -> str:
        return url_concat(
            self.oauth_authorization_url,
            {
                "client_id": self.oauth_client_id,
                "redirect_uri": self.oauth_redirect_uri,
                "response_type": "code",
                "scope": " ".join(dict.fromkeys(scopes)),
            },
        )


def step_up_url(handler: Any, hub_auth: PagesHubOAuth, scopes: Iterable[str], next_url: str) -> str:
    """The hub's authorize URL asking for `scopes` (with the state cookie and PKCE, as
    `HubOAuthenticated.get_login_url` does), coming back to `next_url`."""
    params: dict[str, str] = {}
    code_verifier = None
    if hub_auth.pkce_enabled:
        code_verifier, challenge, method = hub_auth.generate_pkce_code_challenge()
        params.update(code_challenge=challenge, code_challenge_method=method)
    params["state"] = hub_auth.set_state_cookie(
        handler, next_url=next_url, code_verifier=code_verifier
    )
    return url_concat(hub_auth.authorize_url(scopes), params)


def has_scopes(user: dict[str, Any] | None, scopes: Iterable[str]) -> bool:
    held = set((user or {}).get("scopes") or ())
    return all(scope in held for scope in scopes)
