"""Servers running on CPU while they wait for their GPU, in the service (fast: a real store, the
service's collaborators stood in for): entries kept alive, the turn offered first and switched
after the notice, "not now" keeps the place and after the limit goes to the back, leaving the
queue, a gone server's entry dropped, and the answer's notices as the server parses them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from gpuhub.core import protocol
from gpuhub.service.actions import ActionSettings
from gpuhub.service.cpu_start import RULE_QUEUE_TURN, CpuStart, CpuStartRules
from gpuhub.service.servers import RunningServer
from gpuhub.store import Store, utcnow

OPTIONS = {
    "interface": "jupyterlab",
    "environment": "pytorch",
    "gpus": 1,
    "gpu_type": "a100",
    "when_no_gpu": "start-on-cpu",
}


@dataclass
class FakeExecutor:
    settings: ActionSettings = field(default_factory=ActionSettings)
    switched: list[tuple[str, str, dict[str, Any], str]] = field(default_factory=list)
    warned: list[tuple[str, str]] = field(default_factory=list)
    busy_keys: set[tuple[str, str]] = field(default_factory=set)

    def busy(self, key: tuple[str, str]) -> bool:
        return key in self.busy_keys

    def restart_with_gpu(self, user, server, options, **kw) -> None:  # type: ignore[no-untyped-def]
        kw["before_stop"]()
        self.switched.append((user, server, dict(options), kw["rule"]))

    def warn(self, action, server):  # type: ignore[no-untyped-def]
        self.warned.append((server.user, action.rule))
        return None

    def run_for(self, key, coro) -> None:  # type: ignore[no-untyped-def]
        pass


@dataclass
class FakeBoard:
    woken: list[tuple[str, str]] = field(default_factory=list)

    def wake(self, key: tuple[str, str]) -> None:
        self.woken.append(key)


@dataclass
class FakeService:
    store: Store
    executor: FakeExecutor = field(default_factory=FakeExecutor)
    board: FakeBoard = field(default_factory=FakeBoard)
    queue_stale_after: float = 60.0
    running: dict[tuple[str, str], RunningServer] = field(default_factory=dict)


def on_cpu(user: str, server: str = "") -> RunningServer:
    model = {"ready": True, "started": "2026-11-30T01:00:00Z", "user_options": {"gpus": 0}}
    return RunningServer(user, server, frozenset(), model)


@pytest.fixture
def service(tmp_path):
    return FakeService(Store(f"sqlite:///{tmp_path / 'gpuhub.sqlite'}"))


def wait_on_cpu(service: FakeService, user: str, minutes_ago: float = 0) -> None:
    service.store.enqueue(
        user,
        "",
        "a100",
        1,
        user_options=OPTIONS,
        now=utcnow() - timedelta(minutes=minutes_ago),
        on_cpu=True,
    )
    service.running[(user, "")] = on_cpu(user)


def test_place_then_turn_offered_first_then_switched(service):
    rules = CpuStartRules(switch_notice=0.0, not_now_delay=600, not_now_limit=3)
    cpu = CpuStart(service, rules)
    wait_on_cpu(service, "ann", minutes_ago=2)
    wait_on_cpu(service, "ben", minutes_ago=1)

    cpu.cycle(service.running, {"a100": 0})
    assert cpu.notices_for(("ann", ""))["queue"]["place"] == 1
    assert cpu.notices_for(("ben", ""))["queue"]["place"] == 2
    assert "gpu_turn" not in cpu.notices_for(("ann", ""))
    assert service.executor.switched == []

    # one GPU free: ann's turn; told first (the notice and the notice file), then switched
    rules_later = CpuStartRules(switch_notice=3600.0)
    cpu.rules = rules_later
    cpu.cycle(service.running, {"a100": 1})
    assert service.executor.warned == [("ann", RULE_QUEUE_TURN)]
    turn = cpu.notices_for(("ann", ""))["gpu_turn"]
    assert turn["gpus"] == 1 and turn["switch_at"]
    assert "gpu_turn" not in cpu.notices_for(("ben", "")), "the GPU is kept for the head"
    assert service.executor.switched == []
    cpu.rules = rules
    cpu.cycle(service.running, {"a100": 1})
    [(user, _server, options, rule)] = service.executor.switched
    assert (user, rule, options["gpus"], options["when_no_gpu"]) == (
        "ann",
        RULE_QUEUE_TURN,
        1,
        "start-on-cpu",
    )
    # the switch's stop does not end the request: the entry is no longer "on CPU"
    assert service.store.queue_entry("ann", "").on_cpu is False
    assert service.store.dequeue_on_cpu("ann", "") is False


def test_not_now_keeps_the_place_and_the_limit_sends_to_the_back(service):
    cpu = CpuStart(service, CpuStartRules(switch_notice=3600, not_now_delay=600, not_now_limit=2))
    wait_on_cpu(service, "ann", minutes_ago=2)
    wait_on_cpu(service, "ben", minutes_ago=1)
    cpu.cycle(service.running, {"a100": 1})
    assert service.store.queue_entry("ann", "").offered_at is not None

    ok, message = cpu.request(("ann", ""), protocol.NOT_NOW)
    assert ok and "place is kept" in message
    ann = service.store.queue_entry("ann", "")
    assert ann.offered_at is None and ann.not_now_count == 1 and ann.not_before is not None
    # the GPU goes to the next in line; ann keeps her place for later
    cpu.cycle(service.running, {"a100": 1})
    assert "gpu_turn" in cpu.notices_for(("ben", ""))
    assert cpu.notices_for(("ann", ""))["queue"]["place"] == 1
    assert cpu.notices_for(("ann", ""))["queue"]["not_before"]

    # the second "not now" in a row (the limit): to the back of the line
    service.store.update_queue_entry("ann", "", not_before=None)
    service.store.dequeue("ben", "")
    wait_on_cpu(service, "ben", minutes_ago=1)
    cpu.cycle(service.running, {"a100": 1})
    ok, message = cpu.request(("ann", ""), protocol.NOT_NOW)
    assert ok and "back of the line" in message
    service.store.update_queue_entry("ann", "", not_before=None)
    cpu.cycle(service.running, {"a100": 0})
    assert cpu.notices_for(("ann", ""))["queue"]["place"] == 2
    assert cpu.notices_for(("ben", ""))["queue"]["place"] == 1


def test_switch_now_only_at_the_turn_and_leave_the_queue(service):
    cpu = CpuStart(service, CpuStartRules(switch_notice=3600))
    wait_on_cpu(service, "ann")
    cpu.cycle(service.running, {"a100": 0})
    ok, message = cpu.request(("ann", ""), protocol.SWITCH_NOW)
    assert not ok and "not your turn" in message
    cpu.cycle(service.running, {"a100": 1})
    ok, _ = cpu.request(("ann", ""), protocol.SWITCH_NOW)
    assert ok and service.executor.switched[0][0] == "ann"

    wait_on_cpu(service, "ben")
    ok, message = cpu.request(("ben", ""), protocol.LEAVE_QUEUE)
    assert ok and "keeps running" in message
    assert service.store.queue_entry("ben", "") is None
    # nobody else's request: a server without one is refused
    ok, message = cpu.request(("cy", ""), protocol.NOT_NOW)
    assert not ok and "not waiting" in message


def test_a_gone_server_leaves_the_queue_a_busy_one_keeps_its_place(service):
    cpu = CpuStart(service, CpuStartRules())
    wait_on_cpu(service, "ann")
    wait_on_cpu(service, "ben")
    del service.running[("ann", "")]
    del service.running[("ben", "")]
    old = utcnow() - timedelta(minutes=10)
    service.store.update_queue_entry("ann", "", seen_at=old)
    service.store.update_queue_entry("ben", "", seen_at=old, on_cpu=False)  # being switched
    service.executor.busy_keys.add(("ben", ""))
    cpu.cycle(service.running, {"a100": 0})
    assert service.store.queue_entry("ann", "") is None
    assert service.store.queue_entry("ben", "") is not None


def test_quota_counts_a_request_on_cpu_however_long_ago_it_was_seen(service):
    service.store.enqueue("ann", "", "a100", 1, on_cpu=True, now=utcnow() - timedelta(hours=3))
    since = utcnow() - timedelta(seconds=60)
    assert service.store.gpus_queued("ann", except_server="two", seen_since=since) == 1
    assert service.store.gpus_queued("ann", except_server="", seen_since=since) == 0
    # and no spawner's purge of interrupted waits drops it
    assert service.store.purge_queue(utcnow()) == []


def test_the_answer_notices_parse_on_the_server_side(service):
    cpu = CpuStart(service, CpuStartRules(switch_notice=3600))
    wait_on_cpu(service, "ann")
    cpu.cycle(service.running, {"a100": 1})
    answer = json.loads(json.dumps({"notices": cpu.notices_for(("ann", ""))}))
    notices, _results = protocol.parse_answer_notices(answer)
    assert notices["queue"]["place"] == 1 and notices["queue"]["gpus"] == 1
    assert notices["gpu_turn"]["switch_at"].endswith("Z")
    forged = {"notices": {"gpu_turn": {"switch_at": "soon"}}}
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.parse_answer_notices(forged)
    assert e.value.field == "answer.notices.gpu_turn.switch_at"


def test_a_failed_switch_passes_the_turn_on(service):
    from types import SimpleNamespace

    cpu = CpuStart(service, CpuStartRules(switch_notice=3600, not_now_delay=600))
    wait_on_cpu(service, "ann", minutes_ago=2)
    wait_on_cpu(service, "ben", minutes_ago=1)
    cpu.cycle(service.running, {"a100": 1})
    offered = service.store.queue_entry("ann", "").offered_at
    assert offered is not None
    # the switch was tried and its snapshot failed: nothing changed on ann's server
    failed = SimpleNamespace(
        kind="give-back",
        rule=RULE_QUEUE_TURN,
        user="ann",
        server="",
        created_at=offered + timedelta(seconds=1),
        status="snapshot-failed",
    )
    service.executor.ledger = SimpleNamespace(rows={1: failed})  # type: ignore[attr-defined]
    cpu.cycle(service.running, {"a100": 1})
    ann = service.store.queue_entry("ann", "")
    assert ann.not_before is not None and ann.offered_at is None and ann.on_cpu
    assert service.executor.switched == []
    cpu.cycle(service.running, {"a100": 1})
    assert "gpu_turn" in cpu.notices_for(("ben", "")), "the GPU goes to the next in line"
