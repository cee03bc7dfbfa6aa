"""Retrying a store operation that failed for a reason that goes away: a connection the database
server closed (a restart, a fail-over, an idle timeout), a serialization failure or a deadlock.

Each public method of `gpuhub.store.Store` is one transaction (or a loop of them), so running it
again after such a failure is safe: the failed transaction was rolled back whole, nothing of it
was written.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: SQLSTATEs that a new attempt can overcome: serialization failure, deadlock, the server ending
#: the session (admin shutdown, crash shutdown, cannot connect now); class 08 is connection errors.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03"})

ATTEMPTS = 4
BACKOFF = 0.05


def is_transient(error: BaseException) -> bool:
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    orig = error.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return bool(code) and (code in TRANSIENT_SQLSTATES or str(code).startswith("08"))


def retried(method: Callable[..., T]) -> Callable[..., T]:
    """`method`, run again (up to `ATTEMPTS` times, with backoff) after a transient failure."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> T:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return method(*args, **kwargs)
            except DBAPIError as e:
                if attempt == ATTEMPTS or not is_transient(e):
                    raise
                delay = BACKOFF * 2 ** (attempt - 1) * (1 + random.random())
                log.warning(
                    "gpuhub store: %s failed (%s), retrying in %.2f s",
                    method.__name__,
                    str(e.orig).strip().splitlines()[0] if e.orig else type(e).__name__,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("not reached")

    run.__wrapped_transient__ = True  # type: ignore[attr-defined]
    return run


C = TypeVar("C", bound=type)


def retry_transient_errors(cls: C) -> C:
    """Class decorator: every public method of `cls` defined in its body is `retried`."""
    for name, value in list(vars(cls).items()):
        if name.startswith("_") or not callable(value) or isinstance(value, (classmethod, type)):
            continue
        if name in getattr(cls, "_not_retried", ()):
            continue
        setattr(cls, name, retried(value))
    return cls
