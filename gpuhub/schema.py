"""The schema of gpuhub's store: its Alembic migrations, run when the store opens.

`prepare(engine)` is what the hub and the service do on start (through `Store`): a new database
gets every revision; an older one is backed up (a SQLite file) and upgraded; one already at the
newest revision is left alone; one newer than this gpuhub is refused (`SchemaTooNew`) rather than
used. A lock (a file next to the SQLite file, `<file>.lock`; a PostgreSQL advisory lock) keeps
two processes starting at once from upgrading together. The revisions live in
gpuhub/migrations/versions (docs/upgrades.md); the version is kept in the table
`gpuhub_alembic_version`, so a database shared with JupyterHub's own (which has
`alembic_version`) is fine.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, inspect, text

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
VERSION_TABLE = "gpuhub_alembic_version"
#: The first revision: gpuhub 0.1.0's schema.
BASELINE = "0001"
#: pg_advisory_lock key of upgrades ("gpuhub" in ASCII)
_PG_LOCK = 0x677075687562


class SchemaError(RuntimeError):
    """The store cannot be used with this gpuhub as it is."""


class SchemaTooNew(SchemaError):
    """The store was upgraded by a newer gpuhub."""


class SchemaBehind(SchemaError):
    """The store needs an upgrade that was not allowed to run."""


@dataclass(frozen=True)
class Upgrade:
    """What `prepare` did: from which revision (None: unversioned or empty) to which."""

    before: str | None
    after: str
    backup: Path | None = None
    #: the database held no gpuhub tables: they were created
    created: bool = False

    @property
    def changed(self) -> bool:
        return self.before != self.after


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    config.attributes["connection"] = connection
    return config


def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision this gpuhub knows (there must be exactly one)."""
    heads = scripts().get_heads()
    if len(heads) != 1:
        raise SchemaError(f"gpuhub's migrations have {len(heads)} heads: {sorted(heads)}")
    return heads[0]


def _include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Compare only gpuhub's own tables: a database shared with others has theirs too."""
    return not (type_ == "table" and reflected and compare_to is None)


def _options() -> dict[str, Any]:
    from .store import Base

    return {
        "target_metadata": Base.metadata,
        "version_table": VERSION_TABLE,
        "include_object": _include,
        "compare_type": True,
        "render_as_batch": True,  # ALTERs SQLite can run, in generated revisions
    }


def configure_context(context: Any, connection: Connection) -> None:
    """Configure Alembic's migration context (called by migrations/env.py)."""
    context.configure(connection=connection, **_options())


def current(connection: Connection) -> str | None:
    """The store's revision; None where it has none (empty, or made by gpuhub 0.1.0)."""
    heads = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE}
    ).get_current_heads()
    if len(heads) > 1:
        raise SchemaError(f"the store is at several revisions at once: {sorted(heads)}")
    return heads[0] if heads else None


def has_tables(connection: Connection) -> bool:
    """Whether the store holds gpuhub tables (a store made before versions were kept has)."""
    return inspect(connection).has_table("gpu_leases")


def differences(connection: Connection) -> list[Any]:
    """How the database differs from the models (Alembic's autogenerate diff); [] when equal."""
    from .store import Base

    context = MigrationContext.configure(connection, opts=_options())
    return list(compare_metadata(context, Base.metadata))


def describe(connection: Connection) -> str:
    """The store's revision in words, for `gpuhub db current`."""
    revision = current(connection)
    newest = head()
    if revision is None:
        if has_tables(connection):
            return f"unversioned (gpuhub 0.1.0's schema); newest is {newest}"
        return f"empty; newest is {newest}"
    if revision == newest:
        return f"{revision} (newest)"
    if not _known(revision):
        return f"{revision}: newer than this gpuhub (newest it knows: {newest})"
    return f"{revision}; newest is {newest}: run `gpuhub db upgrade`"


def _known(revision: str) -> bool:
    try:
        return scripts().get_revision(revision) is not None
    except CommandError:
        return False


def _sqlite_file(engine: Engine) -> Path | None:
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve()


@contextlib.contextmanager
def _upgrade_lock(engine: Engine, connection: Connection) -> Iterator[None]:
    """One process at a time checks and upgrades the store."""
    path = _sqlite_file(engine)
    if path is not None:
        # A file of its own: opening and closing the database file itself outside SQLite would
        # drop the POSIX locks SQLite holds on it in this process (and let another process
        # reset the WAL under this one's connections).
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a+b") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
    elif engine.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK})
        connection.commit()
        try:
            yield
        finally:
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK})
            connection.commit()
    else:
        yield


def backup_sqlite(path: Path) -> Path:
    """A consistent copy of the SQLite file `path` (SQLite's backup API, WAL included), next to
    it, named as `jupyterhub upgrade-db` names its backups: `<file>.<UTC time>`."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d-%H%M%S")
    target = path.with_name(f"{path.name}.{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{stamp}-{n}")
        n += 1
    source = sqlite3.connect(path)
    try:
        dest = sqlite3.connect(target)
        try:
            source.backup(dest)
        finally:
            dest.close()
    finally:
        source.close()
    return target


def prepare(engine: Engine, *, upgrade: bool = True, backup: bool = True) -> Upgrade:
    """Make the store ready for this gpuhub: upgrade it to the newest revision (backing up a
    SQLite file that holds data first), or raise `SchemaTooNew` / `SchemaBehind`."""
    newest = head()
    with engine.connect() as connection, _upgrade_lock(engine, connection):
        before = current(connection)
        connection.rollback()
        if before == newest:
            return Upgrade(before, newest)
        where = engine.url.render_as_string(hide_password=True)
        if before is not None and not _known(before):
            raise SchemaTooNew(
                f"gpuhub's store at {where} is at schema revision {before}, newer than this "
                f"gpuhub knows (its newest is {newest}): it was upgraded by a newer gpuhub. "
                "Run that gpuhub, or restore the backup taken before the upgrade."
            )
        holds_data = before is not None or has_tables(connection)
        connection.rollback()
        if not upgrade and holds_data:
            raise SchemaBehind(
                f"gpuhub's store at {where} is at revision {before or 'none (gpuhub 0.1.0)'}, "
                f"this gpuhub needs {newest}: run `gpuhub db upgrade --store-url=...`"
            )
        saved = None
        path = _sqlite_file(engine)
        if backup and holds_data and path is not None:
            saved = backup_sqlite(path)
        if holds_data:
            log.warning(
                "gpuhub store at %s: upgrading from revision %s to %s%s",
                where,
                before or "none (gpuhub 0.1.0)",
                newest,
                f"; backup in {saved}" if saved else "",
            )
        with connection.begin():
            command.upgrade(alembic_config(connection), newest)
        return Upgrade(before, newest, saved, created=not holds_data)


def upgrade_to(engine: Engine, revision: str) -> None:
    """Bring the store to `revision` without the checks of `prepare` (tests build old stores)."""
    with engine.connect() as connection, connection.begin():
        command.upgrade(alembic_config(connection), revision)
