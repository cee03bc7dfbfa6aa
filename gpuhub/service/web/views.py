"""What the pages and the JSON API show, built from plain data.

Pure: hub user models, servers' status documents, store records and core values in; plain,
JSON-ready dicts out. The JSON API returns these dicts as they are and the templates render
them, so the pages and the API never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from ...core import queue as queue_core
from ...core.accounting import Usage
from ...core.catalog import Catalog
from ...core.quotas import RENEWAL, Budget, EffectiveQuota, Limit, budget_owner, hours_text
from ...store import MeasuredCapacity

STATES = ("busy", "idle", "unknown", "unavailable")
KIND_WORDS = {
    "release": "GPU released",
    "stop": "Server stopped",
    "warn": "Warning",
    "give-back": "GPU asked back",
    "keep": "GPU kept",
}
PENDING_WORDS = {"spawn": "starting", "stop": "stopping"}


# -- formatting ---------------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    """`45 s`, `12 min`, `3 h 5 min`, `2 d 4 h` ("" when unknown)."""
    if seconds is None:
        return ""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    m = s // 60
    if m < 60:
        return f"{m} min"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(h, 24)
    return f"{d} d {h} h" if h else f"{d} d"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 10 else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.0f} TiB"


def iso(t: datetime | float | None) -> str | None:
    if t is None:
        return None
    if isinstance(t, int | float):
        t = datetime.fromtimestamp(t, timezone.utc)
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def fmt_time(t: datetime | None) -> str:
    """`2026-11-29 14:05:09 UTC` ("" when unknown)."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if t else ""


def ago(t: datetime | None, now: datetime) -> str:
    if t is None:
        return ""
    return f"{fmt_duration((now - t).total_seconds())} ago"


def server_label(server: str) -> str:
    return server or "default"


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# -- GPUs and servers ---------------------------------------------------------------------------


def gpu_from_status(gpu: Mapping[str, Any]) -> dict[str, Any]:
    """One GPU of a server's status document, as the pages show it."""
    util = gpu.get("utilization") if isinstance(gpu.get("utilization"), Mapping) else {}
    memory = gpu.get("memory") if isinstance(gpu.get("memory"), Mapping) else {}
    state = gpu.get("state") if gpu.get("state") in STATES else "unknown"
    idle_for = _num(gpu.get("idle_for_s")) if state == "idle" else None
    busy_fraction = _num(util.get("busy_fraction"))
    return {
        "uuid": str(gpu.get("uuid") or ""),
        "index": gpu.get("index") if isinstance(gpu.get("index"), int) else None,
        "name": str(gpu.get("name") or "GPU"),
        "mig": bool(gpu.get("mig")),
        "simulated": bool(gpu.get("simulated")),
        "state": state,
        "reason": str(gpu.get("reason") or ""),
        "utilization": _num(util.get("gpu")),
        "memory_utilization": _num(util.get("memory")),
        "busy_fraction": busy_fraction,
        "window_s": _num(util.get("window_s")),
        "idle_for_s": idle_for,
        "idle_for": fmt_duration(idle_for),
        "memory_used": _num(memory.get("used")),
        "memory_total": _num(memory.get("total")),
        "memory": fmt_bytes(_num(memory.get("total"))),
    }


