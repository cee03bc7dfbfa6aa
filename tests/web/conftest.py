"""A real gpuhub JupyterHub whose gpuhub service (with its pages) the hub itself runs, as the demo
does, shared by the pages' tests."""

from __future__ import annotations

import pytest
import requests
from pages_helpers import PREFIX, PagesHub

from gpuhub.testing import Hub, wait_for


@pytest.fixture(scope="package")
def pages(tmp_path_factory, run_marker):
    hub = Hub(
        tmp_path_factory.mktemp("pages-hub"),
        run_marker,
        env_overrides={
            "GPUHUB_DEMO_SERVICE": "managed",
            # the tests release GPUs themselves; the service's own rules must not interfere
            "GPUHUB_DEMO_GPU_IDLE_TIMEOUT": "100000",
            "GPUHUB_DEMO_ADMIN_GROUPS": "gpuhub-admins",
            "GPUHUB_DEMO_ALLOWED_REGISTRIES": "quay.io/gpuhub,nvcr.io/nvidia",
        },
    ).start()

    def service_up() -> bool:
        try:
            return requests.get(f"{hub.url}{PREFIX}health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_for(service_up, timeout=60, interval=0.5, what="the gpuhub service")
    yield PagesHub(hub)
    hub.stop_all_servers()
    hub.stop()
