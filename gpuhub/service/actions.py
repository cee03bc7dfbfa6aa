"""Carrying out what `policy.decide` returns: snapshot, then release (restart without GPU) or stop;
warnings; and "GPU again" on the user's request.

Every action is a row in the store's action history (`Store.record_action`): who (the service or
a person), what, why, when, which snapshot, and the step it reached. The step is written before
it is taken, so a service that is restarted in the middle of an action finds the row and
finishes that action instead of starting a second one:

    planned -> snapshotting -> snapshotted -> stopping -> starting -> done
                           \\-> snapshot-failed        \\-> failed    \\-> failed
                           \\-> aborted (a kernel started running code)

An action interrupted before `stopping` changed nothing on the server; it is taken up again if
the rule still applies at the next cycle, or closed as `abandoned`. Nothing is released or stopped
without a good snapshot unless the decision says so (`snapshot=False`, only after
`force_after_snapshot_failures`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..core import protocol
from ..core.decide import RULE_MAX_LEASE, Action, ReleaseGpu, StopServer, Warn
from ..store import ACTION_OPEN, ActionRecord, ActionStatus, Store
from . import notices
from .hubapi import HubAPIError, HubClient
from .metrics import Metrics
from .reports import CommandTimeout, ReportBoard
from .servers import RunningServer
from .stopping import (
    SnapshotAborted,
    SnapshotFailed,
    SnapshotThenStop,
    StopPlan,
    check_snapshot,
)

log = logging.getLogger("gpuhub.service")

#: the kinds of action in the history; "GPU again" keeps its stored spelling "give-back"
RELEASE, STOP, WARN, GPU_AGAIN = "release", "stop", "warn", "give-back"
RULE_USER_REQUEST = "user-request"

RunKey = tuple[str, str, str | None]  # user, server, the run's `started`


def run_key(server: RunningServer) -> RunKey:
    return (server.user, server.server, server.started)


def record_run(record: ActionRecord) -> RunKey:
    return (record.user, record.server, record.server_started)


@dataclass(frozen=True)
class ActionSettings:
    snapshot_timeout: float = 900.0
    stop_timeout: float = 120.0
    spawn_timeout: float = 300.0
    notice_file: str = "GPUHUB-NOTICE.md"
    hub_url: str = ""
    dry_run: bool = False
    actor: str = "gpuhub-service"
    command_timeout: float = 60.0
    #: kernels running code are waited for this long before a forced snapshot (maximum lease,
    #: an admin's release or stop)
    forced_snapshot_deadline: float = 120.0
    #: a server without a report this recent cannot carry out a snapshot now
    report_max_age: float = 120.0


class Ledger:
    """The action history as the service needs it each cycle, kept in memory and refreshed
    with the rows added since the last look (the service is the only writer of its own rows)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.rows: dict[int, ActionRecord] = {}
        self.by_run: dict[RunKey, list[int]] = {}
        self.max_id = 0

    def refresh(self) -> None:
        for record in sorted(
            self.store.actions(since_id=self.max_id, limit=None), key=lambda r: r.id
        ):
            self.put(record)

    def put(self, record: ActionRecord) -> ActionRecord:
        if record.id not in self.rows:
            self.by_run.setdefault(record_run(record), []).append(record.id)
        self.rows[record.id] = record
        self.max_id = max(self.max_id, record.id)
        return record

    def record(self, **kwargs: Any) -> ActionRecord:
        return self.put(self.store.record_action(**kwargs))

    def update(self, record: ActionRecord, **changes: Any) -> ActionRecord:
        return self.put(self.store.update_action(record.id, **changes))

    def for_run(self, run: RunKey) -> list[ActionRecord]:
        return [self.rows[i] for i in self.by_run.get(run, ())]

    def open_rows(self) -> list[ActionRecord]:
        return sorted((r for r in self.rows.values() if r.open), key=lambda r: r.id)

    def open_for(self, run: RunKey, kind: str) -> ActionRecord | None:
        return next((r for r in self.for_run(run) if r.open and r.kind == kind), None)

    def snapshot_failures(self, run: RunKey) -> tuple[int, float | None]:
        """Consecutive failed snapshots of this run of the server, and when the last one was."""
        count, last = 0, None
        for r in reversed(self.for_run(run)):
            if r.kind == WARN or r.status in (ActionStatus.ABORTED, ActionStatus.ABANDONED):
                continue
            if r.status != ActionStatus.SNAPSHOT_FAILED:
                break
            count += 1
            last = last or r.updated_at.timestamp()
        return count, last

    def warned_at(self, run: RunKey, rule: str) -> float | None:
        for r in self.for_run(run):
            if r.kind == WARN and r.rule == rule:
                return r.created_at.timestamp()
        return None

    def prune(self, keep: Iterable[RunKey]) -> None:
        """Forget closed rows of runs that are over (they stay in the store)."""
        keep = set(keep)
        for run in list(self.by_run):
            if run in keep:
                continue
            ids = [i for i in self.by_run[run] if self.rows[i].open]
            for i in self.by_run[run]:
                if i not in ids:
                    del self.rows[i]
            if ids:
                self.by_run[run] = ids
            else:
                del self.by_run[run]


