"""Single sign-on with an OpenID Connect provider (Dex, Keycloak, ...) for a gpuhub JupyterHub.

`configure_oidc(c, ...)` sets up oauthenticator's `GenericOAuthenticator` from the provider's
discovery document: people log in at the provider, the provider's groups claim becomes their
JupyterHub groups at every login (`manage_groups`), members of `admin_groups` are hub admins, and
the groups then decide what gpuhub gives them (catalogue `groups`, group quotas, the
`gpuhub-admins` role). The user name is a claim unique per provider: the verified e-mail address
in full (default) or `sub`. Zero to JupyterHub deployments set the same options in their values
(see helm-values/oidc-dex.yaml).
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


#: Claims a hub user name may come from: each names one person at one provider. Not
#: `preferred_username` nor the local part of an e-mail address: anyone with an account at the
#: provider (or at any e-mail domain it accepts) could choose a name that is someone else's here.
USERNAME_CLAIMS = ("email", "sub")


class UsernameRefused(ValueError):
    """The provider's claims name nobody this hub can trust as a user name."""


def username_from(claims: Mapping[str, Any], claim: str = "email") -> str:
    """The JupyterHub user name from the provider's claims: the full e-mail address when the
    provider says it is verified (`email_verified` true), or the `sub` claim (unique per
    provider). `UsernameRefused` otherwise; never a fallback to another claim."""
    if claim == "email":
        email = claims.get("email")
        if not isinstance(email, str) or "@" not in email.strip():
            raise UsernameRefused("the provider sent no e-mail address")
        if claims.get("email_verified") not in (True, "true"):
            raise UsernameRefused(f"the provider has not verified the e-mail address {email!r}")
        return email.strip().lower()
    if claim == "sub":
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.strip():
            raise UsernameRefused("the provider sent no sub claim")
        return sub.strip()
    raise UsernameRefused(f"username_claim: {claim!r} is not one of {', '.join(USERNAME_CLAIMS)}")


def _refusing(claim: str) -> Any:
    def username(user_info: Mapping[str, Any]) -> str:
        from tornado import web

        try:
            return username_from(user_info, claim)
        except UsernameRefused as e:
            raise web.HTTPError(403, f"login refused: {e}") from None

    username.__name__ = f"{claim}_username"
    return username


#: For `c.GenericOAuthenticator.username_claim`: the verified e-mail address, or the `sub`
#: claim; a login without it is refused (403), never named from another claim.
verified_email_username = _refusing("email")
sub_username = _refusing("sub")


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
    username_claim: str = "email",
) -> None:
    """Log in through the OpenID Connect provider at `issuer` (`discovery` skips fetching its
    discovery document). Without `allowed_groups`, everyone the provider lets in may log in.
    `username_claim`: `email` (the verified address, in full) or `sub`."""
    if username_claim not in USERNAME_CLAIMS:
        raise OIDCConfigError(
            f"username_claim: {username_claim!r} is not one of {', '.join(USERNAME_CLAIMS)} "
            "(a claim unique per provider)"
        )
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
    g.username_claim = verified_email_username if username_claim == "email" else sub_username
    g.manage_groups = True
    g.auth_state_groups_key = f"oauth_user.{groups_claim}"
    g.admin_groups = set(admin_groups)
    allowed = set(allowed_groups)
    if allowed:
        g.allowed_groups = allowed
    else:
        g.allow_all = True
