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


# -- the `envtest` marker: the Kubernetes tests against a real control plane --------------------


def _envtest() -> tuple[bool, str]:
    from k8s_envtest import assets

    folder, why = assets()
    return folder is not None, why


_ENVTEST = _envtest()


def pytest_report_header(config: pytest.Config) -> str:
    found, why = _ENVTEST
    if found:
        return f"gpuhub Kubernetes tests: `envtest` tests run against {why}"
    return f"gpuhub Kubernetes tests: `envtest` tests deselected: {why}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the `envtest` tests where the control plane's binaries are missing."""
    if _ENVTEST[0]:
        return
    marked = [i for i in items if i.get_closest_marker("envtest")]
    if not marked:
        return
    config.hook.pytest_deselected(items=marked)
    items[:] = [i for i in items if i not in marked]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"gpuhub: deselected {len(marked)} `envtest` test(s): {_ENVTEST[1]}", yellow=True
        )


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
