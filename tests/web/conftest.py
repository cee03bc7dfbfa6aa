"""A real gpuhub JupyterHub whose gpuhub service (with its pages) the hub itself runs, as the demo
does, shared by the pages' tests."""

from __future__ import annotations

import pytest
import requests
import yaml
from pages_helpers import BUDGET_GROUP, PREFIX, PagesHub

from gpuhub import paths
from gpuhub.testing import Hub, wait_for


@pytest.fixture(scope="package")
def pages(tmp_path_factory, run_marker):
    # the demo's quotas, and a group with a small weekly GPU-hour budget
    quotas = yaml.safe_load((paths.config_dir() / "quotas.yaml").read_text())
    quotas["groups"][BUDGET_GROUP] = {"weekly_gpu_hours": 0.5}
    quotas_file = tmp_path_factory.mktemp("pages-quotas") / "quotas.yaml"
    quotas_file.write_text(yaml.safe_dump(quotas))
    hub = Hub(
        tmp_path_factory.mktemp("pages-hub"),
        run_marker,
        env_overrides={
            "GPUHUB_QUOTAS": str(quotas_file),
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
