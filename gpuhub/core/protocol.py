"""The protocol between a single-user server's gpuhub extension and the gpuhub service.

Pure: plain JSON in, typed values out. Everything a user's server sends is that user's word, so
it is read here, and only here, by one strict parser: types checked, numbers finite, strings and
lists bounded, unknown states refused. The extension is the only producer of these documents;
the service's cycle, its pages, the culler arbiter and the action executor read them only through
this module.

Direction and credentials (docs/security.md): the server *reports*. The extension sends its
status to the service with its own `JUPYTERHUB_API_TOKEN`:

    POST <service prefix>api/v1/servers/report?server=<server name>&wait=<seconds>
    Authorization: token <the server's own token>
    {"version": 1, "status": {...status document...}, "results": [{...command result...}],
     "requests": [{"id": "...", "kind": "keep", "seconds": 3600}]}

`requests` carry what the server's user asked for in JupyterLab (gpuhub's labextension, through
the server's own `POST /api/gpuhub/requests`): "keep" the GPU for `seconds`, "release" it now,
"gpu-again" after a release. The service honours them only for the reporting server, within its
policy (docs/keep.md).

The service authenticates the token with the hub (its owner is the user, its scopes reach that
server), keeps the status, and answers with the commands waiting for this server (holding the
request up to `wait` seconds while there are none):

    {"version": 1, "commands": [{"id": "...", "kind": "snapshot", "args": {...}}],
     "hold": <seconds the next report may be held>,
     "notices": {...what the server's user should know: the planned release, keep...},
     "request_results": [{"id": "...", "ok": true, "message": "..."}]}

The server carries the commands out for its own user and reports their results in its next
report. No credential of the service, of an admin or of another user is ever sent to a server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

VERSION = 1
REPORT_PATH = "api/v1/servers/report"
ARBITER_PATH = "api/v1/arbiter"

#: Bounds on what a server may send (a report larger than this is refused unread).
MAX_REPORT_BYTES = 512 * 1024
MAX_GPUS = 64
MAX_KERNELS = 256
MAX_PROCESSES = 256
MAX_REASONS = 32
MAX_RESULTS = 16
MAX_SNAPSHOT_ENTRIES = 1000
MAX_STRING = 1024
MAX_ID = 255
MAX_NOTICE_BYTES = 64 * 1024
MAX_REQUESTS = 4
#: the longest keep a request may name at all (the service's policy bounds it further)
MAX_KEEP_SECONDS = 7 * 24 * 3600

# what a server's user may ask for (`requests` in a report)
KEEP = "keep"
RELEASE_NOW = "release"
GPU_AGAIN = "gpu-again"
#: a server running on CPU while it waits for its GPU (`when_no_gpu: start-on-cpu`): switch to
#: the GPU now that its turn has come, let the GPU go to the next in line, leave the queue
SWITCH_NOW = "switch-now"
NOT_NOW = "not-now"
LEAVE_QUEUE = "leave-queue"
REQUEST_KINDS = (KEEP, RELEASE_NOW, GPU_AGAIN, SWITCH_NOW, NOT_NOW, LEAVE_QUEUE)

GPU_STATES = ("busy", "idle", "unknown", "unavailable")

# command kinds
SNAPSHOT = "snapshot"
NOTICE = "notice"
SNAPSHOTS_LIST = "snapshots.list"
SNAPSHOTS_DELETE = "snapshots.delete"
SNAPSHOTS_RESTORE_NEXT = "snapshots.restore-next"
COMMAND_KINDS = (SNAPSHOT, NOTICE, SNAPSHOTS_LIST, SNAPSHOTS_DELETE, SNAPSHOTS_RESTORE_NEXT)


class ProtocolError(ValueError):
    """A document that does not follow the protocol; `field` says where."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


# -- checking plain JSON values ------------------------------------------------------------------