def server_entry(
    user: str,
    name: str,
    model: Mapping[str, Any] | None,
    status: Mapping[str, Any] | None,
    status_error: str | None,
    held: int,
    catalog: Catalog | None,
    now: datetime,
) -> dict[str, Any]:
    """One of a user's servers: how it runs, and the GPUs it holds."""
    model = model or {}
    options = model.get("user_options") if isinstance(model.get("user_options"), Mapping) else {}
    env_id = options.get("environment") if isinstance(options.get("environment"), str) else None
    interface_id = options.get("interface") if isinstance(options.get("interface"), str) else None
    environment = catalog.environment(env_id) if catalog and env_id else None
    interface = catalog.interface(interface_id) if catalog and interface_id else None
    if model.get("ready"):
        state = "ready"
    elif model.get("pending"):
        state = PENDING_WORDS.get(str(model.get("pending")), str(model.get("pending")))
    else:
        state = "stopped"
    gpus = [gpu_from_status(g) for g in (status or {}).get("gpus") or () if isinstance(g, Mapping)]
    fractions = [g["busy_fraction"] for g in gpus if g["busy_fraction"] is not None]
    started = parse_time(model.get("started"))
    asked = options.get("gpus") if isinstance(options.get("gpus"), int) else 0
    return {
        "name": name,
        "label": server_label(name),
        "url": model.get("url"),
        "state": state,
        "started": iso(started),
        "running_for": fmt_duration((now - started).total_seconds()) if started else "",
        "environment": env_id,
        "environment_name": environment.display_name if environment else env_id,
        "interface": interface_id,
        "interface_name": interface.display_name if interface else interface_id,
        "gpu_type": options.get("gpu_type") if asked else None,
        "gpus_requested": asked,
        "gpus_held": held,
        "gpus": gpus,
        "busy_fraction": (sum(fractions) / len(fractions)) if fractions else None,
        "busy": bool((status or {}).get("busy")),
        "busy_reasons": [str(r) for r in (status or {}).get("busy_reasons") or ()],
        "status_error": status_error,
        "can_request_gpu": state in ("ready", "stopped") and held == 0,
    }


# -- quota, queue, history ----------------------------------------------------------------------


def _limit(used: int, limit: Limit) -> dict[str, Any]:
    return {
        "used": used,
        "limit": limit.value,
        "source": limit.source,
        "full": limit.value is not None and used >= limit.value,
    }


def quota_usage(quota: EffectiveQuota, gpus: int, servers: int) -> dict[str, Any]:
    return {"gpus": _limit(gpus, quota.gpus), "servers": _limit(servers, quota.servers)}


def capacity_rows(
    counts: Iterable[MeasuredCapacity], names: Mapping[str, str], now: datetime
) -> list[dict[str, Any]]:
    """The cluster's published GPU counts, one row per type; stale ones say so."""
    return [
        {
            "gpu_type": c.gpu_type,
            "gpu_type_name": names.get(c.gpu_type, c.gpu_type),
            "total": c.total,
            "free": c.free,
            "unavailable": c.unavailable,
            "note": c.note,
            "age_s": round(c.age(now), 1),
            "age": fmt_duration(c.age(now)),
            "fresh": c.fresh(now),
            "source": c.source,
        }
        for c in sorted(counts, key=lambda c: c.gpu_type)
    ]


def queue_view(
    entries: Sequence[queue_core.QueueEntry],
    free: Mapping[str, int],
    held_since: Mapping[str, Sequence[datetime]],
    now: datetime,
    stale_after: timedelta,
    typical_hold: timedelta,
    gpu_names: Mapping[str, str] | None = None,
    user: str | None = None,
) -> list[dict[str, Any]]:
    """The queue, line by line (each GPU type its own line), or only `user`'s entries in it."""
    gpu_names = gpu_names or {}
    out = []
    for gpu_type in sorted({e.gpu_type for e in entries}):
        line = queue_core.line(entries, gpu_type, now, stale_after)
        for entry in line:
            if user is not None and entry.user != user:
                continue
            place = queue_core.position(line, entry)
            wait = queue_core.estimated_wait(
                line,
                entry,
                free.get(gpu_type, 0),
                held_since.get(gpu_type, ()),
                now,
                typical_hold,
            )
            name = gpu_names.get(gpu_type, gpu_type)
            out.append(
                {
                    "user": entry.user,
                    "server": entry.server,
                    "server_label": server_label(entry.server),
                    "gpu_type": gpu_type,
                    "gpu_type_name": name,
                    "gpus": entry.gpus,
                    "place": place,
                    "waiting": len(line),
                    "since": iso(entry.enqueued_at),
                    "waited": fmt_duration((now - entry.enqueued_at).total_seconds()),
                    "estimated_wait_s": wait.total_seconds() if wait is not None else None,
                    "estimated_wait": queue_core.describe_wait(wait),
                    "message": queue_core.wait_message(name, place, len(line), wait)
                    if not entry.on_cpu
                    else queue_core.on_cpu_message(name, place, len(line), wait),
                    "on_cpu": entry.on_cpu,
                }
            )
    return out


