"""The store's schema migrations, on SQLite and PostgreSQL: a gpuhub 0.1.0 store keeps every row
through the upgrade, the models and the migrations agree, a newer store is refused."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine, insert, text

from gpuhub import cli, schema
from gpuhub.store import Store

T0 = datetime(2026, 3, 2, 9, 30, tzinfo=timezone.utc)


def make_0_1_0_store(url: str) -> None:
    """A store as gpuhub 0.1.0 left it: the baseline revision's tables (not today's models),
    no version table, rows in every table."""
    engine = create_engine(url)
    schema.upgrade_to(engine, schema.BASELINE)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {schema.VERSION_TABLE}"))
    tables = MetaData()
    tables.reflect(engine)
    t = tables.tables
    later = T0 + timedelta(minutes=5)
    with engine.begin() as conn:
        conn.execute(
            insert(t["gpu_leases"]),
            [
                dict(zip(("user", "server", "gpu_type", "device", "leased_at"), row, strict=True))
                for row in [
                    ("ada", "", "a100", "GPU-0", T0),
                    ("bo", "x", "a100", "GPU-1", T0),
                    ("cy", "big", "gpu", None, T0),
                    ("cy", "big", "gpu", None, T0),
                ]
            ],
        )
        conn.execute(
            insert(t["gpu_queue"]),
            [
                {
                    "user": "dee",
                    "server": "",
                    "gpu_type": "a100",
                    "gpus": 1,
                    "priority": 10,
                    "enqueued_at": T0,
                    "seen_at": later,
                    "user_options": json.dumps({"gpus": 1, "environment": "pytorch"}),
                }
            ],
        )
        action = {
            "created_at": T0,
            "updated_at": later,
            "user": "ada",
            "server": "",
            "server_started": "2026-03-02T08:00:00Z",
            "kind": "release",
            "rule": "gpu-idle",
            "reason": "GPU idle for 30 min",
            "actor": "gpuhub",
            "gpus": 1,
            "gpu_type": "a100",
            "user_options": json.dumps({"gpus": 1}),
            "error": None,
            "notified_at": None,
        }
        conn.execute(
            insert(t["gpuhub_actions"]),
            [
                {**action, "status": "done", "snapshots": json.dumps([{"kernel": "k1"}])},
                {
                    **action,
                    "user": "bo",
                    "server": "x",
                    "status": "snapshotting",
                    "snapshots": None,
                },
            ],
        )
        conn.execute(
            insert(t["catalog_environments"]),
            [
                {
                    "id": "jax",
                    "data": json.dumps({"id": "jax", "display_name": "JAX"}),
                    "updated_at": T0,
                    "updated_by": "root",
                }
            ],
        )
        conn.execute(
            insert(t["group_quotas"]),
            [
                {
                    "group": "staff",
                    "max_gpus": "4",
                    "max_servers": "unlimited",
                    "updated_at": T0,
                    "updated_by": "root",
                }
            ],
        )
    engine.dispose()


def test_a_0_1_0_store_keeps_every_row_through_the_upgrade(db_url: str) -> None:
    make_0_1_0_store(db_url)

    store = Store(db_url)  # what the hub and the service do when they start

    assert (store.schema.before, store.schema.after) == (None, schema.head())
    if db_url.startswith("sqlite"):
        assert store.schema.backup is not None
        with sqlite3.connect(store.schema.backup) as saved:
            assert saved.execute("SELECT count(*) FROM gpu_leases").fetchone() == (4,)
    else:
        assert store.schema.backup is None  # a server database is backed up by its operators
    with store.engine.connect() as conn:
        assert schema.current(conn) == schema.head()
        assert schema.differences(conn) == []

    leases = store.leases()
    assert [(x.user, x.server, x.gpu_type, x.device, x.leased_at) for x in leases] == [
        ("ada", "", "a100", "GPU-0", T0),
        ("bo", "x", "a100", "GPU-1", T0),
        ("cy", "big", "gpu", None, T0),
        ("cy", "big", "gpu", None, T0),
    ]
    (entry,) = store.queue()
    assert (entry.user, entry.gpu_type, entry.gpus, entry.priority) == ("dee", "a100", 1, 10)
    assert (entry.enqueued_at, entry.seen_at) == (T0, T0 + timedelta(minutes=5))
    assert entry.user_options == {"gpus": 1, "environment": "pytorch"}
    actions = store.actions()
    assert [(a.user, a.status, a.open) for a in actions] == [
        ("bo", "snapshotting", True),
        ("ada", "done", False),
    ]
    assert actions[1].snapshots == [{"kernel": "k1"}]
    assert actions[1].user_options == {"gpus": 1}
    assert actions[1].created_at == T0
    (env,) = store.catalog_entries()
    assert (env.id, env.data, env.updated_by) == (
        "jax",
        {"id": "jax", "display_name": "JAX"},
        "root",
    )
    (quota,) = store.group_quotas()
    assert (quota.group, quota.max_gpus, quota.max_servers) == ("staff", 4, "unlimited")

    # ... and usable: the old leases still hold their GPUs, new rows get new ids.
    assert store.lease_devices("eve", "", "a100", ["GPU-0", "GPU-1", "GPU-2"], 1) == ["GPU-2"]
    assert [x.device for x in store.free_leases("ada", "")] == ["GPU-0"]
    assert store.lease_devices("eve", "two", "a100", ["GPU-0", "GPU-1"], 1) == ["GPU-0"]
    assert store.gpus_held("cy") == 2
    # the GPUs held at the upgrade count their GPU-hours from their lease time on
    held = store.lease_intervals(T0, T0 + timedelta(days=1))
    assert sorted((i.user, i.device, i.started_at, i.ended_at is None) for i in held) == [
        ("ada", "GPU-0", T0, False),  # released above: its interval ended
        ("bo", "GPU-1", T0, True),
        ("cy", None, T0, True),
        ("cy", None, T0, True),
    ]
    assert store.gpu_seconds_held("bo", T0, T0 + timedelta(hours=2)) == 7200
    interrupted = actions[0]
    assert store.update_action(interrupted.id, status="done").status == "done"
    new = store.record_action("eve", "", "warn", "max-lease", "soon", actor="gpuhub", status="done")
    assert new.id > max(a.id for a in actions)
    kept = store.enqueue("dee", "", "a100", 1, priority=10, now=T0 + timedelta(hours=1))
    assert kept.enqueued_at == T0, "an upgraded queue entry keeps its place"
    store.put_group_quota("staff", 8, None, by="admin")
    assert store.group_quotas()[0].max_gpus == 8
    assert store.delete_catalog_entry("jax")

    again = Store(db_url)  # the next start: nothing to do, no new backup
    assert not again.schema.changed and again.schema.backup is None


def test_models_and_migrations_agree(db_url: str) -> None:
    """Fails when a model changes without a revision (docs/upgrades.md: `gpuhub db revision`)."""
    store = Store(db_url)
    with store.engine.connect() as conn:
        diff = schema.differences(conn)
    assert diff == [], f"the models differ from the migrations: {diff}"


def test_the_migrations_have_one_head() -> None:
    """Two revisions on the same parent (two branches each adding one) must be chained."""
    assert len(schema.scripts().get_heads()) == 1
    assert schema.scripts().get_base() == schema.BASELINE


def test_a_store_newer_than_the_code_is_refused(db_url: str) -> None:
    Store(db_url)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {schema.VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(schema.SchemaTooNew, match=r"revision 9999, newer than this gpuhub"):
        Store(db_url)


def test_without_upgrade_an_old_store_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    make_0_1_0_store(url)
    with pytest.raises(schema.SchemaBehind, match="gpuhub db upgrade"):
        Store(url, upgrade=False)
    assert Store(url).schema.after == schema.head()


def test_db_command(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    make_0_1_0_store(db_url)
    assert cli.main(["db", "current", f"--store-url={db_url}"]) == 0
    assert "unversioned (gpuhub 0.1.0's schema)" in capsys.readouterr().out
    assert cli.main(["db", "upgrade", f"--store-url={db_url}"]) == 0
    out = capsys.readouterr().out
    assert f"upgraded from none to {schema.head()}" in out
    assert ("backup of the store" in out) == db_url.startswith("sqlite")
    assert cli.main(["db", "upgrade", f"--store-url={db_url}"]) == 0
    assert "already at the newest revision" in capsys.readouterr().out
    assert cli.main(["db", "current", f"--store-url={db_url}"]) == 0
    assert f"{schema.head()} (newest)" in capsys.readouterr().out


def _open(url: str, queue) -> None:  # type: ignore[no-untyped-def]
    try:
        store = Store(url)
        queue.put(("ok", store.schema.before))
    except Exception as e:  # reported to the test
        queue.put(("error", repr(e)))


def test_processes_starting_together_upgrade_once(db_url: str) -> None:
    """The hub and the service start at the same time on an old store: one upgrades, the other
    waits for it and finds the store ready."""
    make_0_1_0_store(db_url)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open, args=(db_url, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=str)
    for p in procs:
        p.join(30)
    assert [r[0] for r in results] == ["ok"] * 3, results
    assert sorted(str(r[1]) for r in results) == sorted(["None", schema.head(), schema.head()])


def test_db_upgrade_of_a_new_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'new.sqlite'}"
    assert cli.main(["db", "current", f"--store-url={url}"]) == 0
    assert "empty; newest is" in capsys.readouterr().out
    assert cli.main(["db", "upgrade", f"--store-url={url}"]) == 0
    out = capsys.readouterr().out
    assert f"created, at revision {schema.head()}" in out and "backup" not in out


def test_db_revision_numbers_the_next_revision() -> None:
    from gpuhub.db_cli import next_revision_id

    assert next_revision_id() == f"{int(schema.head()) + 1:04d}"
