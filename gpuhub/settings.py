"""The settings the hub, the service and the pages share, in one place.

Their defaults come from the environment, so that one value reaches every process.
"""

from __future__ import annotations

import os

STORE_URL_ENV = "GPUHUB_STORE_URL"
DEFAULT_STORE_URL = "sqlite:///gpuhub.sqlite"


def default_store_url() -> str:
    """$GPUHUB_STORE_URL, else a SQLite file in the working directory."""
    return os.environ.get(STORE_URL_ENV, "").strip() or DEFAULT_STORE_URL