def action_entry(action: Any, now: datetime) -> dict[str, Any]:
    """One recorded action (`store.ActionRecord`) as the history shows it."""
    snapshots = action.snapshots or []
    saved = sum(1 for s in snapshots if isinstance(s, Mapping) and s.get("status") == "saved")
    return {
        "id": action.id,
        "at": iso(action.created_at),
        "ago": ago(action.created_at, now),
        "user": action.user,
        "server": action.server,
        "server_label": server_label(action.server),
        "kind": action.kind,
        "what": KIND_WORDS.get(action.kind, action.kind),
        "rule": action.rule,
        "reason": action.reason,
        "actor": action.actor,
        "status": action.status,
        "done": not action.open,
        "gpus": action.gpus,
        "gpu_type": action.gpu_type,
        "snapshots_saved": saved,
        "error": action.error,
    }


def keep_entry(keep: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """A keep in force (`gpuhub.service.keeps.Keeps.active`) as the admin page shows it."""
    until = datetime.fromtimestamp(float(keep["until"]), timezone.utc)
    return {
        "user": keep["user"],
        "server": keep["server"],
        "server_label": server_label(keep["server"]),
        "until": iso(until),
        "left": fmt_duration((until - now).total_seconds()),
        "gpus": keep["gpus"],
        "gpu_type": keep["gpu_type"],
        "reason": keep["reason"],
    }


def release_limit_rows(
    limits: Iterable[Mapping[str, Any]], policy: str, flat: float | None
) -> dict[str, Any]:
    """The GPU idle limit in force for each server holding GPUs, as the admin page shows it.

    `limits` are `LearnedRelease.thresholds()` (the learned policy's latest cycle); with the
    flat policy there are none and every server gets `flat`.
    """
    rows = []
    for item in limits:
        server = str(item.get("server") or "")
        seconds = _num(item.get("limit_s"))
        rows.append(
            {
                "user": str(item.get("user") or ""),
                "server": server,
                "server_label": server_label(server),
                "limit_s": seconds,
                "limit": fmt_duration(seconds),
                "learned": bool(item.get("learned")),
                "why": str(item.get("why") or ""),
            }
        )
    return {
        "policy": policy,
        "flat": fmt_duration(flat) if flat is not None else "",
        "servers": sorted(rows, key=lambda r: (r["user"], r["server"])),
    }


# -- the admin's view of every GPU --------------------------------------------------------------


def gpu_rows(
    devices: Iterable[Any],
    leases: Iterable[Any],
    statuses: Mapping[tuple[str, str], Mapping[str, Any]],
    *,
    host: str,
    series: Any = None,
) -> list[dict[str, Any]]:
    """Every GPU: the pool's devices (`nvml.GpuDevice`, where the service sees them), the
    leases (who holds what) and the utilisation from the holders' status documents.

    A GPU the cluster assigns (a lease without a device) shows as its holder's GPUs from the
    server's status, or as one row per lease while the status is not readable. `series(uuid)`
    gives the sparkline readings of a GPU.
    """
    rows: dict[str, dict[str, Any]] = {}
    order: list[str] = []

    def row(key: str) -> dict[str, Any]:
        if key not in rows:
            rows[key] = {
                "uuid": key if not key.startswith("lease:") else None,
                "host": host,
                "index": None,
                "name": "GPU",
                "memory_total": None,
                "memory": "",
                "simulated": False,
                "holder": None,
                "holder_label": "",
                "gpu_type": None,
                "state": "free",
                "utilization": None,
                "busy_fraction": None,
                "idle_for_s": None,
                "idle_for": "",
                "since": None,
                "series": [],
            }
            order.append(key)
        return rows[key]

    for d in devices:
        r = row(d.uuid)
        r.update(
            index=d.index,
            name=d.name,
            memory_total=float(d.memory_total) if d.memory_total else None,
            memory=fmt_bytes(d.memory_total) if d.memory_total else "",
            simulated=bool(d.simulated),
        )
    by_holder: dict[tuple[str, str], list[Any]] = {}
    for lease in leases:
        by_holder.setdefault((lease.user, lease.server), []).append(lease)
    for (user, server), held in sorted(by_holder.items()):
        status = statuses.get((user, server))
        status_gpus = [
            gpu_from_status(g) for g in (status or {}).get("gpus") or () if isinstance(g, Mapping)
        ]
        devices_named = [lease.device for lease in held if lease.device]
        keys = devices_named or [g["uuid"] for g in status_gpus if g["uuid"]]
        if not keys:
            keys = [f"lease:{user}/{server}/{i}" for i in range(len(held))]
        for i, key in enumerate(keys):
            r = row(key)
            lease = held[min(i, len(held) - 1)]
            r.update(
                holder={"user": user, "server": server},
                holder_label=f"{user}/{server}" if server else user,
                gpu_type=lease.gpu_type,
                since=iso(lease.leased_at),
                state="unknown",
            )
            if status is None and not key.startswith("lease:"):
                r["reason"] = "the server's status cannot be read"
    for (user, server), status in statuses.items():
        for g in (status or {}).get("gpus") or ():
            if not isinstance(g, Mapping) or not g.get("uuid"):
                continue
            view = gpu_from_status(g)
            r = row(view["uuid"])
            if r["holder"] is None:
                r.update(
                    holder={"user": user, "server": server},
                    holder_label=f"{user}/{server}" if server else user,
                )
            r.update(
                index=view["index"] if view["index"] is not None else r["index"],
                name=view["name"],
                simulated=view["simulated"] or r["simulated"],
                state=view["state"],
                utilization=view["utilization"],
                busy_fraction=view["busy_fraction"],
                idle_for_s=view["idle_for_s"],
                idle_for=view["idle_for"],
            )
            if view["memory_total"]:
                r.update(memory_total=view["memory_total"], memory=view["memory"])
    out = []
    for key in order:
        r = rows[key]
        if series is not None and r["uuid"]:
            r["series"] = list(series(r["uuid"]))
        out.append(r)
    return out


# -- GPU-hours -----------------------------------------------------------------------------------


def _h(seconds: float) -> float:
    return round(seconds / 3600.0, 2)


def gpu_hours_row(u: Usage) -> dict[str, Any]:
    share = u.idle_share
    return {
        "user": u.user,
        "group": u.group,
        "gpu_type": u.gpu_type,
        "held_hours": _h(u.held),
        "busy_hours": _h(u.busy),
        "idle_hours": _h(u.idle),
        "unknown_hours": _h(u.unknown),
        "idle_share": None if share is None else round(share, 4),
    }


def gpu_hours_view(
    start: datetime, end: datetime, usage: list[Usage], now: datetime
) -> dict[str, Any]:
    """The hoarders view of one week: holders ranked by idle GPU-hours, and the groups' sums."""
    from ...core.accounting import hoarders, totals

    groups = [
        {"group": group, "gpu_type": gpu_type, **gpu_hours_row(u)}
        for (group, gpu_type), u in sorted(totals(usage).items())
    ]
    for g in groups:
        del g["user"]
    return {
        "week_start": iso(start),
        "week_end": iso(end),
        "current": start <= now < end,
        "as_of": iso(min(now, end)),
        "holders": [gpu_hours_row(u) for u in hoarders(usage)],
        "groups": groups,
    }


def my_gpu_hours(usage: list[Usage], budget: Budget, start: datetime) -> dict[str, Any]:
    """One user's GPU-hours this week (all groups and GPU types together), with their budget."""
    held = sum(u.held for u in usage)
    busy = sum(u.busy for u in usage)
    idle = sum(u.idle for u in usage)
    out: dict[str, Any] = {
        "week_start": iso(start),
        "held_hours": _h(held),
        "busy_hours": _h(busy),
        "idle_hours": _h(idle),
        "unknown_hours": _h(max(0.0, held - busy - idle)),
        "held": hours_text(held),
        "idle": hours_text(idle),
        "busy": hours_text(busy),
        "unknown": hours_text(max(0.0, held - busy - idle)),
        "by_type": [gpu_hours_row(u) for u in usage],
        "budget": None,
    }
    if budget.seconds is not None:
        out["budget"] = {
            "hours": budget.hours,
            "limit": hours_text(budget.seconds),
            "used": hours_text(held),
            "remaining": hours_text(budget.remaining(held) or 0.0),
            "source": budget_owner(budget.source),
            "exhausted": held >= budget.seconds,
            "renews": RENEWAL,
        }
    return out
