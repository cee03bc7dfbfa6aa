"""What a server's user asks for in JupyterLab, and what they are told there.

The requests come in the server's own report (`gpuhub.core.protocol.UserRequest`, authenticated with
the server's token by `ReportHandler`): they act only on the reporting server, for its owner.

- "keep": postpone the idle release (`gpuhub.service.keeps`, within the policy);
- "release": release the GPU now (a release by the user: snapshot, restart without the GPU);
- "gpu-again": after a release, restart with the GPU (`Executor.gpu_again`);
- "switch-now", "not-now", "leave-queue": a server running on CPU while it waits for its GPU
  (`gpuhub.service.cpu_start`).

The answer to every report carries the server's `notices`: the release the rules foresee (when,
why, how long before it JupyterLab warns), whether a keep is possible and how long, the last
release of a server running without its GPU, and the progress of a "GPU again".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..core import decide, protocol
from ..core.decide import ReleaseGpu, ServerView
from ..core.protocol import RequestResult, UserRequest
from .actions import GPU_AGAIN, RULE_USER_REQUEST
from .servers import RunningServer, parse_time

if TYPE_CHECKING:
    from .app import GpuhubService

log = logging.getLogger("gpuhub.service")

Key = tuple[str, str]


class UserRequests:
    """Carries out the requests of one service's servers and keeps their notices."""

    def __init__(self, service: GpuhubService) -> None:
        self.service = service
        self.notices: dict[Key, dict[str, Any]] = {}

    # -- requests --------------------------------------------------------------------------------

    async def handle(
        self, user: str, server: str, requests: Sequence[UserRequest]
    ) -> list[RequestResult]:
        out = []
        for request in requests:
            try:
                ok, message = await self._one((user, server), request)
            except Exception as e:  # never a 500 for the report itself
                log.exception("gpuhub: %s's %s request failed", user, request.kind)
                ok, message = False, f"{type(e).__name__}: {e}"
            log.info("gpuhub: %s/%s asked to %s: %s", user, server, request.kind, message)
            out.append(RequestResult(request.id, ok, message))
        return out

    async def _one(self, key: Key, request: UserRequest) -> tuple[bool, str]:
        service = self.service
        running = service.running.get(key)
        if request.kind == protocol.GPU_AGAIN:
            try:
                row = await service.executor.gpu_again(key[0], key[1], actor=key[0])
            except LookupError as e:
                return False, f"no GPU to have again: {e}"
            except RuntimeError as e:
                return False, str(e)
            log.info("gpuhub: %s/%s: GPU again %s", key[0], key[1], row.status)
            return True, "the server restarts with its GPU; your variables come back"
        if request.kind in (protocol.SWITCH_NOW, protocol.NOT_NOW, protocol.LEAVE_QUEUE):
            ok, message = service.cpu_start.request(key, request.kind)
            if ok:
                self._queue_changed(key)
            return ok, message
        if running is None:
            return False, "the service has not seen this server running yet; try again shortly"
        if request.kind == protocol.KEEP:
            now = time.time()
            answer = service.keeps.ask(
                running,
                float(request.seconds or 0),
                service.longest_wait_for(running.gpu_type),
                now,
            )
            if answer.ok and answer.until is not None:
                self._kept(key, answer.until)
            return answer.ok, answer.message
        if request.kind == protocol.RELEASE_NOW:
            if running.gpus <= 0:
                return False, "this server holds no GPU"
            if service.executor.busy(key):
                return False, "an action on this server is under way"
            action = ReleaseGpu(
                running.user,
                running.server,
                RULE_USER_REQUEST,
                f"{running.user} gave the GPU back",
                running.gpus,
                running.gpu_type,
                True,
            )
            service.executor.run_for(key, service.executor.act(action, running, actor=key[0]))
            return True, "the GPU goes back now: variables saved, restart without the GPU"
        return False, f"unknown request {request.kind!r}"

    def _queue_changed(self, key: Key) -> None:
        """The queue notices of `key` as `cpu_start` says now (after the user's request)."""
        notices = self.notices.get(key)
        if notices is None:
            return
        notices.pop("queue", None)
        notices.pop("gpu_turn", None)
        notices.update(self.service.cpu_start.notices_for(key))

    def _kept(self, key: Key, until: float) -> None:
        notices = self.notices.get(key)
        if notices is None:
            return
        notices["keep_until"] = protocol.iso(until)
        at = notices.get("release_at_s")
        if at is not None and notices.get("release_rule") != decide.RULE_MAX_LEASE and at < until:
            notices["release_at_s"] = until
            notices["release_at"] = protocol.iso(until)

    # -- notices ---------------------------------------------------------------------------------

    def update_notices(
        self,
        views: Iterable[ServerView],
        running: Iterable[RunningServer],
        now: float,
        limits: Mapping[Key, Any] | None,
    ) -> None:
        """The notices of every running server after a cycle; a held report of a server whose
        notices changed is answered at once."""
        service = self.service
        by_view = {v.key: v for v in views}
        fresh: dict[Key, dict[str, Any]] = {}
        for server in running:
            fresh[server.key] = self.notices_of(server, by_view.get(server.key), now, limits)
        for key, notices in fresh.items():
            if self.notices.get(key) != notices:
                service.board.wake(key)
        self.notices = fresh

    def notices_of(
        self,
        server: RunningServer,
        view: ServerView | None,
        now: float,
        limits: Mapping[Key, Any] | None,
    ) -> dict[str, Any]:
        service = self.service
        notices: dict[str, Any] = {"warn_before_s": service.release_notice_before}
        plan = None
        if view is not None:
            waiting = service.longest_wait_for(server.gpu_type) > 0
            plan = decide.planned_release(
                view,
                now,
                service.policy_rules,
                (limits or {}).get(server.key),
                under_demand=waiting,
            )
        if plan is not None:
            notices["release_at_s"] = plan.at
            notices["release_at"] = protocol.iso(plan.at)
            notices["release_rule"] = plan.rule
            notices["release_reason"] = plan.reason
        kept = view.kept_until if view is not None else None
        notices["keep_until"] = protocol.iso(kept) if kept and kept > now else None
        refused = service.keeps.refusal(server, service.longest_wait_for(server.gpu_type))
        notices["keep"] = {
            "allowed": refused is None,
            "max_s": service.keeps.rules.max_for(server.groups),
            "refused": refused,
        }
        # a server running on CPU while it waits for its GPU: its place, and its turn
        notices.update(service.cpu_start.notices_for(server.key))
        if server.gpus <= 0:
            release = service.executor.last_release(server.user, server.server)
            started = parse_time(server.started)
            if release is not None and (
                started is None or release.updated_at.timestamp() >= started - 60
            ):
                notices["released"] = {
                    "at": protocol.iso(release.updated_at.timestamp()),
                    "reason": release.reason,
                }
        return notices

    def _gpu_again(self, key: Key) -> dict[str, Any] | None:
        """A "GPU again" of `key` under way (or failed in the last 10 minutes), from the history."""
        rows = [
            r
            for r in self.service.ledger.rows.values()
            if r.kind == GPU_AGAIN and (r.user, r.server) == key
        ]
        if not rows:
            return None
        row = max(rows, key=lambda r: r.id)
        if row.status == "done" or (
            not row.open and time.time() - row.updated_at.timestamp() > 600
        ):
            return None
        return {"status": row.status, "reason": row.error or row.reason}

    def answer(self, key: Key) -> dict[str, Any]:
        """The notices for the answer to `key`'s report (plain JSON); the progress of a "GPU again"
        as it is now (under `give_back`, its key in the protocol)."""
        notices = dict(self.notices.get(key) or {})
        notices.pop("release_at_s", None)
        notices.pop("give_back", None)
        progress = self._gpu_again(key)
        if progress is not None:
            notices["give_back"] = progress
        return notices