class Executor:
    """Runs actions as tasks (one at a time per server) and finishes interrupted ones."""

    def __init__(
        self,
        client: HubClient,
        board: ReportBoard,
        store: Store,
        metrics: Metrics,
        settings: ActionSettings,
        concurrency: int = 4,
    ) -> None:
        self.client = client
        self.board = board
        self.store = store
        self.metrics = metrics
        self.settings = settings
        self.ledger = Ledger(store)
        #: the one snapshot-then-stop sequence (releases, stops, GPU again, the culler's stops)
        self.sequence = SnapshotThenStop(client, board, self.ledger, metrics, settings)
        self.tasks: dict[tuple[str, str], asyncio.Task] = {}
        self.concurrency = max(1, concurrency)
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self.planned: list[dict[str, Any]] = []  # the last cycle's decisions (dry run included)

    # -- bookkeeping -----------------------------------------------------------------------------

    def busy(self, key: tuple[str, str]) -> bool:
        task = self.tasks.get(key)
        return task is not None and not task.done()

    def _slot(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots, self._slots_loop = asyncio.Semaphore(self.concurrency), loop
        return self._slots

    def run_for(self, key: tuple[str, str], coro: Any) -> asyncio.Task:
        """Run `coro` (an action on the server `key`) in the background; see `busy`."""

        async def guarded() -> None:
            async with self._slot():
                try:
                    await coro
                except Exception:
                    log.exception("gpuhub: action on %s/%s failed unexpectedly", *key)

        task = asyncio.create_task(guarded())
        self.tasks[key] = task
        task.add_done_callback(
            lambda t: self.tasks.pop(key, None) if self.tasks.get(key) is t else None
        )
        return task

    async def wait(self) -> None:
        """Wait for every action under way."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks.values()), return_exceptions=True)

    # -- a cycle's decisions ---------------------------------------------------------------------

    def submit(
        self, actions: Iterable[Action], servers: Mapping[tuple[str, str], RunningServer]
    ) -> None:
        self.planned = []
        for action in actions:
            server = servers[(action.user, action.server)]
            kind = notices.kind_of(action)
            self.planned.append(
                {
                    "user": action.user,
                    "server": action.server,
                    "kind": kind,
                    "rule": action.rule,
                    "reason": action.reason,
                }
            )
            if self.settings.dry_run:
                if kind != WARN or self.ledger.warned_at(run_key(server), action.rule) is None:
                    log.info(
                        "gpuhub: DRY RUN: would %s %s (%s): %s",
                        kind,
                        server.label,
                        action.rule,
                        action.reason,
                    )
                continue
            if self.busy(server.key):
                continue
            if isinstance(action, Warn):
                self.run_for(server.key, self.warn(action, server))
            else:
                self.run_for(server.key, self.act(action, server))

    def close_abandoned(
        self,
        actions: Iterable[Action],
        running: Mapping[tuple[str, str], RunningServer],
        undecided: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Close open rows that changed nothing on the server and that this cycle's decisions do
        not take up again (same server run, same kind of action). Servers in `undecided` (their
        GPUs' activity or their report not known yet, e.g. just after a restart of the service)
        keep their rows for a later cycle."""
        undecided = set(undecided)
        decided = {
            ((a.user, a.server), notices.kind_of(a)) for a in actions if not isinstance(a, Warn)
        }
        for row in self.ledger.open_rows():
            key = (row.user, row.server)
            if row.status not in (
                ActionStatus.PLANNED,
                ActionStatus.SNAPSHOTTING,
                ActionStatus.SNAPSHOTTED,
            ) or self.busy(key):
                continue
            if key in undecided:
                continue
            server = running.get(key)
            if (
                server is not None
                and server.started == row.server_started
                and (key, row.kind) in decided
            ):
                continue
            self.ledger.update(
                row,
                status=ActionStatus.ABANDONED,
                error="interrupted before the server was changed; the rule no longer applies",
            )
            log.info(
                "gpuhub: closed interrupted %s of %s/%s: no longer applies",
                row.kind,
                row.user,
                row.server,
            )

    def resume_interrupted(self) -> None:
        """Finish the actions a previous run of the service left after changing the server."""
        for row in self.ledger.open_rows():
            key = (row.user, row.server)
            if row.status in (ActionStatus.STOPPING, ActionStatus.STARTING) and not self.busy(key):
                log.warning(
                    "gpuhub: finishing the interrupted %s of %s/%s (it had reached %r)",
                    row.kind,
                    row.user,
                    row.server,
                    row.status,
                )
                self.run_for(key, self.resume(row))

    # -- warnings --------------------------------------------------------------------------------

    async def warn(self, action: Warn, server: RunningServer) -> None:
        run = run_key(server)
        if self.ledger.warned_at(run, action.rule) is not None:
            return
        row = self.ledger.record(
            user=server.user,
            server=server.server,
            kind=WARN,
            rule=action.rule,
            reason=action.reason,
            actor=self.settings.actor,
            status=ActionStatus.DONE,
            server_started=server.started,
            gpus=server.gpus,
            gpu_type=server.gpu_type,
            user_options=server.user_options,
        )
        self.metrics.notices.labels(rule=action.rule).inc()
        log.info("gpuhub: told %s: %s", server.label, action.reason)
        await self.notify(server.model, row, WARN)

    async def notify(self, model: Mapping[str, Any], row: ActionRecord, kind: str) -> None:
        """Have the server write the notice file into its user's home (a command the server
        carries out; best effort: the store has the notice anyway)."""
        if not self.settings.notice_file:
            return
        text = notices.render(
            kind,
            row.reason,
            at=time.time(),
            gpus=row.gpus,
            snapshots=row.snapshots,
            hub_url=self.settings.hub_url,
        )
        try:
            result = await self.board.request(
                (row.user, row.server),
                protocol.NOTICE,
                {"path": self.settings.notice_file, "text": text},
                self.settings.command_timeout,
            )
        except CommandTimeout as e:
            log.warning("gpuhub: no notice in %s's home: %s", _label(row), e)
            return
        if not result.ok:
            log.warning("gpuhub: no notice in %s's home: %s", _label(row), result.error)
            return
        self.ledger.update(row, notified_at=_utcnow())

    # -- releases and stops ----------------------------------------------------------------------

    async def act(self, action: Action, server: RunningServer, actor: str | None = None) -> None:
        kind = RELEASE if isinstance(action, ReleaseGpu) else STOP
        assert isinstance(action, (ReleaseGpu, StopServer))
        run = run_key(server)
        row = self.ledger.open_for(run, kind)
        if row is None:
            row = self.ledger.record(
                user=server.user,
                server=server.server,
                kind=kind,
                rule=action.rule,
                reason=action.reason,
                actor=actor or self.settings.actor,
                status=ActionStatus.PLANNED,
                server_started=server.started,
                gpus=server.gpus,
                gpu_type=server.gpu_type,
                user_options=server.user_options,
            )
        else:
            row = self.ledger.update(
                row, rule=action.rule, reason=action.reason, status=ActionStatus.PLANNED
            )
            log.info("gpuhub: taking up the interrupted %s of %s again", kind, server.label)
        log.info("gpuhub: %s %s (%s): %s", kind, server.label, action.rule, action.reason)

        # The maximum lease and a person's decision go ahead after a snapshot attempt with a
        # deadline; the idle rules are called off by a running kernel or a failed snapshot.
        forced = action.rule == RULE_MAX_LEASE or (
            actor is not None and actor != self.settings.actor
        )

        async def notify_stop(current: ActionRecord) -> None:
            await self.notify(server.model, current, STOP)

        outcome = await self.sequence.run(
            row,
            server,
            StopPlan(
                snapshot=action.snapshot,
                forced=forced,
                before_stop=notify_stop if kind == STOP else None,
            ),
        )
        if outcome.snapshot_failure is not None:
            self.metrics.snapshot_failures.inc()
        if not outcome.stopped:
            return
        row = outcome.row
        if kind == STOP:
            self.ledger.update(row, status=ActionStatus.DONE)
            self.metrics.stops.labels(rule=row.rule).inc()
            return
        await self.start(row, _without_gpus(row.user_options or {}))

    async def start(self, row: ActionRecord, options: Mapping[str, Any]) -> None:
        """Start the server with `options` and wait for it; the row ends `done` or `failed`."""
        row = self.ledger.update(row, status=ActionStatus.STARTING)
        try:
            await self.client.start_server(row.user, row.server, options)
            model = await self.client.wait_for_server(
                row.user, row.server, "ready", self.settings.spawn_timeout
            )
        except Exception as e:
            if row.kind == GPU_AGAIN and isinstance(e, HubAPIError) and 400 <= e.status < 500:
                await self._fall_back(row, e)
                return
            self._failed(row, "start", e)
            return
        row = self.ledger.update(row, status=ActionStatus.DONE)
        if row.kind == RELEASE:
            self.metrics.releases.labels(rule=row.rule, gpu_type=row.gpu_type or "").inc()
        log.info("gpuhub: %s of %s done", row.kind, _label(row))
        if model is not None:
            await self.notify(model, row, row.kind)

    async def _fall_back(self, row: ActionRecord, error: HubAPIError) -> None:
        """A GPU asked back could not be had: start the server as it was, without GPU."""
        log.warning("gpuhub: %s could not get a GPU back (%s); restarting without", row.user, error)
        try:
            await self.client.start_server(
                row.user, row.server, _without_gpus(row.user_options or {})
            )
            await self.client.wait_for_server(
                row.user, row.server, "ready", self.settings.spawn_timeout
            )
        except Exception as e:
            self._failed(row, "start", e)
            return
        self.ledger.update(
            row, status=ActionStatus.FAILED, error=f"no GPU: {error.message}; restarted without GPU"
        )
        self.metrics.action_failures.labels(kind=row.kind, step="start").inc()

    def _failed(self, row: ActionRecord, step: str, error: Exception) -> None:
        self.sequence.fail(row, step, error)

    async def resume(self, row: ActionRecord) -> None:
        """Finish an action whose service stopped after it began changing the server."""
        try:
            model = await self.client.server_model(row.user, row.server)
        except HubAPIError as e:
            log.warning("gpuhub: cannot resume the %s of %s yet: %s", row.kind, _label(row), e)
            return
        if row.status == ActionStatus.STOPPING:
            if model is not None:
                ours = model.get("started") == row.server_started or model.get("pending") == "stop"
                if not ours:
                    self.ledger.update(
                        row,
                        status=ActionStatus.DONE,
                        error="the server was started again in the meantime",
                    )
                    return
                try:
                    await self.sequence.stop(row.user, row.server)
                except Exception as e:
                    self._failed(row, "stop", e)
                    return
            if row.kind == STOP:
                self.ledger.update(row, status=ActionStatus.DONE)
                self.metrics.stops.labels(rule=row.rule).inc()
                return
            await self.start(row, self._start_options(row))
            return
        # "starting": the start was asked for, or was about to be
        if model is None:
            await self.start(row, self._start_options(row))
            return
        try:
            model = await self.client.wait_for_server(
                row.user, row.server, "ready", self.settings.spawn_timeout
            )
        except Exception as e:
            self._failed(row, "start", e)
            return
        row = self.ledger.update(row, status=ActionStatus.DONE)
        if row.kind == RELEASE:
            self.metrics.releases.labels(rule=row.rule, gpu_type=row.gpu_type or "").inc()
        if model is not None:
            await self.notify(model, row, row.kind)

    @staticmethod
    def _start_options(row: ActionRecord) -> dict[str, Any]:
        options = dict(row.user_options or {})
        return options if row.kind == GPU_AGAIN else _without_gpus(options)

    # -- GPU again -------------------------------------------------------------------------------

    def last_release(self, user: str, server: str) -> ActionRecord | None:
        for row in self.store.actions(
            user, server, kinds=[RELEASE], statuses=[ActionStatus.DONE], limit=1
        ):
            return row
        return None

    async def gpu_again(self, user: str, server: str, actor: str) -> ActionRecord:
        """Restart `user`'s `server` with the options it had before its GPU was released
        (kernels snapshotted first, as for a release). Raises `LookupError` when there is no
        released GPU to have again, `RuntimeError` when the server is busy with another action."""
        if self.busy((user, server)):
            raise RuntimeError("an action on this server is under way")
        release = self.last_release(user, server)
        if release is None or not release.user_options:
            raise LookupError(f"no GPU of {user}/{server} was released")
        model = await self.client.server_model(user, server)
        row, sequence = self._gpu_sequence(
            user,
            server,
            model,
            dict(release.user_options),
            gpus=release.gpus,
            gpu_type=release.gpu_type,
            actor=actor,
            rule=RULE_USER_REQUEST,
            reason=f"{actor} asked for the GPU back",
        )
        self.run_for((user, server), sequence)
        return row

    def restart_with_gpu(
        self,
        user: str,
        server: str,
        options: Mapping[str, Any],
        *,
        gpus: int,
        gpu_type: str | None,
        actor: str,
        rule: str,
        reason: str,
        before_stop: Callable[[], None] | None = None,
    ) -> None:
        """The "GPU again" sequence for a server that runs without the GPU it waits for
        (gpuhub.service.cpu_start): snapshot, stop, start with `options`, in the background.
        `before_stop` runs after a good snapshot, before the stop."""
        if self.busy((user, server)):
            raise RuntimeError("an action on this server is under way")

        async def run() -> None:
            model = await self.client.server_model(user, server)
            _row, sequence = self._gpu_sequence(
                user,
                server,
                model,
                dict(options),
                gpus=gpus,
                gpu_type=gpu_type,
                actor=actor,
                rule=rule,
                reason=reason,
                before_stop=before_stop,
            )
            await sequence

        self.run_for((user, server), run())

    def _gpu_sequence(
        self,
        user: str,
        server: str,
        model: Mapping[str, Any] | None,
        options: dict[str, Any],
        *,
        gpus: int,
        gpu_type: str | None,
        actor: str,
        rule: str,
        reason: str,
        before_stop: Callable[[], None] | None = None,
    ) -> tuple[ActionRecord, Coroutine[Any, Any, None]]:
        """The give-back's row (recorded now) and its sequence: snapshot a ready server, stop it,
        start it with `options`."""
        row = self.ledger.record(
            user=user,
            server=server,
            kind=GPU_AGAIN,
            rule=rule,
            reason=reason,
            actor=actor,
            status=ActionStatus.PLANNED,
            server_started=(model or {}).get("started"),
            gpus=gpus,
            gpu_type=gpu_type,
            user_options=options,
        )

        async def tell(_row: ActionRecord) -> None:
            if before_stop is not None:
                before_stop()

        async def run() -> None:
            current = row
            if model is not None and model.get("ready"):
                running = RunningServer(user, server, frozenset(), model)
                outcome = await self.sequence.run(
                    current,
                    running,
                    StopPlan(aborted_as=ActionStatus.SNAPSHOT_FAILED, before_stop=tell),
                )
                if not outcome.stopped:
                    return
                current = outcome.row
            await self.start(current, options)

        return row, run()


def _without_gpus(options: Mapping[str, Any]) -> dict[str, Any]:
    return {**options, "gpus": 0}


def _label(row: ActionRecord) -> str:
    return f"{row.user}/{row.server}" if row.server else row.user


def _utcnow() -> Any:
    from ..store import utcnow

    return utcnow()


__all__ = [
    "ACTION_OPEN",
    "ActionSettings",
    "Executor",
    "Ledger",
    "SnapshotAborted",
    "SnapshotFailed",
    "check_snapshot",
]
