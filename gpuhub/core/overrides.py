"""What admins change at runtime: environments of the catalogue and quotas of groups.

Pure core. Admins submit an environment (from the admin page or the JSON API); `check_environment`
validates it (the catalogue's own rules, image reference syntax, an allow-list of registries, text
that fits on a page) and returns the entry to store, in the shape of one `environments` entry of
the catalogue file. `merge_environments` lays stored entries over the file's catalogue, which is
how the spawn form sees a new environment without a hub restart.

What runs on the host stays the site's decision (docs/security.md): images only from the
registries the site lists (none by default), `local.python` only an interpreter the catalogue
file names, `local.env` only from the file, and a stored entry never replaces an environment of
the file (it can only enable or disable it). Group quotas work the same way:
`check_quota` validates, `merge_group_quotas` lays stored ones over the configured ones.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .catalog import ID_PATTERN, Catalog, CatalogError, Environment, environment_from_dict
from .quotas import UNLIMITED, Quota, QuotaConfig

MAX_DISPLAY_NAME = 100
MAX_DESCRIPTION = 500
MAX_GROUP_NAME = 255

#: The registries environments registered at runtime may use unless the site lists some
#: (`c.GpuhubPages.allowed_registries`): none. "*" allows any registry.
DEFAULT_REGISTRIES: tuple[str, ...] = ()
REGISTRIES_SETTING = "c.GpuhubPages.allowed_registries"
FILE_ONLY_ENV = "environment variables come from the catalogue file only"

ENTRY_FIELDS = (
    "id",
    "display_name",
    "description",
    "image",
    "local",
    "interfaces",
    "groups",
    "enabled",
)


class InputError(ValueError):
    """Something an admin submitted that cannot be used; `field` names it (HTTP 400)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


# -- image references ---------------------------------------------------------------------------
# The grammar of github.com/distribution/reference: [domain[:port]/]path[:tag][@digest].

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"^(?P<name>(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*))"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$"
)
MAX_NAME_LENGTH = 255
DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class ImageReference:
    registry: str  # "docker.io" when the reference names none
    repository: str  # the path in the registry ("library/python" for "python")
    tag: str | None
    digest: str | None

    @property
    def location(self) -> str:
        return f"{self.registry}/{self.repository}"


def parse_image(reference: str) -> ImageReference:
    """Split an image reference; `InputError("image", ...)` when it is not one."""
    if not isinstance(reference, str) or not reference:
        raise InputError("image", "must be an image reference such as quay.io/org/name:tag")
    m = _REFERENCE.match(reference)
    if m is None:
        raise InputError(
            "image",
            f"{_shown(reference)} is not an image reference "
            "([registry/]path[:tag][@digest], lower-case path)",
        )
    if len(m["name"]) > MAX_NAME_LENGTH:
        raise InputError("image", f"the name is longer than {MAX_NAME_LENGTH} characters")
    domain, path = m["domain"], m["path"]
    # As Docker reads it: the first part is a registry only if it looks like a host name.
    if domain is not None and not ("." in domain or ":" in domain or domain == "localhost"):
        domain, path = None, f"{domain}/{path}"
    if domain is None:
        domain = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    return ImageReference(domain.lower(), path, m["tag"], m["digest"])


def registry_allowed(image: ImageReference, allowed: Iterable[str]) -> bool:
    """True if an entry of `allowed` is "*", the image's registry, or a prefix of its location
    ending at a "/" (`quay.io/gpuhub` allows `quay.io/gpuhub/pytorch`, not `quay.io/other`)."""
    location = image.location
    for entry in allowed:
        entry = entry.strip().rstrip("/").lower()
        if entry == "*" or entry == image.registry:
            return True
        if entry and location.startswith(entry + "/"):
            return True
    return False


# -- environments -------------------------------------------------------------------------------


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(value: Any, field: str, limit: int, *, required: bool) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InputError(field, "is required")
        return None
    if not isinstance(value, str):
        raise InputError(field, f"must be text, not {type(value).__name__}")
    value = value.strip()
    if len(value) > limit:
        raise InputError(field, f"must be at most {limit} characters, not {len(value)}")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") and ch not in "\n\t" for ch in value):
        raise InputError(field, "must not contain control characters")
    return value


def group_name(value: Any, field: str) -> str:
    name = _text(value, field, MAX_GROUP_NAME, required=True)
    assert name is not None
    if "," in name or "\n" in name:
        raise InputError(field, f"{_shown(name)} is not a group name (no commas, one line)")
    return name


def _str_list(value: Any, field: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value) if v]
    if not isinstance(value, list | tuple):
        raise InputError(field, f"must be a list of names, not {type(value).__name__}")
    return list(value)


