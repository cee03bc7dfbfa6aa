"""The demo on PostgreSQL: GPUHUB_STORE_URL reaches the hub (its spawner's leases) and the gpuhub
service it runs (its cycle reads the same leases), and no SQLite store is made on the side."""

from __future__ import annotations

import pytest
import requests

from gpuhub.store import Store
from gpuhub.testing import Hub, wait_for

pytestmark = pytest.mark.slow


def test_demo_hub_and_service_share_a_postgresql_store(tmp_path, run_marker, postgres) -> None:  # type: ignore[no-untyped-def]
    url = postgres.url()
    hub = Hub(
        tmp_path,
        run_marker,
        env_overrides={
            "GPUHUB_STORE_URL": url,
            "GPUHUB_DEMO_SERVICE": "managed",
            "GPUHUB_DEMO_GPU_IDLE_TIMEOUT": "60",  # a cycle every 15 s
        },
    ).start()
    try:
        assert hub.spawn("pg-ada", {"gpus": 1}).status_code in (201, 202)
        model = hub.wait_ready("pg-ada")
        store = Store.at(url)
        leases = store.leases("pg-ada")
        assert len(leases) == 1 and sorted(model["state"]["gpus"]) == sorted(
            x.device for x in leases
        )

        def allocated() -> str | None:
            try:
                r = requests.get(f"{hub.url}/services/gpuhub/metrics", timeout=10)
            except requests.RequestException:
                return None
            line = 'gpuhub_gpus_allocated{gpu_type="gpu"} 1.0'
            return r.text if r.status_code == 200 and line in r.text else None

        wait_for(allocated, timeout=120, what="the service counting the leases in PostgreSQL")
        assert not list(tmp_path.rglob("gpuhub.sqlite*")), "no SQLite store on the side"

        hub.stop_server("pg-ada")
        assert store.leases("pg-ada") == []
    finally:
        hub.stop_all_servers()
        hub.stop()
