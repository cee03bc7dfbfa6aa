"""Keeping a GPU and the user's other requests from JupyterLab, at every trust boundary: the
strict parser of a report's `requests`, the report endpoint (a request acts only on the server
whose token reported it), the keep policy (group maximum, someone waiting too long), and the
release rules (a keep postpones the idle release, never the maximum lease)."""

from __future__ import annotations

import json

import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from gpuhub.core import decide, protocol
from gpuhub.core.idle import Activity
from gpuhub.core.protocol import ProtocolError, RequestResult
from gpuhub.service.actions import Ledger
from gpuhub.service.keeps import KeepRules, Keeps
from gpuhub.service.reports import ReportBoard, ReportHandler, ServerAuthenticator
from gpuhub.service.servers import RunningServer
from gpuhub.store import Store

from .test_reports import UserHandler, post, status

NOW = 1_800_000_000.0


# -- the parser ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"kind": "keep"}, "report.requests[0].seconds"),
        ({"kind": "keep", "seconds": -5}, "report.requests[0].seconds"),
        ({"kind": "keep", "seconds": 0}, "report.requests[0].seconds"),
        ({"kind": "keep", "seconds": 10**12}, "report.requests[0].seconds"),
        ({"kind": "keep", "seconds": "3600"}, "report.requests[0].seconds"),
        ({"kind": "keep", "seconds": True}, "report.requests[0].seconds"),
        ({"kind": "release", "seconds": 60}, "report.requests[0].seconds"),
        ({"kind": "steal", "seconds": 60}, "report.requests[0].kind"),
        ({"kind": "keep", "seconds": 60, "user": "bob"}, "report.requests[0].user"),
        ({"kind": "keep", "seconds": 60, "server": "bob/"}, "report.requests[0].server"),
        ("keep", "report.requests[0]"),
    ],
)
def test_forged_requests_are_refused_naming_the_field(request_, field):
    body = json.dumps({"version": 1, "status": status(), "requests": [request_]}).encode()
    with pytest.raises(ProtocolError) as e:
        protocol.parse_report(body, "")
    assert e.value.field == field


def test_requests_are_bounded_and_nan_is_no_number():
    many = [{"kind": "release"}] * (protocol.MAX_REQUESTS + 1)
    body = json.dumps({"version": 1, "status": status(), "requests": many}).encode()
    with pytest.raises(ProtocolError) as e:
        protocol.parse_report(body, "")
    assert e.value.field == "report.requests"
    nan = b'{"version": 1, "status": %s, "requests": [{"kind": "keep", "seconds": NaN}]}' % (
        json.dumps(status()).encode()
    )
    with pytest.raises(ProtocolError):
        protocol.parse_report(nan, "")


def test_answer_notices_are_checked_on_the_server_side():
    notices, results = protocol.parse_answer_notices(
        {
            "notices": {
                "release_at": "2026-11-29T14:02:00Z",
                "release_rule": "gpu-idle",
                "warn_before_s": 600,
                "keep": {"allowed": True, "max_s": 14400},
            },
            "request_results": [{"id": "a", "ok": True, "message": "kept until 15:02 UTC"}],
        }
    )
    assert notices["release_at"] == "2026-11-29T14:02:00Z" and notices["keep"]["max_s"] == 14400
    assert results == [{"id": "a", "ok": True, "message": "kept until 15:02 UTC"}]
    with pytest.raises(ProtocolError) as e:
        protocol.parse_answer_notices({"notices": {"release_at": "tomorrow"}})
    assert e.value.field == "answer.notices.release_at"


# -- the report endpoint: a request acts on the reporting server only ---------------------------


