"""`gpuhub db`: the schema of gpuhub's store (docs/upgrades.md).

    gpuhub db current  [--store-url URL]                the store's revision; is it the newest
    gpuhub db upgrade  [--store-url URL] [--no-backup]  back up (SQLite), upgrade to the newest
    gpuhub db revision -m "what changes"                a migration for a change of the models

The URL defaults to $GPUHUB_STORE_URL, else sqlite:///gpuhub.sqlite (the settings' default).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine

from . import schema


def default_store_url() -> str:
    from .settings import default_store_url as from_env

    return from_env()


def _engine(url: str):  # type: ignore[no-untyped-def]
    return create_engine(url, pool_pre_ping=True)


def current(url: str) -> int:
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            print(
                f"{engine.url.render_as_string(hide_password=True)}: {schema.describe(connection)}"
            )
    finally:
        engine.dispose()
    return 0


def upgrade(url: str, backup: bool) -> int:
    engine = _engine(url)
    try:
        result = schema.prepare(engine, upgrade=True, backup=backup)
    except schema.SchemaError as e:
        print(f"gpuhub db upgrade: {e}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    where = engine.url.render_as_string(hide_password=True)
    if not result.changed:
        print(f"{where}: already at the newest revision, {result.after}")
    elif result.created:
        print(f"{where}: created, at revision {result.after}")
    else:
        print(f"{where}: upgraded from {result.before or 'none'} to {result.after}")
    if result.backup:
        print(f"backup of the store before the upgrade: {result.backup}")
    return 0


def next_revision_id() -> str:
    numbers = [int(r.revision) for r in schema.scripts().walk_revisions() if r.revision.isdigit()]
    return f"{max(numbers, default=0) + 1:04d}"


def revision(message: str) -> int:
    """Write a new revision: the models compared with a scratch store at the newest revision."""
    with tempfile.TemporaryDirectory() as scratch:
        engine = _engine(f"sqlite:///{Path(scratch) / 'scratch.sqlite'}")
        try:
            schema.prepare(engine, backup=False)
            with engine.connect() as connection:
                if not schema.differences(connection):
                    print("gpuhub db revision: the models and the migrations agree: nothing to do")
                    return 1
                connection.rollback()
                with connection.begin():
                    script = command.revision(
                        schema.alembic_config(connection),
                        message=message,
                        autogenerate=True,
                        rev_id=next_revision_id(),
                    )
        finally:
            engine.dispose()
    path = getattr(script, "path", None)
    ruff = shutil.which("ruff")
    if ruff and path:  # the project's style, as `ruff format` / `ruff check --fix` leave it
        subprocess.run([ruff, "check", "--fix", "--quiet", path], check=False)
        subprocess.run([ruff, "format", "--quiet", path], check=False)
    print(f"wrote {path}: read it, then run `gpuhub db upgrade` on a copy of a real store")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuhub db", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("current", "show the store's schema revision"),
        ("upgrade", "upgrade the store to this gpuhub's schema (a SQLite file is backed up)"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument(
            "--store-url",
            default=None,
            help="SQLAlchemy URL of the store (default: $GPUHUB_STORE_URL, else "
            "sqlite:///gpuhub.sqlite)",
        )
        if name == "upgrade":
            p.add_argument(
                "--no-backup", action="store_true", help="do not back up a SQLite file first"
            )
    p = sub.add_parser("revision", help="write a migration for a change of the models")
    p.add_argument("-m", "--message", required=True, help="what the revision changes")
    args = parser.parse_args(argv)
    if args.command == "revision":
        return revision(args.message)
    url = args.store_url or default_store_url()
    if args.command == "current":
        return current(url)
    return upgrade(url, backup=not args.no_backup)


if __name__ == "__main__":
    sys.exit(main())
