"""What the hub's configuration needs for gpuhub's pages: one call from jupyterhub_config.py.

    from gpuhub.service.web.hub_config import configure_pages
    configure_pages(c, gpuhub_service, admin_groups=["gpuhub-admins"])

- every user may open the pages (`access:services!service=gpuhub` added to the `user` role);
- the custom scope `custom:gpuhub:admin` is defined and granted to `admin_groups` (hub admins
  are gpuhub admins too: JupyterHub does not let a deployment add scopes to its `admin` role, so
  the pages also check the user's `admin` flag);
- the service may ask for that scope (and the hub's `admin-ui`, which marks a hub admin) in the
  OAuth tokens of the people using its pages, and for the scopes that registering users takes;
  it asks for the latter only when a hub admin registers users (`oauth.py`), and the hub grants
  each person only what they hold;
- the service is listed in the hub's Services menu, and the hub's navigation bar links the pages
  (gpuhub's `templates/hub/page.html`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ... import paths
from .config import ADMIN_SCOPE
from .oauth import HUB_ADMIN_SCOPE, REGISTRATION_SCOPES

ADMIN_ROLE = "gpuhub-admins"


def hub_templates() -> str:
    return str(paths.templates_dir() / "hub")


def configure_pages(
    c: Any,
    service: dict[str, Any],
    *,
    admin_groups: Iterable[str] = (ADMIN_ROLE,),
    service_name: str = "gpuhub",
    navigation: bool = True,
) -> None:
    """Configure the hub (`c`) and the service's entry of `c.JupyterHub.services` (`service`)."""
    service["display"] = True
    service["oauth_no_confirm"] = True
    # What the pages may ask for; they ask at login only for the first two (`oauth.py`), the
    # registration scopes only when a hub admin registers users.
    service["oauth_client_allowed_scopes"] = [ADMIN_SCOPE, HUB_ADMIN_SCOPE, *REGISTRATION_SCOPES]
    c.JupyterHub.custom_scopes.update(
        {
            ADMIN_SCOPE: {
                "description": "Administer gpuhub: every GPU, releases and stops, the "
                "environment catalogue, quotas.",
            }
        }
    )
    access = f"access:services!service={service_name}"
    c.JupyterHub.load_roles.append(
        {"name": "user", "description": "Standard user privileges", "scopes": ["self", access]}
    )
    groups = sorted(set(admin_groups))
    if groups:
        c.JupyterHub.load_roles.append(
            {
                "name": ADMIN_ROLE,
                "description": "gpuhub administrators",
                "scopes": [ADMIN_SCOPE, access],
                "groups": groups,
            }
        )
    if navigation:
        c.JupyterHub.template_paths.insert(0, hub_templates())
