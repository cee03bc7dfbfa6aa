"""A real PostgreSQL server for tests: Debian's `postgresql` package (scripts/install-system.sh),
a throw-away data directory, a free loopback port, trust authentication on loopback only.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user (the
package creates it). `PostgresServer.stop` ends it; the test run's process marker
(`gpuhub.testing.RUN_MARKER`, kept in its environment) ends it too if a test run is killed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from .testing import free_port


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server programs on this machine."""


def server_bin() -> Path:
    """The folder with `initdb`, `pg_ctl` and `postgres` (Debian keeps them out of PATH)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if versions:
        return Path(versions[0]).parent
    raise PostgresUnavailable(
        "PostgreSQL's server programs are missing: install Debian's `postgresql` "
        "(bash scripts/install-system.sh)"
    )


class PostgresServer:
    """`PostgresServer().start()`; `url()` for a new empty database; `stop()`."""

    def __init__(self) -> None:
        self.bin = server_bin()
        self.base = Path(tempfile.mkdtemp(prefix="gpuhub-postgres-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = 0
        self._as: list[str] = []
        self._owner: pwd.struct_passwd | None = None
        if os.getuid() == 0:
            self._owner = pwd.getpwnam("postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
            os.chown(self.base, self._owner.pw_uid, self._owner.pw_gid)
        os.chmod(self.base, 0o700)

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = [*self._as, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout}\n"
                f"{result.stderr}\n{log[-3000:]}"
            )

    def start(self) -> PostgresServer:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        for _ in range(5):
            self.port = free_port()
            options = (
                f"-h 127.0.0.1 -p {self.port} -k {self.base} -F "
                "-c max_connections=200 -c shared_buffers=32MB"
            )
            try:
                self._run(
                    str(self.bin / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                )
                return self
            except RuntimeError:
                if "could not bind" not in (self.log.read_text() if self.log.exists() else ""):
                    raise
                time.sleep(0.2)
        raise RuntimeError("PostgreSQL found no free port")

    def stop(self) -> None:
        if self.port and (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run(str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def admin_url(self, database: str = "postgres") -> str:
        """A libpq URL for psycopg (no SQLAlchemy driver prefix)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def url(self, database: str | None = None) -> str:
        """The SQLAlchemy URL of a new, empty database (named `database`, or a fresh name)."""
        import psycopg

        name = database or f"gpuhub_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def terminate_connections(self, database: str) -> int:
        """End every session on `database` from the server side (what a server restart or a
        fail-over does to its clients); returns how many were ended."""
        import psycopg

        others = "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            rows = conn.execute(f"SELECT pg_terminate_backend(pid) {others}", (database,))
            ended = sum(1 for (done,) in rows.fetchall() if done)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # gone, not only signalled
                (left,) = conn.execute(f"SELECT count(*) {others}", (database,)).fetchone()
                if not left:
                    break
                time.sleep(0.05)
        return ended
