"""The single sign-on configurations load into oauthenticator as intended: the Zero to JupyterHub
values (helm-values/oidc-dex.yaml) and the demo's `configure_oidc`."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
import yaml
from oauthenticator.generic import GenericOAuthenticator
from tornado import web
from traitlets.config import Config

from gpuhub import paths
from gpuhub.oidc import OIDCConfigError, UsernameRefused, configure_oidc, username_from

VALUES = paths.config_dir().parent / "helm-values" / "oidc-dex.yaml"


def groups_and_admin(authenticator: GenericOAuthenticator, userinfo: dict) -> tuple:
    """The groups and admin flag a login with `userinfo` gives (run in a thread of its own: the
    browser tests of this folder keep an event loop running in this one)."""

    async def login() -> dict:
        model = {"name": "x", "admin": None, "auth_state": {"oauth_user": userinfo}}
        return await authenticator._apply_managed_groups(model)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        model = pool.submit(asyncio.run, login()).result()
    return model["groups"], model["admin"]


def in_thread(coroutine):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def login(authenticator: GenericOAuthenticator, userinfo: dict) -> str | None:
    """The hub user a login with `userinfo` becomes (None: refused), through oauthenticator's
    own steps after the provider answered (as `OAuthenticator._token_to_auth_model` runs them):
    the user name, the groups, who is allowed."""

    async def steps() -> str | None:
        try:
            name = authenticator.user_info_to_username(userinfo)
        except web.HTTPError as e:
            assert e.status_code == 403
            return None
        model = {"name": name, "admin": None, "auth_state": {"oauth_user": userinfo}}
        model = await authenticator.update_auth_model(model)
        if authenticator.manage_groups:
            model = await authenticator._apply_managed_groups(model)
        try:
            allowed = await authenticator.check_allowed(name, model)
        except web.HTTPError:
            return None
        return name if allowed else None

    return in_thread(steps())


def values_authenticator() -> GenericOAuthenticator:
    """The authenticator the Zero to JupyterHub values configure (hub.config, then extraConfig)."""
    values = yaml.safe_load(VALUES.read_text())
    config = Config(values["hub"]["config"])
    for key in sorted(values["hub"].get("extraConfig", {})):
        exec(values["hub"]["extraConfig"][key], {"c": config, "get_config": lambda: config})
    return GenericOAuthenticator(config=config)


def test_a_user_name_is_a_claim_unique_per_provider():
    verified = {"sub": "x1", "email": "Alice@Gmail.com", "email_verified": True}
    assert username_from(verified) == "alice@gmail.com"
    assert username_from(verified, "sub") == "x1"
    for claims in (
        {"preferred_username": "alice", "email": "alice@gmail.com", "sub": "x"},  # unverified
        {"preferred_username": "alice", "email": "alice@gmail.com", "email_verified": False},
        {"preferred_username": "alice", "sub": "x"},
        {"email": "alice", "email_verified": True},
    ):
        with pytest.raises(UsernameRefused):
            username_from(claims)
    with pytest.raises(UsernameRefused):
        username_from({"preferred_username": "alice"}, "sub")
    with pytest.raises(UsernameRefused, match="username_claim"):
        username_from(verified, "preferred_username")


def test_the_shipped_values_let_nobody_take_a_name_or_walk_in():
    authenticator = values_authenticator()
    assert not authenticator.allow_all
    assert authenticator.allowed_groups == {"gpuhub-users", "gpuhub-admins"}
    member = {"sub": "a", "email": "ada@uni.example", "email_verified": True}
    assert login(authenticator, {**member, "groups": ["gpuhub-users"]}) == "ada@uni.example"
    assert login(authenticator, {**member, "groups": ["hub-admins"]}) == "ada@uni.example"
    # anyone else Dex lets in (a gmail account through a Google connector) is not allowed
    stranger = {"sub": "b", "email": "alice@gmail.com", "email_verified": True}
    assert login(authenticator, {**stranger, "preferred_username": "alice", "groups": []}) is None
    # ... and a member cannot become another user: not by preferred_username, not by an
    # address the provider has not verified
    mallory = {"sub": "m", "preferred_username": "ada", "groups": ["gpuhub-users"]}
    assert login(authenticator, {**mallory, "email": "ada@uni.example"}) is None
    assert (
        login(authenticator, {**mallory, "email": "mallory@uni.example", "email_verified": True})
        == "mallory@uni.example"
    )


def test_zero_to_jupyterhub_values_map_dex_groups_to_hub_groups_and_admins():
    values = yaml.safe_load(VALUES.read_text())
    config = Config(values["hub"]["config"])
    assert config.JupyterHub.authenticator_class == "generic-oauth"
    authenticator = GenericOAuthenticator(config=config)
    assert authenticator.manage_groups
    assert authenticator.userdata_url.endswith("/dex/userinfo")
    assert "groups" in authenticator.scope
    assert groups_and_admin(authenticator, {"groups": ["hub-admins", "ml"]}) == (
        ["hub-admins", "ml"],
        True,
    )
    assert groups_and_admin(authenticator, {"groups": ["students"]}) == (["students"], False)


def test_configure_oidc_from_a_discovery_document():
    c = Config()
    configure_oidc(
        c,
        issuer="https://idp.example.org",
        client_id="hub",
        client_secret="s",
        callback_url="https://hub.example.org/hub/oauth_callback",
        admin_groups=["ops"],
        allowed_groups=["students", "ops"],
        discovery={
            "authorization_endpoint": "https://idp.example.org/auth",
            "token_endpoint": "https://idp.example.org/token",
            "userinfo_endpoint": "https://idp.example.org/userinfo",
        },
    )
    authenticator = GenericOAuthenticator(config=c)
    assert authenticator.token_url == "https://idp.example.org/token"
    assert authenticator.allowed_groups == {"students", "ops"} and not authenticator.allow_all
    assert groups_and_admin(authenticator, {"groups": ["ops"]}) == (["ops"], True)
    ada = {"sub": "u-1", "email": "ada@example.org", "email_verified": True, "groups": ["ops"]}
    assert login(authenticator, ada) == "ada@example.org"
    assert login(authenticator, {**ada, "email_verified": False}) is None
    assert (
        login(authenticator, {"sub": "u-2", "preferred_username": "ada", "groups": ["ops"]}) is None
    )
    with pytest.raises(OIDCConfigError, match="no authorization_endpoint, token_endpoint"):
        configure_oidc(c, issuer="x", client_id="", client_secret="", callback_url="", discovery={})


def test_configure_oidc_takes_only_a_claim_unique_per_provider():
    discovery = {
        "authorization_endpoint": "https://idp/auth",
        "token_endpoint": "https://idp/token",
        "userinfo_endpoint": "https://idp/userinfo",
    }
    common = {"client_id": "h", "client_secret": "s", "callback_url": "https://h/cb"}
    c = Config()
    configure_oidc(c, issuer="https://idp", discovery=discovery, username_claim="sub", **common)
    authenticator = GenericOAuthenticator(config=c)
    assert login(authenticator, {"sub": "u-9", "email": "x@y", "groups": []}) == "u-9"
    with pytest.raises(OIDCConfigError, match="username_claim: 'preferred_username'"):
        configure_oidc(
            Config(),
            issuer="https://idp",
            discovery=discovery,
            username_claim="preferred_username",
            **common,
        )
