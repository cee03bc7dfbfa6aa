"""The hub service's side of the learned release policy (`gpuhub.core.learned`).

Once per cycle `LearnedRelease.update` feeds the cycle's `ServerView`s to the pure `GapModel`,
saves what changed in the store (table `gpuhub_idle_gaps`, so a restart of the service or the hub
does not forget), and returns the per-server GPU idle limits that `policy.decide` takes. The
first call loads the store's state. The settings are a traitlets `Configurable`
(`c.LearnedRelease.gpu_hour_value = ...`), used when the service's `release_policy` is
"learned".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from traitlets import Bool, Float, Int
from traitlets.config import Configurable

from ..core.decide import ServerView
from ..core.learned import SCOPES, SITE, GapModel, IdleTimeout, LearnedSettings
from ..store import Store

log = logging.getLogger("gpuhub.service")

OPEN = "open"

_DEFAULTS = LearnedSettings()


class LearnedRelease(Configurable):
    """The learned release policy's settings, state and per-cycle update."""

    restart_cost = Float(
        _DEFAULTS.restart_cost,
        config=True,
        help="""Seconds a user loses when their released GPU is needed again: the restart of the
        server with its GPUs and the restore of the kernels' state. Measure it on your site
        (the notices' history shows restarts) and set it here.""",
    )
    gpu_hour_value = Float(
        _DEFAULTS.gpu_hour_value,
        config=True,
        help="""Seconds of one user's wait that one idle GPU-hour is worth. Higher: idle GPUs go
        back sooner, with more restarts. The default makes as many restarts as the flat
        30-minute timeout on the notebook trace of docs/performance.md.""",
    )
    min_idle = Float(
        _DEFAULTS.min_idle,
        config=True,
        help="Never release GPUs idle less than this many seconds, whatever was learned.",
    )
    max_idle = Float(
        _DEFAULTS.max_idle,
        config=True,
        help="""Never hold idle GPUs longer than this many seconds, whatever was learned (where
        too little was learned, `gpu_idle_timeout` applies).""",
    )
    prior_weight = Float(
        _DEFAULTS.prior_weight,
        config=True,
        help="""How many pauses the user's (the site's) history weighs in a server's (a user's)
        estimate: the larger, the more a server's own history is needed to move its limit.""",
    )
    min_history = Int(
        _DEFAULTS.min_history,
        config=True,
        help="""Site pauses longer than an idle time needed before the learned policy decides at
        that idle time; with fewer, `gpu_idle_timeout` applies.""",
    )
    gaps_per_key = Int(
        _DEFAULTS.gaps_per_key,
        config=True,
        help="Pauses kept per server and per user (the latest).",
    )
    gaps_site = Int(
        _DEFAULTS.gaps_site, config=True, help="Pauses kept for the whole site (the latest)."
    )
    max_keys = Int(
        _DEFAULTS.max_keys,
        config=True,
        help="""Servers and users with a history, at most; the store keeps at most twice this
        many rows (histories and pauses under way), dropping the least recently updated.""",
    )
    from_activity = Bool(
        _DEFAULTS.from_activity,
        config=True,
        help="""Count a pause from the user's latest activity during it (a cell run while the
        GPUs sit idle) instead of from the GPUs' idle start.""",
    )
    absent_grace = Float(
        900.0,
        config=True,
        help="""Seconds a server may be missing from the cycles (a release under way, a restart)
        before its pause counts as ended without the user coming back.""",
    )

    def __init__(self, store: Store, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store = store
        self.model = GapModel(self.settings(), absent_grace=self.absent_grace)
        self.loaded = False
        #: the limits of the last update, by server key (for pages and the health report)
        self.current: dict[tuple[str, str], IdleTimeout] = {}

    def settings(self) -> LearnedSettings:
        """The pure core's settings; raises `ValueError` naming a bad one."""
        return LearnedSettings(
            restart_cost=self.restart_cost,
            gpu_hour_value=self.gpu_hour_value,
            min_idle=self.min_idle,
            max_idle=self.max_idle,
            prior_weight=self.prior_weight,
            min_history=self.min_history,
            gaps_per_key=self.gaps_per_key,
            gaps_site=self.gaps_site,
            max_keys=self.max_keys,
            from_activity=self.from_activity,
        )

    def load(self, now: float) -> None:
        """Read the histories and the pauses under way from the store."""
        histories = pauses = 0
        for scope, key, data in self.store.idle_gaps():
            if scope in SCOPES:
                self.model.load(scope, key, data)
                histories += 1
            elif scope == OPEN:
                try:
                    user, server = json.loads(key)
                except (ValueError, TypeError):
                    continue
                if isinstance(user, str) and isinstance(server, str):
                    self.model.load_open((user, server), data, now)
                    pauses += 1
        self.model.take_changed()
        self.loaded = True
        log.info(
            "gpuhub: learned release policy: %d histories, %d pauses under way", histories, pauses
        )

    def save(self) -> None:
        """Write the histories and pauses under way that changed since the last save."""
        changed, opened = self.model.take_changed()
        if not changed and not opened:
            return
        items: dict[tuple[str, str], Any] = {}
        gone = []
        for scope, key in changed:
            items[(scope, key)] = self.model.to_json(scope, key)
        for view_key in opened:
            row_key = (OPEN, json.dumps(list(view_key)))
            data = self.model.open_to_json(view_key)
            if data is None:
                gone.append(row_key)
            else:
                items[row_key] = data
        self.store.save_idle_gaps(items, gone, keep=2 * self.max_keys, never_drop=[SITE])

    def update(
        self, views: Sequence[ServerView], now: float, flat: float
    ) -> Mapping[tuple[str, str], IdleTimeout]:
        """Learn from this cycle's views; the GPU idle limit of each server that holds GPUs."""
        if not self.loaded:
            try:
                self.load(now)
            except Exception:
                # Learning from nothing would overwrite the stored histories: the flat timeout
                # applies until the store can be read.
                log.exception("gpuhub: cannot read the learned release policy's state")
                self.current = {}
                return self.current
        self.model.observe(views, now)
        try:
            self.save()
        except Exception:
            # Learning goes on in memory; the next save writes what changed since.
            log.exception("gpuhub: could not save the learned release policy's state")
        self.current = dict(self.model.timeouts(views, flat))
        return self.current

    def thresholds(self) -> list[dict[str, Any]]:
        """The latest limit of every server with GPUs, JSON-ready (for the admin page)."""
        return [
            {
                "user": user,
                "server": server,
                "limit_s": round(limit.seconds, 1),
                "learned": limit.learned,
                "why": limit.why,
            }
            for (user, server), limit in sorted(self.current.items())
        ]
