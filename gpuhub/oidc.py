"""Single sign-on with an OpenID Connect provider (Dex, Keycloak, ...) for a gpuhub JupyterHub.

`configure_oidc(c, ...)` sets up oauthenticator's `GenericOAuthenticator` from the provider's
discovery document: people log in at the provider, the provider's groups claim becomes their
JupyterHub groups at every login (`manage_groups`), members of `admin_groups` are hub admins, and
the groups then decide what gpuhub gives them (catalogue `groups`, group quotas, the
`gpuhub-admins` role). Zero to JupyterHub deployments set the same options in their values (see
helm-values/oidc-dex.yaml).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

DISCOVERY = "/.well-known/openid-configuration"


class OIDCConfigError(RuntimeError):
    """The provider cannot be used (unreachable, or not an OpenID Connect provider)."""


def discover(issuer: str, timeout: float = 10.0) -> dict[str, Any]:
    """The provider's discovery document (authorization, token and userinfo endpoints)."""
    url = issuer.rstrip("/") + DISCOVERY
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            document = json.load(response)
    except (OSError, ValueError) as e:
        raise OIDCConfigError(f"{url}: not reachable or not JSON ({e})") from e
    return check_discovery(document, url)


def check_discovery(document: Any, source: str) -> dict[str, Any]:
    """`document` if it names the endpoints the hub needs; `OIDCConfigError` otherwise."""
    if not isinstance(document, Mapping):
        raise OIDCConfigError(f"{source}: the discovery document is not a JSON object")
    missing = [
        key
        for key in ("authorization_endpoint", "token_endpoint", "userinfo_endpoint")
        if not isinstance(document.get(key), str)
    ]
    if missing:
        raise OIDCConfigError(f"{source}: no {', '.join(missing)} in the discovery document")
    return dict(document)


def username_from(claims: Mapping[str, Any]) -> str:
    """The JupyterHub user name: `preferred_username`, else the local part of `email`, else
    `sub`."""
    for value in (
        claims.get("preferred_username"),
        str(claims.get("email") or "").split("@")[0],
        claims.get("sub"),
    ):
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise ValueError("the provider sent no preferred_username, email or sub claim")


def configure_oidc(
    c: Any,
    *,
    issuer: str,
    client_id: str,
    client_secret: str,
    callback_url: str,
    admin_groups: Iterable[str] = (),
    allowed_groups: Iterable[str] = (),
    groups_claim: str = "groups",
    login_service: str = "single sign-on",
    discovery: Mapping[str, Any] | None = None,
) -> None:
    """Log in through the OpenID Connect provider at `issuer` (`discovery` skips fetching its
    discovery document). Without `allowed_groups`, everyone the provider lets in may log in."""
    document = check_discovery(discovery, issuer) if discovery is not None else discover(issuer)
    c.JupyterHub.authenticator_class = "generic-oauth"
    g = c.GenericOAuthenticator
    g.login_service = login_service
    g.client_id = client_id
    g.client_secret = client_secret
    g.oauth_callback_url = callback_url
    g.authorize_url = document["authorization_endpoint"]
    g.token_url = document["token_endpoint"]
    g.userdata_url = document["userinfo_endpoint"]
    g.scope = ["openid", "profile", "email", "groups"]
    g.username_claim = username_from
    g.manage_groups = True
    g.auth_state_groups_key = f"oauth_user.{groups_claim}"
    g.admin_groups = set(admin_groups)
    allowed = set(allowed_groups)
    if allowed:
        g.allowed_groups = allowed
    else:
        g.allow_all = True
