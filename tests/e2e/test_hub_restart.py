"""A hub restart keeps the GPU leases of servers that still run and frees the others."""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import pytest
import requests

from gpuhub.store import Store, utcnow
from gpuhub.testing import Hub, process_gone, wait_for

pytestmark = pytest.mark.slow


def test_leases_survive_a_hub_restart_only_with_their_server(tmp_path, run_marker):
    hub = Hub(tmp_path, run_marker).start()
    store = Store.at(f"sqlite:///{tmp_path / 'gpuhub.sqlite'}")
    try:
        for name in ("keeper", "goner"):
            assert hub.spawn(name, {"gpus": 1}).status_code in (201, 202)
        keeper = hub.wait_ready("keeper")["state"]
        goner = hub.wait_ready("goner")["state"]
        # A lease of a server the hub has never heard of (a crash between lease and start).
        store.lease_devices("ghost", "", "gpu", ["GPU-00000000-0000-4000-8000-000000000003"], 1)

        hub.stop()
        os.kill(goner["pid"], signal.SIGKILL)
        wait_for(lambda: process_gone(goner["pid"]), what="the server to die")
        hub.start()

        assert hub.user("goner")["servers"] == {}
        model = hub.wait_ready("keeper")
        assert model["state"]["gpus"] == keeper["gpus"]
        holders = {(lease.user, lease.device) for lease in store.leases()}
        assert holders == {("keeper", keeper["gpus"][0])}
        # GPU-hours: the keeper's interval runs on, once; those freed at the start ended
        now = utcnow()
        intervals = store.lease_intervals(now - timedelta(days=8), now)
        assert sorted((i.user, i.ended_at is None) for i in intervals) == [
            ("ghost", False),
            ("goner", False),
            ("keeper", True),
        ]
        # The surviving server still answers through the new hub's proxy.
        r = requests.get(
            f"{hub.url}{model['url']}api/status",
            headers={"Authorization": f"token {hub.admin_token}"},
            timeout=30,
        )
        assert r.status_code == 200
        # And the freed GPUs can be given out again.
        assert hub.spawn("newcomer", {"gpus": 1}).status_code in (201, 202)
        assert hub.wait_ready("newcomer")["state"]["gpus"][0] != keeper["gpus"][0]
    finally:
        hub.stop_all_servers()
        hub.stop()


def test_a_bad_catalogue_stops_the_hub_at_start(tmp_path, run_marker):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("environments:\n  - id: pytorch\n    interfaces: [jupyterlab, emacs]\n")
    hub = Hub(tmp_path, run_marker, env_overrides={"GPUHUB_CATALOG": str(catalog)})
    with pytest.raises(RuntimeError) as failure:
        hub.start()
    message = str(failure.value)
    assert f"{catalog}: environments[0].interfaces[1]: unknown interface 'emacs'" in message