def _obj(value: Any, where: str, *, optional: bool = False) -> Mapping[str, Any]:
    if value is None and optional:
        return {}
    if not isinstance(value, Mapping):
        raise ProtocolError(where, f"must be an object, not {_kind(value)}")
    return value


def _list(value: Any, where: str, limit: int, *, optional: bool = False) -> Sequence[Any]:
    if value is None and optional:
        return ()
    if not isinstance(value, list):
        raise ProtocolError(where, f"must be a list, not {_kind(value)}")
    if len(value) > limit:
        raise ProtocolError(where, f"has {len(value)} entries, at most {limit} allowed")
    return value


def _str(value: Any, where: str, *, limit: int = MAX_STRING, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ProtocolError(where, f"must be a string, not {_kind(value)}")
    if len(value) > limit:
        raise ProtocolError(where, f"is {len(value)} characters long, at most {limit} allowed")
    return value


def _bool(value: Any, where: str, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(where, f"must be true or false, not {_kind(value)}")
    return value


def _num(
    value: Any, where: str, *, low: float | None = None, high: float | None = None
) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(where, f"must be a number, not {_kind(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ProtocolError(where, "must be a finite number")
    if (low is not None and number < low) or (high is not None and number > high):
        raise ProtocolError(where, f"must lie between {low} and {high}, not {number:g}")
    return number


def _int(value: Any, where: str, *, low: int = 0) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(where, f"must be an integer, not {_kind(value)}")
    if value < low or value > 2**63:
        raise ProtocolError(where, f"must be an integer >= {low}")
    return value


def _time(value: Any, where: str) -> float | None:
    """Unix seconds from an ISO 8601 string (or null)."""
    text = _str(value, where, limit=64)
    if text is None or text == "":
        return None
    try:
        seconds = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ProtocolError(where, f"not an ISO 8601 time: {text!r}") from None
    if not math.isfinite(seconds):
        raise ProtocolError(where, "not a finite time")
    return seconds


def _strings(value: Any, where: str, limit: int, *, length: int = MAX_STRING) -> tuple[str, ...]:
    items = _list(value, where, limit, optional=True)
    return tuple(
        _str(v, f"{where}[{i}]", limit=length, optional=False) or "" for i, v in enumerate(items)
    )


def _scalars(value: Any, where: str, limit: int = 32) -> dict[str, Any]:
    """A small object of scalar values (strings, numbers, booleans, null; lists of scalars of at
    most `limit` entries), for informational fields shown as they are."""
    data = _obj(value, where, optional=True)
    if len(data) > limit:
        raise ProtocolError(where, f"has {len(data)} fields, at most {limit} allowed")
    out: dict[str, Any] = {}
    for key, item in data.items():
        name = _str(key, f"{where} key", limit=64, optional=False) or ""
        here = f"{where}.{name}"
        if item is None or isinstance(item, bool):
            out[name] = item
        elif isinstance(item, (int, float)):
            out[name] = _num(item, here)
        elif isinstance(item, str):
            out[name] = _str(item, here)
        elif isinstance(item, list):
            out[name] = [_scalar(v, f"{here}[{i}]") for i, v in enumerate(_list(item, here, limit))]
        elif isinstance(item, Mapping):
            out[name] = {
                _str(k, f"{here} key", limit=64, optional=False): _scalar(v, f"{here}.{k}")
                for k, v in _obj(item, here).items()
            }
            if len(out[name]) > limit:
                raise ProtocolError(here, f"has more than {limit} fields")
        else:
            raise ProtocolError(here, f"unexpected {_kind(item)}")
    return out


def _scalar(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return _num(value, where)
    if isinstance(value, str):
        return _str(value, where)
    if isinstance(value, Mapping):  # one level of {name, reason} objects
        return {
            _str(k, f"{where} key", limit=64, optional=False): _str(
                v if isinstance(v, str) or v is None else json.dumps(v)[:MAX_STRING], f"{where}.{k}"
            )
            for k, v in list(value.items())[:8]
        }
    raise ProtocolError(where, f"unexpected {_kind(value)}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


# -- the status document -------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuStatus:
    """One GPU as the server sees it (its own NVML view: informational, never trusted)."""

    uuid: str
    index: int | None
    name: str
    mig: bool
    parent_uuid: str | None
    simulated: bool
    state: str
    reason: str
    idle_since: float | None
    idle_for_s: float | None
    utilization: float | None
    memory_utilization: float | None
    busy_fraction: float | None
    window_s: float | None
    source: str | None
    memory_used: int | None
    memory_total: int | None
    processes: tuple[Mapping[str, Any], ...] = ()
    processes_listed: bool = False


@dataclass(frozen=True)
class KernelStatus:
    id: str
    name: str | None
    execution_state: str | None
    last_activity: float | None
    connections: int
    notebook: str | None
    python: bool
    pid: int | None
    gpus: tuple[str, ...]
    last_restore: Mapping[str, Any] | None

    @property
    def executing(self) -> bool:
        return self.execution_state == "busy"


@dataclass(frozen=True)
class ExternalProcess:
    pid: int
    cmdline: str
    gpus: tuple[str, ...]
    seen_by: tuple[str, ...]


@dataclass(frozen=True)
class ServerStatus:
    """A server's own report of its state. What only the server can know (a kernel executing, a
    program outside the kernels holding a GPU) can delay a release; never hasten one."""

    version: int
    now: float | None
    started: float | None
    interface: str | None
    environment: str | None
    gpu_type: str | None
    nvml: Mapping[str, Any]
    rule: Mapping[str, Any]
    gpus: tuple[GpuStatus, ...]
    kernels: tuple[KernelStatus, ...]
    external_processes: tuple[ExternalProcess, ...]
    busy: bool
    busy_reasons: tuple[str, ...]
    last_gpu_activity: float | None

    @property
    def kernels_executing(self) -> bool:
        return any(k.executing for k in self.kernels)

    @property
    def outside_gpu_processes(self) -> bool:
        return bool(self.external_processes)


def _gpu(data: Any, where: str) -> GpuStatus:
    g = _obj(data, where)
    util = _obj(g.get("utilization"), f"{where}.utilization", optional=True)
    memory = _obj(g.get("memory"), f"{where}.memory", optional=True)
    state = _str(g.get("state"), f"{where}.state", limit=32) or "unknown"
    if state not in GPU_STATES:
        raise ProtocolError(f"{where}.state", f"must be one of {', '.join(GPU_STATES)}")
    processes = _list(g.get("processes"), f"{where}.processes", MAX_PROCESSES, optional=True)
    return GpuStatus(
        uuid=_str(g.get("uuid"), f"{where}.uuid", limit=MAX_ID, optional=False) or "",
        index=_int(g.get("index"), f"{where}.index"),
        name=_str(g.get("name"), f"{where}.name", limit=MAX_ID) or "GPU",
        mig=_bool(g.get("mig"), f"{where}.mig"),
        parent_uuid=_str(g.get("parent_uuid"), f"{where}.parent_uuid", limit=MAX_ID),
        simulated=_bool(g.get("simulated"), f"{where}.simulated"),
        state=state,
        reason=_str(g.get("reason"), f"{where}.reason") or "",
        idle_since=_time(g.get("idle_since"), f"{where}.idle_since"),
        idle_for_s=_num(g.get("idle_for_s"), f"{where}.idle_for_s", low=0),
        utilization=_num(util.get("gpu"), f"{where}.utilization.gpu", low=0, high=100),
        memory_utilization=_num(util.get("memory"), f"{where}.utilization.memory", low=0, high=100),
        busy_fraction=_num(
            util.get("busy_fraction"), f"{where}.utilization.busy_fraction", low=0, high=1
        ),
        window_s=_num(util.get("window_s"), f"{where}.utilization.window_s", low=0),
        source=_str(util.get("source"), f"{where}.utilization.source", limit=32),
        memory_used=_int(memory.get("used"), f"{where}.memory.used"),
        memory_total=_int(memory.get("total"), f"{where}.memory.total"),
        processes=tuple(
            {
                "pid": _int(
                    _obj(p, f"{where}.processes[{i}]").get("pid"), f"{where}.processes[{i}].pid"
                ),
                "used_memory": _int(p.get("used_memory"), f"{where}.processes[{i}].used_memory"),
                "kernel_id": _str(
                    p.get("kernel_id"), f"{where}.processes[{i}].kernel_id", limit=MAX_ID
                ),
                "local": _bool(p.get("local"), f"{where}.processes[{i}].local"),
            }
            for i, p in enumerate(processes)
        ),
        processes_listed=_bool(g.get("processes_listed"), f"{where}.processes_listed"),
    )


def _kernel(data: Any, where: str) -> KernelStatus:
    k = _obj(data, where)
    restore = k.get("last_restore")
    return KernelStatus(
        id=_str(k.get("id"), f"{where}.id", limit=MAX_ID, optional=False) or "",
        name=_str(k.get("name"), f"{where}.name", limit=MAX_ID),
        execution_state=_str(k.get("execution_state"), f"{where}.execution_state", limit=32),
        last_activity=_time(k.get("last_activity"), f"{where}.last_activity"),
        connections=_int(k.get("connections"), f"{where}.connections") or 0,
        notebook=_str(k.get("notebook"), f"{where}.notebook"),
        python=_bool(k.get("python"), f"{where}.python"),
        pid=_int(k.get("pid"), f"{where}.pid"),
        gpus=_strings(k.get("gpus"), f"{where}.gpus", MAX_GPUS, length=MAX_ID),
        last_restore=None if restore is None else _scalars(restore, f"{where}.last_restore"),
    )


def _process(data: Any, where: str) -> ExternalProcess:
    p = _obj(data, where)
    return ExternalProcess(
        pid=_int(p.get("pid"), f"{where}.pid") or 0,
        cmdline=_str(p.get("cmdline"), f"{where}.cmdline") or "",
        gpus=_strings(p.get("gpus"), f"{where}.gpus", MAX_GPUS, length=MAX_ID),
        seen_by=_strings(p.get("seen_by"), f"{where}.seen_by", 4, length=32),
    )


def parse_status(data: Any, where: str = "status") -> ServerStatus:
    """The typed status, or `ProtocolError` naming the first field that is wrong."""
    doc = _obj(data, where)
    version = doc.get("version")
    if version != VERSION or isinstance(version, bool):
        raise ProtocolError(f"{where}.version", f"must be {VERSION}, not {version!r}")
    gpus = _list(doc.get("gpus"), f"{where}.gpus", MAX_GPUS)
    kernels = _list(doc.get("kernels"), f"{where}.kernels", MAX_KERNELS)
    external = _list(
        doc.get("external_processes"), f"{where}.external_processes", MAX_PROCESSES, optional=True
    )
    return ServerStatus(
        version=VERSION,
        now=_time(doc.get("now"), f"{where}.now"),
        started=_time(doc.get("started"), f"{where}.started"),
        interface=_str(doc.get("interface"), f"{where}.interface", limit=MAX_ID),
        environment=_str(doc.get("environment"), f"{where}.environment", limit=MAX_ID),
        gpu_type=_str(doc.get("gpu_type"), f"{where}.gpu_type", limit=MAX_ID),
        nvml=_scalars(doc.get("nvml"), f"{where}.nvml"),
        rule=_scalars(doc.get("rule"), f"{where}.rule"),
        gpus=tuple(_gpu(g, f"{where}.gpus[{i}]") for i, g in enumerate(gpus)),
        kernels=tuple(_kernel(k, f"{where}.kernels[{i}]") for i, k in enumerate(kernels)),
        external_processes=tuple(
            _process(p, f"{where}.external_processes[{i}]") for i, p in enumerate(external)
        ),
        busy=_bool(doc.get("busy"), f"{where}.busy"),
        busy_reasons=_strings(doc.get("busy_reasons"), f"{where}.busy_reasons", MAX_REASONS),
        last_gpu_activity=_time(doc.get("last_gpu_activity"), f"{where}.last_gpu_activity"),
    )


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    from datetime import timezone

    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def status_document(status: ServerStatus) -> dict[str, Any]:
    """The checked status as plain JSON again (what the pages show): only checked values."""
    return {
        "version": status.version,
        "now": iso(status.now),
        "started": iso(status.started),
        "interface": status.interface,
        "environment": status.environment,
        "gpu_type": status.gpu_type,
        "nvml": dict(status.nvml),
        "rule": dict(status.rule),
        "gpus": [
            {
                "uuid": g.uuid,
                "index": g.index,
                "name": g.name,
                "mig": g.mig,
                "parent_uuid": g.parent_uuid,
                "simulated": g.simulated,
                "state": g.state,
                "reason": g.reason,
                "idle_since": iso(g.idle_since),
                "idle_for_s": g.idle_for_s,
                "utilization": {
                    "gpu": g.utilization,
                    "memory": g.memory_utilization,
                    "busy_fraction": g.busy_fraction,
                    "window_s": g.window_s,
                    "source": g.source,
                },
                "memory": {"used": g.memory_used, "total": g.memory_total},
                "processes": [dict(p) for p in g.processes],
                "processes_listed": g.processes_listed,
            }
            for g in status.gpus
        ],
        "kernels": [
            {
                "id": k.id,
                "name": k.name,
                "execution_state": k.execution_state,
                "last_activity": iso(k.last_activity),
                "connections": k.connections,
                "notebook": k.notebook,
                "python": k.python,
                "pid": k.pid,
                "gpus": list(k.gpus),
                "last_restore": dict(k.last_restore) if k.last_restore is not None else None,
            }
            for k in status.kernels
        ],
        "external_processes": [
            {"pid": p.pid, "cmdline": p.cmdline, "gpus": list(p.gpus), "seen_by": list(p.seen_by)}
            for p in status.external_processes
        ],
        "busy": status.busy,
        "busy_reasons": list(status.busy_reasons),
        "last_gpu_activity": iso(status.last_gpu_activity),
    }


# -- commands and their results ------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """Something the service asks a server to do for its own user."""

    id: str
    kind: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "args": dict(self.args)}


@dataclass(frozen=True)
class CommandResult:
    """What became of a command: `ok`, an `error` for people, and the kind's `data`."""

    id: str
    ok: bool
    error: str | None = None
    data: Any = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "ok": self.ok, "error": self.error, "data": self.data}


@dataclass(frozen=True)
class UserRequest:
    """Something the server's user asked for: keep the GPU `seconds` longer, release it now, or
    get it again. The user's word: the service bounds it by its policy."""

    id: str
    kind: str
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "kind": self.kind}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out


@dataclass(frozen=True)
class RequestResult:
    id: str
    ok: bool
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "ok": self.ok, "message": self.message}


def parse_request(data: Any, where: str = "request") -> UserRequest:
    """One request (from a report, or the body of the server's `POST /api/gpuhub/requests`)."""
    r = _obj(data, where)
    unknown = sorted(set(r) - {"id", "kind", "seconds"})
    if unknown:
        raise ProtocolError(f"{where}.{unknown[0]}", "unknown field")
    kind = _str(r.get("kind"), f"{where}.kind", limit=32, optional=False)
    if kind not in REQUEST_KINDS:
        raise ProtocolError(f"{where}.kind", f"must be one of {', '.join(REQUEST_KINDS)}")
    seconds = _num(r.get("seconds"), f"{where}.seconds", low=1, high=MAX_KEEP_SECONDS)
    if kind == KEEP and seconds is None:
        raise ProtocolError(f"{where}.seconds", "a keep needs its seconds")
    if kind != KEEP and seconds is not None:
        raise ProtocolError(f"{where}.seconds", f"only a keep takes seconds, not a {kind}")
    return UserRequest(
        id=_str(r.get("id"), f"{where}.id", limit=64) or "",
        kind=kind or "",
        seconds=seconds,
    )


@dataclass(frozen=True)
class Report:
    server: str
    status: ServerStatus
    results: tuple[CommandResult, ...] = ()
    requests: tuple[UserRequest, ...] = ()


def report_url(service_url: str, server: str, wait: float) -> str:
    """Where a server posts its report (`service_url`: the service's prefix URL)."""
    from urllib.parse import quote

    base = service_url.rstrip("/")
    return f"{base}/{REPORT_PATH}?server={quote(server, safe='')}&wait={wait:g}"


def snapshot_command(command_id: str, *, wait: bool = False, deadline_s: float = 0.0) -> Command:
    """Snapshot every kernel. `wait`: a kernel running code is waited for, up to `deadline_s`
    (a kernel still running then is left out, reported as "busy")."""
    return Command(command_id, SNAPSHOT, {"wait": wait, "deadline_s": deadline_s})


def notice_command(command_id: str, path: str, text: str) -> Command:
    return Command(command_id, NOTICE, {"path": path, "text": text})


def parse_commands(data: Any) -> tuple[list[Command], float | None]:
    """The server's side: the commands in the service's answer, and the hold it allows."""
    doc = _obj(data, "answer")
    items = _list(doc.get("commands"), "answer.commands", MAX_RESULTS, optional=True)
    out = []
    for i, item in enumerate(items):
        c = _obj(item, f"answer.commands[{i}]")
        kind = _str(c.get("kind"), f"answer.commands[{i}].kind", limit=64, optional=False)
        if kind not in COMMAND_KINDS:
            raise ProtocolError(f"answer.commands[{i}].kind", f"unknown command {kind!r}")
        out.append(
            Command(
                _str(c.get("id"), f"answer.commands[{i}].id", limit=MAX_ID, optional=False) or "",
                kind,
                dict(_obj(c.get("args"), f"answer.commands[{i}].args", optional=True)),
            )
        )
    return out, _num(doc.get("hold"), "answer.hold", low=0, high=3600)


def parse_answer_notices(data: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The server's side: the `notices` and `request_results` of the service's answer, checked
    (what JupyterLab shows the user)."""
    doc = _obj(data, "answer")
    raw = _obj(doc.get("notices"), "answer.notices", optional=True)
    notices: dict[str, Any] = {}
    for name in ("release_at", "keep_until"):
        at = _time(raw.get(name), f"answer.notices.{name}")
        notices[name] = iso(at)
    notices["release_rule"] = _str(raw.get("release_rule"), "answer.notices.release_rule", limit=64)
    notices["release_reason"] = _str(raw.get("release_reason"), "answer.notices.release_reason")
    notices["warn_before_s"] = _num(
        raw.get("warn_before_s"), "answer.notices.warn_before_s", low=0, high=MAX_KEEP_SECONDS
    )
    notices["warnings"] = list(_strings(raw.get("warnings"), "answer.notices.warnings", 8))
    keep = _obj(raw.get("keep"), "answer.notices.keep", optional=True)
    notices["keep"] = {
        "allowed": _bool(keep.get("allowed"), "answer.notices.keep.allowed"),
        "max_s": _num(keep.get("max_s"), "answer.notices.keep.max_s", low=0, high=MAX_KEEP_SECONDS),
        "refused": _str(keep.get("refused"), "answer.notices.keep.refused"),
    }
    released = raw.get("released")
    if released is not None:
        r = _obj(released, "answer.notices.released")
        notices["released"] = {
            "at": iso(_time(r.get("at"), "answer.notices.released.at")),
            "reason": _str(r.get("reason"), "answer.notices.released.reason"),
        }
    give_back = raw.get("give_back")
    if give_back is not None:
        g = _obj(give_back, "answer.notices.give_back")
        notices["give_back"] = {
            "status": _str(g.get("status"), "answer.notices.give_back.status", limit=32),
            "reason": _str(g.get("reason"), "answer.notices.give_back.reason"),
        }
    queue = raw.get("queue")
    if queue is not None:
        q = _obj(queue, "answer.notices.queue")
        notices["queue"] = {
            "place": _int(q.get("place"), "answer.notices.queue.place", low=1),
            "estimate_s": _num(q.get("estimate_s"), "answer.notices.queue.estimate_s", low=0),
            "waiting": _int(q.get("waiting"), "answer.notices.queue.waiting", low=0),
            "gpus": _int(q.get("gpus"), "answer.notices.queue.gpus", low=0),
            "gpu_type": _str(q.get("gpu_type"), "answer.notices.queue.gpu_type", limit=200),
            "not_before": iso(_time(q.get("not_before"), "answer.notices.queue.not_before")),
            "not_now_left": _int(q.get("not_now_left"), "answer.notices.queue.not_now_left", low=0),
        }
    turn = raw.get("gpu_turn")
    if turn is not None:
        t = _obj(turn, "answer.notices.gpu_turn")
        notices["gpu_turn"] = {
            "switch_at": iso(_time(t.get("switch_at"), "answer.notices.gpu_turn.switch_at")),
            "gpus": _int(t.get("gpus"), "answer.notices.gpu_turn.gpus", low=0),
            "gpu_type": _str(t.get("gpu_type"), "answer.notices.gpu_turn.gpu_type", limit=200),
        }
    items = _list(doc.get("request_results"), "answer.request_results", MAX_REQUESTS, optional=True)
    results = []
    for i, item in enumerate(items):
        r = _obj(item, f"answer.request_results[{i}]")
        results.append(
            {
                "id": _str(r.get("id"), f"answer.request_results[{i}].id", limit=64) or "",
                "ok": _bool(r.get("ok"), f"answer.request_results[{i}].ok"),
                "message": _str(r.get("message"), f"answer.request_results[{i}].message") or "",
            }
        )
    return notices, results


def parse_report(body: bytes, server: str) -> Report:
    """The service's side: a report body, at most `MAX_REPORT_BYTES`."""
    if len(body) > MAX_REPORT_BYTES:
        raise ProtocolError("body", f"{len(body)} bytes, at most {MAX_REPORT_BYTES} allowed")
    try:
        data = json.loads(body or b"null", parse_constant=_refuse_constant)
    except ProtocolError:
        raise
    except ValueError as e:
        raise ProtocolError("body", f"not valid JSON ({e})") from None
    doc = _obj(data, "report")
    if doc.get("version") != VERSION:
        raise ProtocolError("report.version", f"must be {VERSION}")
    results = _list(doc.get("results"), "report.results", MAX_RESULTS, optional=True)
    requests = _list(doc.get("requests"), "report.requests", MAX_REQUESTS, optional=True)
    return Report(
        server=server,
        status=parse_status(doc.get("status")),
        results=tuple(_result(r, f"report.results[{i}]") for i, r in enumerate(results)),
        requests=tuple(parse_request(r, f"report.requests[{i}]") for i, r in enumerate(requests)),
    )


def _refuse_constant(name: str) -> Any:
    raise ProtocolError("body", f"{name} is not a JSON number")


def _result(data: Any, where: str) -> CommandResult:
    r = _obj(data, where)
    return CommandResult(
        id=_str(r.get("id"), f"{where}.id", limit=MAX_ID, optional=False) or "",
        ok=_bool(r.get("ok"), f"{where}.ok"),
        error=_str(r.get("error"), f"{where}.error"),
        data=r.get("data"),  # checked by the reader of that command's kind
    )


@dataclass(frozen=True)
class SnapshotEntry:
    kernel_id: str | None
    key: str | None
    notebook: str | None
    status: str
    snapshot: str | None
    saved: int | None
    skipped: int | None
    bytes: int | None
    error: str | None

    def summary(self) -> dict[str, Any]:
        out = {
            "kernel_id": self.kernel_id,
            "key": self.key,
            "notebook": self.notebook,
            "status": self.status,
            "snapshot": self.snapshot,
            "saved": self.saved,
            "skipped": self.skipped,
            "bytes": self.bytes,
        }
        out = {k: v for k, v in out.items() if v is not None}
        if self.error:
            out["error"] = self.error
        return out


SNAPSHOT_STATUSES = ("saved", "busy", "unsupported", "failed")


@dataclass(frozen=True)
class SnapshotOutcome:
    ok: bool
    entries: tuple[SnapshotEntry, ...]


def parse_snapshot_result(data: Any, where: str = "snapshot") -> SnapshotOutcome:
    """A snapshot's result (the data of a `snapshot` command, or `POST /api/gpuhub/snapshot`)."""
    doc = _obj(data, where)
    entries = _list(doc.get("snapshots"), f"{where}.snapshots", MAX_KERNELS)
    out = []
    for i, item in enumerate(entries):
        e = _obj(item, f"{where}.snapshots[{i}]")
        here = f"{where}.snapshots[{i}]"
        status = _str(e.get("status"), f"{here}.status", limit=32, optional=False)
        if status not in SNAPSHOT_STATUSES:
            raise ProtocolError(f"{here}.status", f"must be one of {', '.join(SNAPSHOT_STATUSES)}")
        out.append(
            SnapshotEntry(
                kernel_id=_str(e.get("kernel_id"), f"{here}.kernel_id", limit=MAX_ID),
                key=_str(e.get("key"), f"{here}.key", limit=MAX_ID),
                notebook=_str(e.get("notebook"), f"{here}.notebook"),
                status=status or "failed",
                snapshot=_str(e.get("snapshot"), f"{here}.snapshot", limit=MAX_ID),
                saved=_int(e.get("saved"), f"{here}.saved"),
                skipped=_int(e.get("skipped"), f"{here}.skipped"),
                bytes=_int(e.get("bytes"), f"{here}.bytes"),
                error=_str(e.get("error"), f"{here}.error"),
            )
        )
    return SnapshotOutcome(ok=_bool(doc.get("ok"), f"{where}.ok"), entries=tuple(out))


def parse_snapshot_listing(data: Any, where: str = "listing") -> list[dict[str, Any]]:
    """The snapshots on a server's disk (data of `snapshots.list`, or `GET /api/gpuhub/snapshots`),
    as checked plain entries."""
    doc = _obj(data, where)
    items = _list(doc.get("snapshots"), f"{where}.snapshots", MAX_SNAPSHOT_ENTRIES)
    out = []
    for i, item in enumerate(items):
        e = _obj(item, f"{where}.snapshots[{i}]")
        here = f"{where}.snapshots[{i}]"
        out.append(
            {
                "key": _str(e.get("key"), f"{here}.key", limit=MAX_ID, optional=False),
                "snapshot": _str(
                    e.get("snapshot"), f"{here}.snapshot", limit=MAX_ID, optional=False
                ),
                "notebook": _str(e.get("notebook"), f"{here}.notebook"),
                "kernel_id": _str(e.get("kernel_id"), f"{here}.kernel_id", limit=MAX_ID),
                "created": _str(e.get("created"), f"{here}.created", limit=64),
                "saved": _int(e.get("saved"), f"{here}.saved"),
                "skipped": _int(e.get("skipped"), f"{here}.skipped"),
                "bytes": _int(e.get("bytes"), f"{here}.bytes"),
                "restore_next": _bool(e.get("restore_next"), f"{here}.restore_next"),
            }
        )
    return out
