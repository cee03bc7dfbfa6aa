"""What a user's server is told about its GPU, for the user's page: the same notices JupyterLab's
extension shows (the release the rules foresee with "keep it" and "give it back now", the place
in line of a server running on CPU, its turn with "switch now" and "not now"), so that VS Code
users (and anyone outside JupyterLab) can do on the hub pages what JupyterLab offers.

Pure: the service's notices for one server in, plain dicts for the template and the JSON API out.
The requests themselves go through `gpuhub.service.requests.UserRequests`, as JupyterLab's do.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ...core import protocol
from ...core.queue import describe_wait, ordinal

#: the keeps the page offers, in hours (JupyterLab's too)
KEEP_HOURS = (1, 4)
#: the requests the page may send for a server of the logged-in user
PAGE_REQUESTS = (
    protocol.KEEP,
    protocol.RELEASE_NOW,
    protocol.SWITCH_NOW,
    protocol.NOT_NOW,
    protocol.LEAVE_QUEUE,
)


def _at(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _clock(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%H:%M UTC")


def _in(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def gpu_notices(
    notices: Mapping[str, Any], now: datetime, gpu_names: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """`{"release": ..., "queue": ..., "turn": ...}` for one server (each None when there is
    nothing to say); `gpu_names`: GPU type id -> the catalogue's name."""
    out: dict[str, Any] = {"release": None, "queue": None, "turn": None}
    release_at = _at(notices.get("release_at"))
    if release_at is not None:
        left = (release_at - now).total_seconds()
        warn_before = float(notices.get("warn_before_s") or 0)
        keep = notices.get("keep") or {}
        max_s = float(keep.get("max_s") or 0)
        keeps = [h for h in KEEP_HOURS if keep.get("allowed") and h * 3600 <= max_s]
        out["release"] = {
            "at": release_at.isoformat(),
            "text": (
                f"Your GPU goes back to the pool at {_clock(release_at)} (in {_in(left)}): "
                f"{notices.get('release_reason') or 'it is idle'}. Your variables are saved first."
            ),
            "soon": left <= warn_before,
            "keep_hours": keeps,
            "keep_refused": None if keep.get("allowed") else keep.get("refused"),
            "kept_until": notices.get("keep_until"),
        }
    queue = notices.get("queue")
    if isinstance(queue, Mapping) and queue.get("place"):
        estimate = queue.get("estimate_s")
        wait = None if estimate is None else _seconds(estimate)
        not_before = _at(queue.get("not_before"))
        gpus = int(queue.get("gpus") or 1)
        gpu_type = str(queue.get("gpu_type") or "")
        name = (gpu_names or {}).get(gpu_type, gpu_type)
        text = (
            f"Running without a GPU: {ordinal(int(queue['place']))} in line of "
            f"{queue.get('waiting') or queue['place']} for {gpus} {name} "
            f"GPU{'s' if gpus != 1 else ''}, estimated wait {describe_wait(wait)}."
        )
        if not_before is not None:
            text += f' You said "not now": offered a GPU again from {_clock(not_before)}.'
        out["queue"] = {
            "place": queue["place"],
            "estimate_s": estimate,
            "text": text,
            "not_now_left": queue.get("not_now_left"),
        }
    turn = notices.get("gpu_turn")
    if isinstance(turn, Mapping):
        switch_at = _at(turn.get("switch_at"))
        if switch_at is not None:
            out["turn"] = {
                "switch_at": switch_at.isoformat(),
                "text": (
                    f"Your turn for a GPU has come: the server restarts with it at "
                    f"{_clock(switch_at)} (in {_in((switch_at - now).total_seconds())}); your "
                    "variables are saved and come back."
                ),
            }
    return out


def _seconds(value: Any) -> Any:
    from datetime import timedelta

    return timedelta(seconds=float(value))
