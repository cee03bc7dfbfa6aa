"""Who may hold what: quotas and admission.

Pure core. Limits come from config as `QuotaConfig`; usage is counted by the adapters and handed in
as `Usage`. A user in several groups gets the most generous limit of each kind. The weekly
GPU-hour budget (`weekly_gpu_hours`) is resolved the same way (`effective_budget`) and checked at
admission against the GPU-hours the user held this week (`check_budget`); the group a user's
GPU-hours are counted under follows the same rule (`accounting_group`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .options import Selection

UNLIMITED: Literal["unlimited"] = "unlimited"
#: When a week's budget renews (weeks run from Monday 00:00 UTC, `gpuhub.core.accounting`).
RENEWAL = "Monday 00:00 UTC"
LimitValue = int | Literal["unlimited"] | None


@dataclass(frozen=True)
class Quota:
    """Limits on what one user holds at once.

    Each is a number, `UNLIMITED`, or `None` when this entry does not set it (a group that limits
    servers only leaves the GPU limit to the user's other groups or the default).
    """

    max_gpus: LimitValue = None
    max_servers: LimitValue = None
    #: GPU-hours a user may hold per week (Monday 00:00 UTC to Monday), a number >= 0
    weekly_gpu_hours: float | Literal["unlimited"] | None = None


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


def _resolve(user: str, groups: Iterable[str], config: QuotaConfig, kind: str) -> list[Any]:
    """The candidates for limit `kind`: the user's own entry, else the user's groups that set
    it, else the default."""
    own = getattr(config.users.get(user, Quota()), kind)
    if own is not None:
        return [(own, f"user {user}")]
    named = sorted(g for g in set(groups) if g in config.groups)
    from_groups = [(getattr(config.groups[g], kind), f"group {g}") for g in named]
    from_groups = [c for c in from_groups if c[0] is not None]
    return from_groups or [(getattr(config.default, kind), "default")]


def effective_quota(user: str, groups: Iterable[str], config: QuotaConfig) -> EffectiveQuota:
    """The limits that apply to `user`, each from the most specific entry that sets it.

    A per-user limit wins over group limits; otherwise the most generous of the user's groups that
    set one applies; otherwise the default.
    """
    return EffectiveQuota(
        gpus=_most_generous(_resolve(user, groups, config, "max_gpus")),
        servers=_most_generous(_resolve(user, groups, config, "max_servers")),
    )


# -- weekly GPU-hour budgets ---------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """A user's weekly GPU-hour budget and where it comes from ("group students", "user ada",
    "default"); `hours` None: no budget."""

    hours: float | None
    source: str

    @property
    def seconds(self) -> float | None:
        return None if self.hours is None else self.hours * 3600.0

    def remaining(self, used_seconds: float) -> float | None:
        """GPU-seconds left this week (None: no budget)."""
        return None if self.seconds is None else max(0.0, self.seconds - used_seconds)


def effective_budget(user: str, groups: Iterable[str], config: QuotaConfig) -> Budget:
    """The weekly budget of `user`: a per-user entry wins, else the most generous of the user's
    groups that set one, else the default; a group the user is not in never applies."""
    candidates = [c for c in _resolve(user, groups, config, "weekly_gpu_hours") if c[0] is not None]
    if not candidates:
        return Budget(None, "default")
    for value, source in candidates:
        if value == UNLIMITED:
            return Budget(None, source)
    value, source = max(candidates, key=lambda c: float(c[0]))
    return Budget(float(value), source)


def user_budget(
    user: str,
    groups: Iterable[str],
    config: QuotaConfig,
    *,
    admin: bool = False,
    exempt_admins: bool = False,
) -> Budget:
    """`effective_budget`, except for hub admins where the site exempts them."""
    if admin and exempt_admins:
        return Budget(None, "hub admins are exempt")
    return effective_budget(user, groups, config)


def accounting_group(user: str, groups: Iterable[str], config: QuotaConfig) -> str:
    """The group a user's GPU-hours are counted under, by the rule the quotas use to pick one of
    the user's groups: the group whose weekly budget applies, else the group whose GPU limit
    applies, else "" (the default or a per-user entry applies)."""
    for source in (
        effective_budget(user, groups, config).source,
        effective_quota(user, groups, config).gpus.source,
    ):
        if source.startswith("group "):
            return source[len("group ") :]
    return ""


class BudgetExceeded(QuotaExceeded):
    """A GPU spawn of a user who used up their weekly GPU-hour budget."""


def budget_owner(source: str) -> str:
    return "the default budget" if source == "default" else source


def hours_text(seconds: float) -> str:
    """GPU-hours with at most two decimals, rounded down, so that a use is never shown as more
    than it is ("39.99", "40", "0.25")."""
    hundredths = int(max(0.0, seconds) / 36.0 + 1e-9)
    whole, rest = divmod(hundredths, 100)
    return f"{whole}" if rest == 0 else f"{whole}.{rest:02d}".rstrip("0")


def check_budget(selection: Selection, used_seconds: float, budget: Budget) -> None:
    """Refuse with `BudgetExceeded` a spawn with GPUs once the week's budget is used up (a spawn
    without GPUs always passes)."""
    if not selection.gpus or budget.seconds is None or used_seconds < budget.seconds:
        return
    raise BudgetExceeded(
        f"you used {hours_text(used_seconds)} of the {hours_text(budget.seconds)} GPU-hours "
        f"of {budget_owner(budget.source)} this week; the budget renews {RENEWAL}",
        int(used_seconds // 3600),
        Limit(int(budget.hours or 0), budget.source),
    )


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

    Each limit is `{"max_gpus": int | None, "max_servers": int | None, "weekly_gpu_hours":
    number | None}`; a missing key means not set by this entry, `"unlimited"` lifts the limit.
    Raises `ValueError` naming the field.
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
        extra = set(value) - {"max_gpus", "max_servers", "weekly_gpu_hours"}
        if extra:
            raise ValueError(f"{path}.{sorted(extra)[0]}: unknown field")
        out: dict[str, Any] = {}
        hours = value.get("weekly_gpu_hours")
        if (
            hours is not None
            and hours != UNLIMITED
            and (
                isinstance(hours, bool)
                or not isinstance(hours, int | float)
                or not math.isfinite(hours)
                or hours < 0
            )
        ):
            raise ValueError(
                f"{path}.weekly_gpu_hours: must be a number of hours >= 0 or 'unlimited', "
                f"not {hours!r}"
            )
        out["weekly_gpu_hours"] = hours
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
            default.weekly_gpu_hours,
        ),
        groups=table("groups"),
        users=table("users"),
    )
