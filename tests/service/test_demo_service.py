"""The demo hub runs the gpuhub service itself: short, printed timeouts; an idle simulated GPU is
released and the user's server comes back without it; metrics and health through the proxy."""

from __future__ import annotations

import pytest
import requests

from gpuhub.testing import Hub, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_hub(tmp_path_factory, run_marker):
    hub = Hub(
        tmp_path_factory.mktemp("demo"),
        run_marker,
        env_overrides={"GPUHUB_DEMO_SERVICE": "managed", "GPUHUB_DEMO_GPU_IDLE_TIMEOUT": "4"},
    ).start()
    yield hub
    hub.stop_all_servers()
    hub.stop()


def get(hub, path: str) -> requests.Response | None:
    try:
        return requests.get(f"{hub.url}{path}", timeout=10)
    except requests.RequestException:
        return None


def test_demo_service_releases_an_idle_gpu(demo_hub):
    hub = demo_hub
    assert "the gpuhub service releases a GPU idle for 4 s" in hub.log()
    health = wait_for(
        lambda: (
            (r := get(hub, "/services/gpuhub/health")) is not None and r.status_code == 200 and r
        ),
        timeout=60,
        what="the service's first cycle",
    )
    assert health.json()["cycles"] >= 1 and health.json()["dry_run"] is False

    assert hub.spawn("demo-dora", {"gpus": 1}).status_code in (201, 202)
    hub.wait_ready("demo-dora")
    model = wait_for(
        lambda: (
            (m := hub.user("demo-dora")["servers"].get(""))
            and m["ready"]
            and m["user_options"]["gpus"] == 0
            and m
        ),
        timeout=120,
        what="the idle GPU released by the service",
    )
    assert model["state"]["gpus"] == []
    metrics = get(hub, "/services/gpuhub/metrics")
    assert metrics is not None and metrics.status_code == 200
    assert 'gpuhub_releases_total{gpu_type="gpu",rule="gpu-idle"} 1.0' in metrics.text
    assert 'gpuhub_gpus_total{gpu_type="gpu"} 4.0' in metrics.text
    notice = requests.get(
        f"{hub.url}{model['url']}api/contents/GPUHUB-NOTICE.md",
        headers={"Authorization": f"token {hub.admin_token}"},
        timeout=30,
    )
    assert notice.status_code == 200 and "idle for" in notice.json()["content"]