def check_environment(
    data: Any,
    catalog: Catalog,
    allowed_registries: Iterable[str],
    *,
    python_exists: Any = None,
) -> dict[str, Any]:
    """Validate an environment an admin submits; returns the entry to store.

    `data` has the fields of a catalogue file's environment entry (`interfaces` and `groups` may
    also be comma-separated text). The image must parse and come from an allowed registry; one
    of `image` (Kubernetes) and `local.python` (local backend) must be given; `python_exists`,
    when given, is called with the interpreter path and must return True. Raises `InputError`
    naming the field.
    """
    if not isinstance(data, Mapping):
        raise InputError("environment", f"must be an object, not {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in ENTRY_FIELDS)
    if unknown:
        raise InputError(unknown[0], f"unknown field (allowed: {', '.join(ENTRY_FIELDS)})")

    env_id = data.get("id")
    if not isinstance(env_id, str) or not ID_PATTERN.match(env_id):
        raise InputError(
            "id",
            f"{_shown(env_id)} is not a valid id (1-63 lower-case letters, digits, '.', '_', '-',"
            " starting and ending with a letter or digit)",
        )
    if catalog.environment(env_id) is not None and env_id not in catalog.runtime_ids:
        raise InputError(
            "id",
            f"{env_id!r} is an environment of the catalogue file: change it there "
            "(here it can only be enabled or disabled)",
        )
    entry: dict[str, Any] = {"id": env_id}
    entry["display_name"] = _text(
        data.get("display_name"), "display_name", MAX_DISPLAY_NAME, required=False
    ) or (env_id)
    description = _text(data.get("description"), "description", MAX_DESCRIPTION, required=False)
    if description:
        entry["description"] = description

    image = data.get("image")
    if image is not None and not (isinstance(image, str) and not image.strip()):
        if not isinstance(image, str):
            raise InputError("image", f"must be text, not {type(image).__name__}")
        image = image.strip()
        ref = parse_image(image)
        allowed = list(allowed_registries)
        if not registry_allowed(ref, allowed):
            listed = (
                ", ".join(allowed)
                or "none; the site lists them in c.GpuhubPages.allowed_registries"
            )
            raise InputError(
                "image", f"registry {ref.registry!r} is not allowed here (allowed: {listed})"
            )
        entry["image"] = image

    local = data.get("local") or {}
    if not isinstance(local, Mapping):
        raise InputError("local", f"must be an object, not {type(local).__name__}")
    extra = sorted(str(k) for k in local if k not in ("python", "kernel_display_name", "env"))
    if extra:
        raise InputError(f"local.{extra[0]}", "unknown field")
    local_entry: dict[str, Any] = {}
    python = _text(local.get("python"), "local.python", 4096, required=False)
    if python:
        if not python.startswith("/"):
            raise InputError("local.python", f"must be an absolute path, not {_shown(python)}")
        interpreters = catalog.file_interpreters()
        if python not in interpreters:
            raise InputError(
                "local.python",
                f"{_shown(python)} is not an interpreter of the catalogue file (allowed: "
                f"{', '.join(interpreters) or 'none'})",
            )
        if python_exists is not None and not python_exists(python):
            raise InputError("local.python", f"no executable {_shown(python)} on the hub's host")
        local_entry["python"] = python
    kernel_name = _text(
        local.get("kernel_display_name"),
        "local.kernel_display_name",
        MAX_DISPLAY_NAME,
        required=False,
    )
    if kernel_name:
        local_entry["kernel_display_name"] = kernel_name
    if local.get("env"):
        raise InputError("local.env", FILE_ONLY_ENV)
    if local_entry:
        entry["local"] = local_entry
    if "image" not in entry and "python" not in local_entry:
        raise InputError(
            "image", "give an image (Kubernetes) or local.python (local backend), or both"
        )

    interfaces = _str_list(data.get("interfaces"), "interfaces")
    if interfaces is not None:
        entry["interfaces"] = interfaces
    groups = _str_list(data.get("groups"), "groups")
    if groups:
        entry["groups"] = sorted({group_name(g, f"groups[{i}]") for i, g in enumerate(groups)})
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise InputError("enabled", f"must be true or false, not {_shown(enabled)}")
    entry["enabled"] = enabled

    # The catalogue's own rules (known interfaces, the shape of local.env, ...).
    try:
        environment_from_dict(entry, [i.id for i in catalog.interfaces], source="environment")
    except CatalogError as e:
        raise InputError(e.field, e.problem) from e
    return entry


def environment_entry(environment: Environment) -> dict[str, Any]:
    """The catalogue entry of `environment` (to edit one that comes from the file)."""
    entry: dict[str, Any] = {
        "id": environment.id,
        "display_name": environment.display_name,
        "interfaces": list(environment.interfaces),
        "enabled": environment.enabled,
    }
    if environment.description:
        entry["description"] = environment.description
    if environment.image:
        entry["image"] = environment.image
    local = {
        k: v
        for k, v in (
            ("python", environment.local.python),
            ("kernel_display_name", environment.local.kernel_display_name),
            ("env", dict(environment.local.env)),
        )
        if v
    }
    if local:
        entry["local"] = local
    if environment.groups:
        entry["groups"] = sorted(environment.groups)
    return entry


@dataclass(frozen=True)
class Merged:
    """The catalogue in force, and the stored entries that could not be used (id, why)."""

    catalog: Catalog
    problems: tuple[tuple[str, str], ...] = ()


def _runtime_problem(environment: Environment, interpreters: list[str]) -> str | None:
    """Why a stored environment may not run (stored before these rules, or written to the store
    directly), or None."""
    if environment.local.env:
        return f"local.env: {FILE_ONLY_ENV}"
    python = environment.local.python
    if python and python not in interpreters:
        return f"local.python: {python!r} is not an interpreter of the catalogue file"
    return None


def merge_environments(catalog: Catalog, entries: Iterable[Mapping[str, Any]]) -> Merged:
    """`catalog` (the file's) with the stored `entries` laid over it: an entry with the id of a
    file environment only enables or disables it (everything else stays the file's); any other
    entry comes after the file's environments.

    An entry the catalogue cannot use (an interface since removed from the file, an interpreter
    or environment variables not from the file) is left out and reported, so one stale entry
    never takes the spawn form down.
    """
    interface_ids = [i.id for i in catalog.interfaces]
    environments = list(catalog.environments)
    in_file = {e.id for e in environments}
    interpreters = catalog.file_interpreters()
    positions = {e.id: i for i, e in enumerate(environments)}
    problems: list[tuple[str, str]] = []
    for data in entries:
        env_id = str(data.get("id", "?")) if isinstance(data, Mapping) else "?"
        try:
            environment = environment_from_dict(
                data, interface_ids, source="stored environment", path=env_id
            )
        except CatalogError as e:
            problems.append((env_id, str(e)))
            continue
        if environment.id in in_file:
            position = positions[environment.id]
            environments[position] = replace(environments[position], enabled=environment.enabled)
            continue
        problem = _runtime_problem(environment, interpreters)
        if problem is not None:
            problems.append((env_id, problem))
            continue
        if environment.id in positions:
            environments[positions[environment.id]] = environment
        else:
            positions[environment.id] = len(environments)
            environments.append(environment)
    runtime_ids = frozenset(e.id for e in environments if e.id not in in_file)
    merged = replace(catalog, environments=tuple(environments), runtime_ids=runtime_ids)
    return Merged(merged, tuple(problems))


# -- group quotas -------------------------------------------------------------------------------

LimitInput = int | str | None


def _limit(value: Any, field: str) -> int | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "-", "not set"):
            return None
        if text == UNLIMITED:
            return UNLIMITED
        if text.isascii() and text.isdigit() and len(text) <= 6:
            return int(text)
        raise InputError(field, f"must be a whole number >= 0, 'unlimited' or empty, not {value!r}")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 999_999:
        raise InputError(field, f"must be a whole number >= 0, 'unlimited' or null, not {value!r}")
    return value


@dataclass(frozen=True)
class GroupQuota:
    group: str
    max_gpus: int | str | None
    max_servers: int | str | None

    def quota(self) -> Quota:
        return Quota(self.max_gpus, self.max_servers)  # type: ignore[arg-type]


def check_quota(group: Any, max_gpus: Any, max_servers: Any) -> GroupQuota:
    """A group's quota as an admin submits it: each limit a whole number, "unlimited", or empty
    (not set by the group: its other groups or the default decide)."""
    return GroupQuota(
        group_name(group, "group"), _limit(max_gpus, "max_gpus"), _limit(max_servers, "max_servers")
    )


def merge_group_quotas(config: QuotaConfig, stored: Iterable[GroupQuota]) -> QuotaConfig:
    """`config` with the stored group quotas replacing the configured ones of the same group."""
    groups = dict(config.groups)
    for q in stored:
        configured = groups.get(q.group)
        # admins set GPU and server limits here; a weekly budget stays the configured one
        budget = configured.weekly_gpu_hours if configured else None
        groups[q.group] = replace(q.quota(), weekly_gpu_hours=budget)
    return replace(config, groups=groups)
