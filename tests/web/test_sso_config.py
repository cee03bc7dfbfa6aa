"""The single sign-on configurations load into oauthenticator as intended: the Zero to JupyterHub
values (helm-values/oidc-dex.yaml) and the demo's `configure_oidc`."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
import yaml
from oauthenticator.generic import GenericOAuthenticator
from traitlets.config import Config

from gpuhub import paths
from gpuhub.oidc import OIDCConfigError, configure_oidc

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


def test_zero_to_jupyterhub_values_map_dex_groups_to_hub_groups_and_admins():
    values = yaml.safe_load(VALUES.read_text())
    config = Config(values["hub"]["config"])
    assert config.JupyterHub.authenticator_class == "generic-oauth"
    authenticator = GenericOAuthenticator(config=config)
    assert authenticator.manage_groups and authenticator.allow_all
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
    assert authenticator.username_claim({"preferred_username": "ada"}) == "ada"
    with pytest.raises(OIDCConfigError, match="no authorization_endpoint, token_endpoint"):
        configure_oidc(c, issuer="x", client_id="", client_secret="", callback_url="", discovery={})
