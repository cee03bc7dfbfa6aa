"""A PostgreSQL store survives connections the server ends (a restart, a fail-over): between two
store calls, and in the middle of one, where the operation is run again and nothing of the failed
attempt stays written."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import event, func, select

from gpuhub.store import LeaseRow, NoGpuFree, Store

DEVICES = [f"GPU-{i}" for i in range(3)]


@pytest.fixture
def pg_store(postgres):  # type: ignore[no-untyped-def]
    url = postgres.url()
    store = Store(url)
    yield store, postgres, url.rsplit("/", 1)[1]
    store.engine.dispose()


def test_connections_ended_between_two_calls(pg_store) -> None:  # type: ignore[no-untyped-def]
    store, server, database = pg_store
    assert store.lease_devices("ada", "", "gpu", DEVICES, 1) == ["GPU-0"]
    store.record_action("ada", "", "warn", "rule", "why", actor="gpuhub", status="done")
    assert server.terminate_connections(database) >= 1, "the store's pooled connection was ended"

    assert [x.device for x in store.leases()] == ["GPU-0"]
    assert store.lease_devices("bo", "", "gpu", DEVICES, 1) == ["GPU-1"]
    assert len(store.actions()) == 1


def test_connection_ended_in_the_middle_of_a_lease(pg_store, caplog) -> None:  # type: ignore[no-untyped-def]
    """The server ends the session after the lease has read the free GPUs and before it writes:
    the attempt fails, is rolled back whole, and the lease is taken on a new connection."""
    store, server, database = pg_store
    store.lease_devices("ada", "", "gpu", DEVICES, 1)
    ended: list[int] = []

    def end_session_before_insert(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("INSERT INTO GPU_LEASES") and not ended:
            ended.append(server.terminate_connections(database))

    event.listen(store.engine, "before_cursor_execute", end_session_before_insert)
    with caplog.at_level(logging.WARNING, logger="gpuhub.db_retry"):
        assert store.lease_devices("bo", "x", "gpu", DEVICES, 2) == ["GPU-1", "GPU-2"]
    event.remove(store.engine, "before_cursor_execute", end_session_before_insert)

    assert ended == [1], "one session (the lease's own) was ended mid-transaction"
    assert "lease_devices failed" in caplog.text and "retrying" in caplog.text
    with store.session() as s:
        rows = s.execute(select(LeaseRow.user, func.count()).group_by(LeaseRow.user)).all()
    assert sorted(rows) == [("ada", 1), ("bo", 2)], "nothing half-written, nothing twice"
    with pytest.raises(NoGpuFree):
        store.lease_devices("cy", "", "gpu", DEVICES, 1)


def test_a_server_that_stays_away_fails_the_operation(pg_store) -> None:  # type: ignore[no-untyped-def]
    """Retries are bounded: with the server gone the operation fails (the service's cycle then
    decides nothing and tries again at the next one), rather than hanging."""
    store, server, database = pg_store
    from sqlalchemy.exc import OperationalError

    def refuse(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        server.terminate_connections(database)

    event.listen(store.engine, "before_cursor_execute", refuse)
    try:
        with pytest.raises(OperationalError):
            store.leases()
    finally:
        event.remove(store.engine, "before_cursor_execute", refuse)
    assert store.leases() == []
