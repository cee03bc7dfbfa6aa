"""The one snapshot-then-stop sequence, used by every action that ends a server's run: a release
and a stop of the service's cycle (`Executor.act`), "GPU again" (`Executor.gpu_again`) and the
culler arbiter's yes (`arbiter.decide_cull`).

The steps, each written to the action's row in the store's history before it is taken:

1. **snapshot**: the server is asked, through the report protocol, to snapshot its kernels
   (a command it carries out for its own user; its result comes in a later report);
2. **wait** for that result within the deadline (`snapshot_timeout`, plus
   `forced_snapshot_deadline` for running kernels when the action is forced);
3. **refuse** to stop when the snapshot failed, unless the action is forced (the maximum lease,
   a person's decision), which goes ahead without it; a kernel that started running code calls
   an unforced action off;
4. **stop** the server through the hub API (or leave the stop to the culler, which asked);
5. **record** how it went (`snapshotted`/`stopping`, or `done` when the culler stops it;
   `snapshot-failed`, `aborted` or `failed` when it ended early).

What comes after the stop (start again without the GPU, with it, or nothing) is the caller's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core import protocol
from ..store import ActionRecord, ActionStatus
from .hubapi import HubClient
from .metrics import Metrics
from .reports import CommandTimeout, ReportBoard
from .servers import RunningServer

if TYPE_CHECKING:
    from .actions import ActionSettings, Ledger

log = logging.getLogger("gpuhub.service")


class SnapshotFailed(Exception):
    pass


class SnapshotAborted(Exception):
    """A kernel started running code between the decision and the snapshot."""


def check_snapshot(
    outcome: protocol.SnapshotOutcome, *, busy_ok: bool = False
) -> list[dict[str, Any]]:
    """The summary of a good snapshot; `SnapshotFailed` / `SnapshotAborted` otherwise. With
    `busy_ok` (a forced action) kernels still running code are left out instead of calling the
    action off."""
    summary = [e.summary() for e in outcome.entries]
    failed = [e for e in outcome.entries if e.status not in ("saved", "unsupported", "busy")]
    if failed:
        raise SnapshotFailed(
            "; ".join(f"kernel {e.kernel_id}: {e.error or e.status}" for e in failed)
        )
    busy = [e for e in outcome.entries if e.status == "busy"]
    if busy and not busy_ok:
        raise SnapshotAborted("a kernel is running code")
    if not outcome.ok and not busy:
        raise SnapshotFailed("the server reported the snapshot as not ok")
    return summary


@dataclass(frozen=True)
class StopPlan:
    """How one run of the sequence goes."""

    #: False: decided without a snapshot (only after `force_after_snapshot_failures`)
    snapshot: bool = True
    #: the maximum lease or a person: running kernels get a deadline and are left out, a failed
    #: snapshot does not call the stop off
    forced: bool = False
    #: the culler stops the server itself once told yes: the row ends `done` after the snapshot
    culler_stops: bool = False
    #: how a row called off by a kernel running code ends
    aborted_as: ActionStatus = ActionStatus.ABORTED
    #: called with the row just before the stop (the notice of a stop)
    before_stop: Callable[[ActionRecord], Awaitable[None]] | None = None


@dataclass(frozen=True)
class Outcome:
    """Where the sequence left the row: `stopped` (or, with `culler_stops`, agreed to) or not,
    why not (the snapshot's or the stop's error), and the snapshot's failure, also when a forced
    action went ahead without it."""

    row: ActionRecord
    stopped: bool
    error: Exception | None = None
    snapshot_failure: SnapshotFailed | None = None


class SnapshotThenStop:
    """The steps above, against one hub client, report board and action history."""

    def __init__(
        self,
        client: HubClient,
        board: ReportBoard,
        ledger: Ledger,
        metrics: Metrics,
        settings: ActionSettings,
    ) -> None:
        self.client = client
        self.board = board
        self.ledger = ledger
        self.metrics = metrics
        self.settings = settings

    async def run(self, row: ActionRecord, server: RunningServer, plan: StopPlan) -> Outcome:
        """Snapshot, wait, refuse or go ahead, stop, record (see the module)."""
        label = f"{server.user}/{server.server}" if server.server else server.user
        snapshotted: dict[str, Any] = {"snapshots": []}
        failure: SnapshotFailed | None = None
        if plan.snapshot:
            if row.status != ActionStatus.SNAPSHOTTING:
                row = self.ledger.update(row, status=ActionStatus.SNAPSHOTTING)
            try:
                summary = await self.snapshot(server, forced=plan.forced)
            except SnapshotAborted as e:
                row = self.ledger.update(row, status=plan.aborted_as, error=str(e))
                log.info("gpuhub: %s of %s called off: %s", row.kind, label, e)
                return Outcome(row, False, e)
            except SnapshotFailed as e:
                if not plan.forced:
                    row = self.ledger.update(row, status=ActionStatus.SNAPSHOT_FAILED, error=str(e))
                    log.warning("gpuhub: snapshot of %s failed, nothing done: %s", label, e)
                    return Outcome(row, False, e, e)
                failure = e
                snapshotted = {"snapshots": [], "error": f"no snapshot: {e}"}
                log.warning(
                    "gpuhub: %s of %s goes ahead without a snapshot: %s", row.kind, label, e
                )
            else:
                busy = [s for s in summary if s.get("status") == "busy"]
                snapshotted = {
                    "snapshots": summary,
                    "error": (
                        f"{len(busy)} kernel(s) still running code after "
                        f"{self.settings.forced_snapshot_deadline:g} s were not saved"
                        if busy
                        else None
                    ),
                }
        if plan.culler_stops:
            row = self.ledger.update(row, status=ActionStatus.DONE, **snapshotted)
            return Outcome(row, True, None, failure)
        row = self.ledger.update(row, status=ActionStatus.SNAPSHOTTED, **snapshotted)
        if plan.before_stop is not None:
            await plan.before_stop(row)
        row = self.ledger.update(row, status=ActionStatus.STOPPING)
        try:
            await self.stop(server.user, server.server)
        except Exception as e:
            row = self.fail(row, "stop", e)
            return Outcome(row, False, e, failure)
        return Outcome(row, True, None, failure)

    async def snapshot(
        self, server: RunningServer, *, forced: bool = False
    ) -> list[dict[str, Any]]:
        """Have the server snapshot its kernels (a command it carries out for its own user) and
        wait for the result."""
        if self.board.latest(server.key, self.settings.report_max_age) is None:
            raise SnapshotFailed(
                f"the server has not reported for {self.settings.report_max_age:g} s "
                "(gpuhub's extension is off or the server does not answer)"
            )
        deadline = self.settings.forced_snapshot_deadline if forced else 0.0
        started = time.monotonic()
        try:
            result = await self.board.request(
                server.key,
                protocol.SNAPSHOT,
                {"wait": forced, "deadline_s": deadline},
                self.settings.snapshot_timeout + deadline,
            )
        except CommandTimeout as e:
            raise SnapshotFailed(str(e)) from e
        finally:
            self.metrics.snapshot_duration.observe(time.monotonic() - started)
        if not result.ok:
            raise SnapshotFailed(result.error or "the server could not snapshot its kernels")
        try:
            outcome = protocol.parse_snapshot_result(result.data)
        except protocol.ProtocolError as e:
            raise SnapshotFailed(f"unexpected snapshot result: {e}") from e
        return check_snapshot(outcome, busy_ok=forced)

    async def stop(self, user: str, server: str) -> None:
        await self.client.stop_server(user, server)
        await self.client.wait_for_server(user, server, "stopped", self.settings.stop_timeout)

    def fail(self, row: ActionRecord, step: str, error: Exception) -> ActionRecord:
        """Close `row` as failed at `step` (counted in `gpuhub_action_failures_total`)."""
        message = f"{step}: {error}"
        row = self.ledger.update(row, status=ActionStatus.FAILED, error=message[:2000])
        self.metrics.action_failures.labels(kind=row.kind, step=step).inc()
        label = f"{row.user}/{row.server}" if row.server else row.user
        log.error("gpuhub: %s of %s failed at the %s: %s", row.kind, label, step, error)
        return row