class Recorder:
    """Stands in for `UserRequests`: records on whose behalf requests came."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[str]]] = []

    async def handle(self, user, server, requests):
        self.calls.append((user, server, [r.kind for r in requests]))
        return [RequestResult(r.id, True, f"done for {user}/{server}") for r in requests]

    def answer(self, key):
        return {"warn_before_s": 600, "release_at": None}


@pytest.fixture
def endpoint():
    async def make():
        recorder = Recorder()
        hub = web.Application([(r"/hub/api/user", UserHandler)], asked=[])
        hub_sockets = bind_sockets(0, "127.0.0.1")
        HTTPServer(hub).add_sockets(hub_sockets)
        api = f"http://127.0.0.1:{hub_sockets[0].getsockname()[1]}/hub/api"
        handler_args = {
            "board": ReportBoard(),
            "auth": ServerAuthenticator(api, "gpuhub", ttl=60),
            "max_hold": 5,
            "requests": recorder,
        }
        app = web.Application([(r"/report", ReportHandler, handler_args)])
        sockets = bind_sockets(0, "127.0.0.1")
        HTTPServer(app).add_sockets(sockets)
        return recorder, f"http://127.0.0.1:{sockets[0].getsockname()[1]}/report"

    return make


async def test_a_keep_acts_only_on_the_server_whose_token_reports(endpoint):
    recorder, base = await endpoint()
    keep = {"id": "k", "kind": "keep", "seconds": 3600}
    # bob's own server: his request is for bob/ and nobody else, answered at once (not held)
    code, answer = await post(
        base, "bob-server", {"version": 1, "status": status(), "requests": [keep]}, wait=5
    )
    assert code == 200
    assert recorder.calls == [("bob", "", ["keep"])]
    assert answer["request_results"] == [{"id": "k", "ok": True, "message": "done for bob/"}]
    assert answer["notices"]["warn_before_s"] == 600
    # bob naming ada's server (or a server of his token does not reach): refused before reading
    for server in ("ada", "other"):
        code, answer = await post(
            base, "bob-server", {"version": 1, "status": status(), "requests": [keep]}, server
        )
        assert code == 403
    # a token the hub does not know: refused
    code, _ = await post(base, "forged", {"version": 1, "status": status(), "requests": [keep]})
    assert code == 403
    # a forged request: 400 naming the field, nothing done
    forged = {"kind": "keep", "seconds": 10**9}
    code, answer = await post(
        base, "bob-server", {"version": 1, "status": status(), "requests": [forged]}
    )
    assert code == 400 and "report.requests[0].seconds" in answer["message"]
    assert recorder.calls == [("bob", "", ["keep"])]


# -- the keep policy -----------------------------------------------------------------------------


def running(user: str, groups=(), gpus: int = 1, started: str = "2026-11-29T10:00:00Z"):
    return RunningServer(
        user,
        "",
        frozenset(groups),
        {"started": started, "user_options": {"gpus": gpus, "gpu_type": "a100"}, "ready": True},
    )


@pytest.fixture
def keeps(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    return Keeps(
        Ledger(store),
        KeepRules(
            max_keep={"students": 3600, "staff": 4 * 3600, "guests": 0}, refuse_after_wait=600
        ),
    )


def test_a_keep_is_bounded_by_the_most_generous_group(keeps):
    ada = running("ada", groups=("students",))
    answer = keeps.ask(ada, 4 * 3600, longest_wait=0, now=NOW)
    assert not answer.ok and "at most 1 h" in answer.message
    assert keeps.until(ada, NOW) is None
    answer = keeps.ask(ada, 3600, longest_wait=0, now=NOW)
    assert answer.ok and answer.until == NOW + 3600
    assert keeps.until(ada, NOW + 10) == NOW + 3600
    assert keeps.until(ada, NOW + 3601) is None
    # staff and students: the most generous
    cy = running("cy", groups=("students", "staff"))
    assert keeps.ask(cy, 4 * 3600, longest_wait=0, now=NOW).ok
    # guests may not keep; a user in no group gets the default (4 h)
    assert not keeps.ask(running("gus", groups=("guests",)), 60, 0, NOW).ok
    assert keeps.ask(running("dan"), 4 * 3600, 0, NOW).ok
    # recorded in the history, for the admins
    [row] = keeps.ledger.store.actions("ada", kinds=["keep"])
    assert (
        row.actor == "ada" and "1 h" in row.reason and row.user_options["keep_until"] == NOW + 3600
    )
    assert {k["user"] for k in keeps.active(NOW + 10)} == {"ada", "cy", "dan"}


def test_no_keep_while_someone_waited_too_long_nor_without_a_gpu(keeps):
    ada = running("ada", groups=("students",))
    answer = keeps.ask(ada, 600, longest_wait=601, now=NOW)
    assert not answer.ok and "waited" in answer.message
    answer = keeps.ask(running("ada", gpus=0), 600, longest_wait=0, now=NOW)
    assert not answer.ok and "no GPU" in answer.message


def test_a_keep_holds_for_its_run_of_the_server_only(keeps):
    ada = running("ada", groups=("students",))
    assert keeps.ask(ada, 3600, 0, NOW).ok
    again = running("ada", groups=("students",), started="2026-11-29T12:00:00Z")
    assert keeps.until(again, NOW + 10) is None
    # a restarted service reads the keeps in force from the history
    fresh = Keeps(Ledger(keeps.ledger.store), keeps.rules)
    fresh.ledger.refresh()
    assert fresh.until(ada, NOW + 10) == NOW + 3600


def test_keep_settings_are_checked():
    with pytest.raises(ValueError, match="max_keep"):
        KeepRules(max_keep={"students": -1})
    with pytest.raises(ValueError, match="max_keep"):
        KeepRules(max_keep={"students": "1h"})


# -- the rules: a keep postpones idle releases, never the maximum lease ---------------------------

RULES = decide.Rules(
    gpu_idle_timeout=1800,
    gpu_idle_timeout_under_demand=300,
    server_idle_timeout=3600,
    max_gpu_lease={},
    max_gpu_lease_default=24 * 3600,
    max_gpu_lease_warning=900,
)


def idle_view(**changes) -> decide.ServerView:
    values = {
        "user": "ada",
        "gpus": 1,
        "gpu_type": "a100",
        "gpu_activity": (Activity("idle", 0.0, NOW - 7200),),
        "last_activity": NOW - 7200,
        "started": NOW - 8000,
        "lease_start": NOW - 8000,
    }
    values.update(changes)
    return decide.ServerView(**values)


def test_a_kept_gpu_is_not_released_for_idleness_nor_for_demand():
    demand = decide.Demand(waiting=(decide.Waiting("bob", NOW - 100, 1, "a100"),))
    assert [a.rule for a in decide.decide([idle_view()], demand, NOW, RULES)] == [
        decide.RULE_SERVER_IDLE
    ]
    kept = idle_view(kept_until=NOW + 3600)
    assert decide.decide([kept], demand, NOW, RULES) == []
    # the keep over: released as before
    assert decide.decide([kept], demand, NOW + 3601, RULES) != []
    # the maximum lease is never postponed by a keep
    old = idle_view(kept_until=NOW + 3600, lease_start=NOW - 25 * 3600, lease_warned_at=NOW - 1000)
    [action] = decide.decide([old], decide.Demand(), NOW, RULES)
    assert action.rule == decide.RULE_MAX_LEASE


def test_the_planned_release_is_what_the_user_is_warned_of():
    view = idle_view(
        gpu_activity=(Activity("idle", 0.0, NOW - 600),), last_activity=NOW, lease_start=NOW - 600
    )
    plan = decide.planned_release(view, NOW, RULES)
    assert plan is not None and plan.rule == decide.RULE_GPU_IDLE
    assert plan.at == NOW - 600 + 1800 and "after 30 min" in plan.reason
    # someone waits for an a100: the shorter limit, said so
    plan = decide.planned_release(view, NOW, RULES, under_demand=True)
    assert plan.at == NOW - 600 + 300 and plan.rule == decide.RULE_GPU_DEMAND
    # kept: not before the keep ends
    plan = decide.planned_release(
        idle_view(gpu_activity=(Activity("idle", 0.0, NOW - 600),), kept_until=NOW + 3600),
        NOW,
        RULES,
    )
    assert plan.at == NOW + 3600
    # busy, or a kernel running code: no release foreseen but the lease's end
    busy = idle_view(gpu_activity=(Activity("busy", 1.0, None),), lease_start=NOW - 600)
    plan = decide.planned_release(busy, NOW, RULES)
    assert plan.rule == decide.RULE_MAX_LEASE and plan.at == NOW - 600 + 24 * 3600
    assert decide.planned_release(idle_view(gpus=0), NOW, RULES) is None
