"""Who may hold what: quotas and admission.

Pure core. Limits come from config as `QuotaConfig`; usage is counted by the adapters and handed in
as `Usage`. A user in several groups gets the most generous limit of each kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .options import Selection

UNLIMITED: Literal["unlimited"] = "unlimited"
LimitValue = int | Literal["unlimited"] | None


@dataclass(frozen=True)
class Quota:
    """Limits on what one user holds at once.

    Each is a number, `UNLIMITED`, or `None` when this entry does not set it (a group that limits
    servers only leaves the GPU limit to the user's other groups or the default).
    """

    max_gpus: LimitValue = None
    max_servers: LimitValue = None


@dataclass(frozen=True)
class QuotaConfig:
    default: Quota = Quota(UNLIMITED, UNLIMITED)
    groups: Mapping[str, Quota] = field(default_factory=dict)
    users: Mapping[str, Quota] = field(default_factory=dict)


@dataclass(frozen=True)
class Limit:
    """One effective limit and where it comes from ("group students", "user ada", "default")."""

    value: int | None  # None: unlimited
    source: str


@dataclass(frozen=True)
class EffectiveQuota:
    gpus: Limit
    servers: Limit


@dataclass(frozen=True)
class Usage:
    """What a user holds now, not counting the server being started, and the GPUs their other
    servers wait for in the queue (they will hold them once a GPU is free)."""

    gpus: int = 0
    servers: int = 0
    queued_gpus: int = 0


class QuotaExceeded(Exception):
    """A spawn that would go over a limit; the message says usage, limit and its source."""

    def __init__(self, message: str, usage: int, limit: Limit) -> None:
        self.usage = usage
        self.limit = limit
        super().__init__(message)


def _most_generous(candidates: list[tuple[LimitValue, str]]) -> Limit:
    """The largest of the limits that are set; unlimited beats any number."""
    candidates = [(v, source) for v, source in candidates if v is not None]
    if not candidates:
        return Limit(None, "default")
    for value, source in candidates:
        if value == UNLIMITED:
            return Limit(None, source)
    value, source = max(candidates, key=lambda c: int(c[0]))  # type: ignore[arg-type]
    return Limit(int(value), source)  # type: ignore[arg-type]


def effective_quota(user: str, groups: Iterable[str], config: QuotaConfig) -> EffectiveQuota:
    """The limits that apply to `user`, each from the most specific entry that sets it.

    A per-user limit wins over group limits; otherwise the most generous of the user's groups that
    set one applies; otherwise the default.
    """
    user_quota = config.users.get(user, Quota())
    named = sorted(g for g in set(groups) if g in config.groups)

    def resolve(kind: str) -> Limit:
        own = getattr(user_quota, kind)
        if own is not None:
            return _most_generous([(own, f"user {user}")])
        from_groups = [(getattr(config.groups[g], kind), f"group {g}") for g in named]
        from_groups = [c for c in from_groups if c[0] is not None]
        return _most_generous(from_groups or [(getattr(config.default, kind), "default")])

    return EffectiveQuota(gpus=resolve("max_gpus"), servers=resolve("max_servers"))


def _allowed_to(limit: Limit) -> str:
    if limit.source == "default":
        return "allowed"
    return f"allowed to {limit.source}"


def _plural(n: int | None, word: str) -> str:
    return f"{word}s" if n != 1 else word


def admit(selection: Selection, usage: Usage, quota: EffectiveQuota) -> None:
    """Refuse with `QuotaExceeded` a spawn of `selection` that would go over a limit."""
    servers = quota.servers
    if servers.value is not None and usage.servers + 1 > servers.value:
        raise QuotaExceeded(
            f"you run {usage.servers} of the {servers.value} "
            f"{_plural(servers.value, 'server')} {_allowed_to(servers)}: "
            "stop one before starting another",
            usage.servers,
            servers,
        )
    gpus = quota.gpus
    counted = usage.gpus + usage.queued_gpus
    if selection.gpus and gpus.value is not None and counted + selection.gpus > gpus.value:
        raise gpu_quota_exceeded(usage, selection.gpus, gpus)


def gpu_quota_exceeded(usage: Usage, wanted: int, limit: Limit) -> QuotaExceeded:
    """The refusal of `wanted` more GPUs to a user with `usage` under `limit`."""
    waiting = f" and wait for {usage.queued_gpus}" if usage.queued_gpus else ""
    return QuotaExceeded(
        f"you hold {usage.gpus}{waiting} of the {limit.value} {_plural(limit.value, 'GPU')} "
        f"{_allowed_to(limit)}; {wanted} more would go over the limit",
        usage.gpus + usage.queued_gpus,
        limit,
    )


def quota_config_from_dict(data: Mapping[str, Any] | None) -> QuotaConfig:
    """Quotas from plain config: `{"default": {...}, "groups": {name: {...}}, "users": {...}}`.

    Each limit is `{"max_gpus": int | None, "max_servers": int | None}`; a missing key means
    not set by this entry, `"unlimited"` lifts the limit. Raises `ValueError` naming the field.
    """
    data = data or {}
    if not isinstance(data, Mapping):
        raise ValueError("quotas: must be a mapping")
    unknown = set(data) - {"default", "groups", "users"}
    if unknown:
        raise ValueError(f"quotas.{sorted(unknown)[0]}: unknown field")

    def one(path: str, value: Any) -> Quota:
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: must be a mapping")
        extra = set(value) - {"max_gpus", "max_servers"}
        if extra:
            raise ValueError(f"{path}.{sorted(extra)[0]}: unknown field")
        out = {}
        for key in ("max_gpus", "max_servers"):
            v = value.get(key)
            if (
                v is not None
                and v != UNLIMITED
                and (isinstance(v, bool) or not isinstance(v, int) or v < 0)
            ):
                raise ValueError(f"{path}.{key}: must be an integer >= 0 or 'unlimited', not {v!r}")
            out[key] = v
        return Quota(**out)

    def table(key: str) -> dict[str, Quota]:
        value = data.get(key)
        value = {} if value is None else value
        if not isinstance(value, Mapping):
            raise ValueError(f"quotas.{key}: must be a mapping")
        return {str(k): one(f"quotas.{key}.{k}", v) for k, v in value.items()}

    default = one("quotas.default", data.get("default") or {})
    return QuotaConfig(
        default=Quota(
            default.max_gpus if default.max_gpus is not None else UNLIMITED,
            default.max_servers if default.max_servers is not None else UNLIMITED,
        ),
        groups=table("groups"),
        users=table("users"),
    )
