"""Keeping a GPU: a user's "keep it for 1 h" before a release, bounded by the service's policy.

A keep comes only from the server it is for (a `keep` request in that server's own report,
`gpuhub.core.protocol.UserRequest`), so a user keeps only their own server's GPU. It is honoured
within the policy: at most the group's maximum (`KeepRules.max_keep`, the most generous of the
user's groups, else `max_keep_default`; 0 refuses keeps), and never while someone has waited
longer than `refuse_after_wait` for a GPU of that type (a keep in force stops protecting the
GPU then, too). A keep holds only for the run of the server it was asked in, protects from the
idle rules (idle release, release under demand, server idle stop), never from the maximum lease.

Every keep is a row of the action history (kind "keep", its end in `user_options["keep_until"]`),
so the admins see it, and a restarted service finds the keeps in force again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .actions import Ledger, RunKey, run_key
from .servers import RunningServer

KEEP = "keep"
RULE_KEEP = "user-keep"


def _hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min"


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M UTC")


@dataclass(frozen=True)
class KeepRules:
    """`max_keep`: seconds per group (None: the default applies); `max_keep_default` for users in
    none of them; `refuse_after_wait`: no keep while someone has waited this long."""

    max_keep: Mapping[str, float] = field(default_factory=dict)
    max_keep_default: float = 4 * 3600.0
    refuse_after_wait: float = 900.0

    def __post_init__(self) -> None:
        for group, seconds in self.max_keep.items():
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
                raise ValueError(f"max_keep[{group!r}]: must be seconds >= 0, not {seconds!r}")
        if self.max_keep_default < 0:
            raise ValueError("max_keep_default: must be >= 0")
        if self.refuse_after_wait < 0:
            raise ValueError("refuse_after_wait: must be >= 0")

    def max_for(self, groups: Iterable[str]) -> float:
        """The longest keep for a member of `groups` (the most generous group)."""
        found = [float(self.max_keep[g]) for g in groups if g in self.max_keep]
        return max(found) if found else self.max_keep_default


@dataclass(frozen=True)
class KeepAnswer:
    ok: bool
    message: str
    until: float | None = None


class Keeps:
    """The keeps in force, by run of a server; rebuilt from the action history."""

    def __init__(self, ledger: Ledger, rules: KeepRules) -> None:
        self.ledger = ledger
        self.rules = rules

    def until(self, server: RunningServer, now: float | None = None) -> float | None:
        """When the keep of this run of `server` ends (None: no keep in force)."""
        now = time.time() if now is None else now
        found = None
        for row in self.ledger.for_run(run_key(server)):
            if row.kind != KEEP or row.status != "done":
                continue
            end = _keep_until(row.user_options)
            if end is not None and end > now:
                found = max(found or 0.0, end)
        return found

    def refusal(self, server: RunningServer, longest_wait: float) -> str | None:
        """Why a keep of `server` is not possible now (None: it is)."""
        if server.gpus <= 0:
            return "this server holds no GPU"
        if self.rules.max_for(server.groups) <= 0:
            return "your groups may not keep GPUs"
        if longest_wait > self.rules.refuse_after_wait:
            return (
                f"someone has waited {_hours(longest_wait // 60 * 60)} for a GPU of this type, "
                f"longer than the {_hours(self.rules.refuse_after_wait)} a keep allows"
            )
        return None

    def ask(
        self,
        server: RunningServer,
        seconds: float,
        longest_wait: float,
        now: float | None = None,
    ) -> KeepAnswer:
        """Keep `server`'s GPUs `seconds` from now, if the policy allows (recorded)."""
        now = time.time() if now is None else now
        refused = self.refusal(server, longest_wait)
        if refused is not None:
            return KeepAnswer(False, f"not kept: {refused}")
        most = self.rules.max_for(server.groups)
        if seconds > most:
            return KeepAnswer(
                False, f"not kept: at most {_hours(most)} for your groups, not {_hours(seconds)}"
            )
        until = now + seconds
        current = self.until(server, now)
        if current is not None and current >= until:
            return KeepAnswer(True, f"already kept until {_clock(current)}", current)
        self.ledger.record(
            user=server.user,
            server=server.server,
            kind=KEEP,
            rule=RULE_KEEP,
            reason=f"{server.user} kept the GPU for {_hours(seconds)}, until {_clock(until)}",
            actor=server.user,
            status="done",
            server_started=server.started,
            gpus=server.gpus,
            gpu_type=server.gpu_type,
            user_options={"keep_until": until, "keep_seconds": seconds},
        )
        return KeepAnswer(True, f"kept until {_clock(until)}", until)

    def active(self, now: float | None = None) -> list[dict[str, Any]]:
        """The keeps in force (for the admin page)."""
        now = time.time() if now is None else now
        out: dict[RunKey, dict[str, Any]] = {}
        for row in self.ledger.rows.values():
            if row.kind != KEEP or row.status != "done":
                continue
            end = _keep_until(row.user_options)
            if end is None or end <= now:
                continue
            run = (row.user, row.server, row.server_started)
            if run not in out or out[run]["until"] < end:
                out[run] = {
                    "user": row.user,
                    "server": row.server,
                    "until": end,
                    "gpus": row.gpus,
                    "gpu_type": row.gpu_type,
                    "reason": row.reason,
                }
        return sorted(out.values(), key=lambda k: k["until"])


def _keep_until(options: Mapping[str, Any] | None) -> float | None:
    value = (options or {}).get("keep_until")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
