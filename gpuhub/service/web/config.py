"""Settings of gpuhub's pages in the hub (`c.GpuhubPages.<setting>` in the service's config)."""

from __future__ import annotations

from traitlets import Bool, Float, Int, List, Unicode
from traitlets.config import Configurable

from ...core.overrides import DEFAULT_REGISTRIES
from ...settings import GpuhubConfig

ADMIN_SCOPE = "custom:gpuhub:admin"


class GpuhubPages(Configurable):
    """The user and admin pages of the gpuhub service, and their JSON API."""

    admin_scope = Unicode(
        ADMIN_SCOPE,
        config=True,
        help="""The custom scope that makes a user a gpuhub admin on these pages and in the
        API. The hub configuration defines it (`c.JupyterHub.custom_scopes`) and grants it to the
        groups that administer GPUs; the service asks for it in its OAuth tokens
        (`oauth_client_allowed_scopes`).""",
    )

    hub_admins_are_admins = Bool(
        True,
        config=True,
        help="""Hub admins are gpuhub admins too, when their token carries the hub's `admin-ui`
        scope (JupyterHub does not let a deployment add scopes to its `admin` role; the pages ask
        for `admin-ui` at login). The `admin` flag alone is never enough: a hub admin's token
        with fewer scopes is not a gpuhub admin's.""",
    )

    allowed_registries = List(
        Unicode(),
        default_value=list(DEFAULT_REGISTRIES),
        config=True,
        help="""Registries (or registry/namespace prefixes, such as `quay.io/gpuhub`) that
        environments registered at runtime may take their images from. Empty (the default): no
        image can be set at runtime, only the catalogue file's. `*` allows any registry (every
        user's next server may then run any public image a gpuhub admin names).""",
    )

    check_local_python = Bool(
        True,
        config=True,
        help="""Refuse an environment whose `local.python` is not an executable on the service's
        machine. Turn off when the service does not run where the local servers do.""",
    )

    quotas_file = Unicode(
        "",
        config=True,
        help="""The quota file the spawners use (the YAML behind `c.GPUSpawnerMixin.quotas`), shown
        on the quota page under the group quotas admins set here. Empty: none configured.""",
    )

    snapshot_home_template = Unicode(
        "",
        config=True,
        help="""The home folder of a user on the service's machine (`{username}` is replaced),
        for listing, deleting and choosing snapshots while none of the user's servers runs (the
        local backend). Empty: snapshots are reached through the user's running server only.""",
    )

    snapshot_dir = Unicode(
        ".gpuhub/snapshots",
        config=True,
        help="Snapshot folder inside a home folder (the server extension's `snapshot_dir`).",
    )

    status_timeout = Float(
        10.0,
        config=True,
        help="""Seconds the pages wait for the hub's API, or for a user's server to carry out a
        snapshot listing, deletion or choice.""",
    )
    hub_concurrency = Int(
        5,
        config=True,
        help="""Requests of the pages to the hub's REST API in flight at once, at most (apart from
        the service's cycle, which has its own).""",
    )

    history_limit = Int(
        50, config=True, help="Releases and stops shown in a user's history and the admin's."
    )

    privileged_groups = List(
        Unicode(),
        default_value=["gpuhub-admins", "hub-admins", "admins"],
        config=True,
        help="""Groups that give their members rights (besides every group bound to a hub role
        other than `user`, read from the hub). Registering users into one of them from a CSV
        file is refused unless the admin confirms it (`allow_privileged_groups`).""",
    )

    max_upload_bytes = Int(
        2 * 1024 * 1024,
        config=True,
        help="Largest CSV file of users accepted for registration, in bytes.",
    )

    activity_window = Float(
        3600.0,
        config=True,
        help="Seconds of GPU utilisation the sparklines show.",
    )

    @property
    def shared(self) -> GpuhubConfig:
        """`c.GpuhubConfig`: the settings shared with the spawners and the service (the
        service's own when it runs the pages)."""
        shared = getattr(self.parent, "gpuhub_config", None)
        if not isinstance(shared, GpuhubConfig):
            shared = self.__dict__.get("_gpuhub_config") or GpuhubConfig(parent=self)
            self.__dict__["_gpuhub_config"] = shared
        return shared

    @property
    def queue_stale_after(self) -> float:
        """`c.GpuhubConfig.queue_stale_after`, shared with the spawners and the service."""
        return self.shared.queue_stale_after

    typical_gpu_hold = Float(
        3600.0,
        config=True,
        help="""Seconds a GPU is typically held, for the estimated wait shown with a queue place
        (the spawners' `queue_typical_hold`).""",
    )
