"""What the user is told when the service releases their GPU, stops their server or warns them.

Every action is recorded in the store with its reason (the hub pages show that history). Inside
JupyterLab and VS Code the user sees a Markdown file in the home folder, `GPUHUB-NOTICE.md` by
default, written through the server's own contents API (so it works the same on the local backend
and on Kubernetes, for both interfaces): it appears in the file browser / explorer, says what
happened, why, which snapshot holds the kernels' variables and how to get the GPU back. The file
is replaced by the next notice; users may delete it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.decide import ReleaseGpu, StopServer, Warn

TITLES = {
    "release": "Your GPU was given back to the pool",
    "stop": "Your server was stopped",
    "warn": "A notice about your GPU",
    "give-back": "Your server has its GPU again",
}


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def snapshot_lines(snapshots: Sequence[Mapping[str, Any]] | None) -> list[str]:
    saved = [s for s in snapshots or () if s.get("status") == "saved"]
    if not snapshots:
        return [
            "- No kernel was running, so there was no variable to save. Your files are as "
            "you left them."
        ]
    lines = ["- Your files are as you left them. The variables of your kernels were saved:"]
    for s in saved:
        what = s.get("notebook") or f"kernel {s.get('kernel_id', '?')}"
        lines.append(
            f"  - `{what}`: snapshot `{s.get('snapshot')}` ({s.get('saved', 0)} variables"
            + (f", {s['skipped']} skipped" if s.get("skipped") else "")
            + ")"
        )
    lines.append(
        "  Open the notebook again and its variables come back by themselves "
        "(in a console: `%gpuhub_restore`)."
    )
    others = [s for s in snapshots or () if s.get("status") != "saved"]
    for s in others:
        lines.append(f"  - kernel {s.get('kernel_id', '?')}: not saved ({s.get('status')})")
    return lines


def render(
    kind: str,
    reason: str,
    *,
    at: float,
    gpus: int = 0,
    snapshots: Sequence[Mapping[str, Any]] | None = None,
    hub_url: str = "",
) -> str:
    """The Markdown notice for one action."""
    home = f"{hub_url.rstrip('/')}/hub/home" if hub_url else "the hub's home page"
    lines = [f"# {TITLES.get(kind, 'gpuhub notice')}", "", f"*{_when(at)}*", ""]
    if kind == "release":
        lines += [
            f"gpuhub restarted this server without its GPU{'s' if gpus != 1 else ''}: {reason}.",
            "",
            *snapshot_lines(snapshots),
            "- To work on a GPU again, stop this server and start it with a GPU from "
            f"{home}. If none is free you wait in the queue, and your place is shown.",
        ]
    elif kind == "give-back":
        lines += [
            f"gpuhub restarted this server with its GPU{'s' if gpus != 1 else ''}: {reason}.",
            "",
            *snapshot_lines(snapshots),
        ]
    elif kind == "stop":
        lines += [
            f"gpuhub stopped this server: {reason}.",
            "",
            *snapshot_lines(snapshots),
            f"- Start it again from {home}.",
        ]
    else:
        lines += [f"{reason[:1].upper()}{reason[1:]}.", "", "Nothing was changed."]
    lines += [
        "",
        "This file is written by gpuhub; the history of every such action is on the hub's "
        "gpuhub pages. You may delete it.",
    ]
    return "\n".join(lines) + "\n"


def kind_of(action: Any) -> str:
    if isinstance(action, ReleaseGpu):
        return "release"
    if isinstance(action, StopServer):
        return "stop"
    if isinstance(action, Warn):
        return "warn"
    raise TypeError(f"not an action: {action!r}")
