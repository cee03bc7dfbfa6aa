"""Fixtures shared by every test layer: a marker that ends every process a test run starts."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from gpuhub.testing import RUN_MARKER, kill_marked


@pytest.fixture(scope="session", autouse=True)
def run_marker():
    """Every process started by this test run carries GPUHUB_TEST_RUN in its environment (hubs,
    proxies, single-user servers, kernels, code-server); all of them are ended at the end."""
    marker = os.environ.setdefault(RUN_MARKER, uuid.uuid4().hex)
    yield marker
    kill_marked(marker)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    # this machine's network reaches only package registries: no background connections
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Playwright (never a browser Playwright downloads)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


@pytest.fixture
def screenshot_path(tmp_path):
    """`screenshot_path("name.png")`: where a test saves a screenshot. docs/img when
    GPUHUB_UPDATE_SCREENSHOTS=1 (to refresh the documentation), else the test's own folder."""

    def path(name: str) -> str:
        if os.environ.get("GPUHUB_UPDATE_SCREENSHOTS") == "1":
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            return str(DOCS_IMG / name)
        return str(tmp_path / name)

    return path


# -- the store's databases: SQLite and a real PostgreSQL server ---------------------------------


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the test run (Debian's `postgresql`, a temporary data directory,
    a free loopback port), stopped at the end."""
    from gpuhub.testing_postgres import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """The URL of a new, empty store database: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gpuhub.sqlite'}"
    return request.getfixturevalue("postgres").url()
