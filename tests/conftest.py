"""Fixtures shared by every test layer: a marker that ends every process a test run starts."""

from __future__ import annotations

import os
import uuid

import pytest

from gpuhub.testing import RUN_MARKER, kill_marked


@pytest.fixture(scope="session", autouse=True)
def run_marker():
    """Every process started by this test run carries GPUHUB_TEST_RUN in its environment (hubs,
    proxies, single-user servers, kernels, code-server); all of them are ended at the end."""
    marker = os.environ.setdefault(RUN_MARKER, uuid.uuid4().hex)
    yield marker
    kill_marked(marker)
