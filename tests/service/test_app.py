"""The service application: settings, --generate-config, bad settings, the web endpoints and the
pages' hook, and a cycle against a hub that does not answer."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import types

import pytest
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from traitlets.config import Config

from gpuhub.service import app as service_app
from gpuhub.service.app import GpuhubService
from gpuhub.settings import SHARED


def make(**settings) -> GpuhubService:
    c = Config()
    values = {"api_token": "t", "hub_api_url": "http://127.0.0.1:9/hub/api", **settings}
    for name, value in values.items():
        setattr(c.GpuhubConfig if name in SHARED else c.GpuhubService, name, value)
    return GpuhubService(config=c)


def test_generate_config_lists_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "gpuhub.service", "--generate-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for name, trait in GpuhubService.class_traits(config=True).items():
        if name in vars(GpuhubService):
            assert f"c.GpuhubService.{name} =" in out, name
            assert (trait.help or "").strip(), f"{name} has no help"


def test_bad_settings_stop_with_the_field_named(tmp_path):
    service = make(lease_end_action="explode", store_url=f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(SystemExit, match="lease_end_action"):
        service.setup()
    service = make(api_token="", store_url=f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(SystemExit, match="no API token"):
        service.setup()
    service = make(gpu_idle_timeout=-1, store_url=f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(SystemExit, match="gpu_idle_timeout"):
        service.setup()


def test_defaults_from_the_hub_environment(monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://hub:8081/hub/api")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "secret")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/services/gpuhub")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_URL", "http://0.0.0.0:10101")
    monkeypatch.delenv("JUPYTERHUB_PUBLIC_URL", raising=False)
    service = GpuhubService()
    assert service.hub_api_url == "http://hub:8081/hub/api" and service.api_token == "secret"
    assert service.service_prefix == "/services/gpuhub/"
    assert service.hub_public_url == "http://hub:8081"
    monkeypatch.setenv("JUPYTERHUB_PUBLIC_URL", "https://hub.example.org/")
    assert GpuhubService().hub_public_url == "https://hub.example.org"


class Hello(web.RequestHandler):
    def initialize(self, word: str = "hello") -> None:
        self.word = word

    def get(self) -> None:
        self.finish(self.word)


def test_web_endpoints_and_the_pages_hook(tmp_path, monkeypatch):
    pages = types.ModuleType(service_app.WEB_MODULE)
    pages.routes = lambda service: [
        ("hello", Hello, {"word": service.service_prefix}),
        ("/elsewhere", Hello),
    ]
    pages.settings = lambda service: {"pages_setting": 42}
    monkeypatch.setitem(sys.modules, service_app.WEB_MODULE, pages)
    service = make(store_url=f"sqlite:///{tmp_path / 's.db'}", service_prefix="/services/g/")
    service.setup()

    async def go():
        app = service.make_web_app()
        assert app.settings["pages_setting"] == 42
        [sock] = bind_sockets(0, "127.0.0.1")[:1]
        server = HTTPServer(app)
        server.add_sockets([sock])
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        client = AsyncHTTPClient()
        try:
            hello = await client.fetch(f"{base}/services/g/hello")
            elsewhere = await client.fetch(f"{base}/elsewhere")
            metrics = await client.fetch(f"{base}/services/g/metrics")
            health = await client.fetch(f"{base}/services/g/health", raise_error=False)
            # a cycle against a hub that does not answer: an error, nothing decided
            assert await service.run_cycle() == []
            health_after = await client.fetch(f"{base}/services/g/health", raise_error=False)
        finally:
            server.stop()
        return hello, elsewhere, metrics, health, health_after

    hello, elsewhere, metrics, health, health_after = asyncio.run(go())
    assert hello.body == b"/services/g/" and elsewhere.body == b"hello"
    assert b"gpuhub_cycle_duration_seconds" in metrics.body
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert health.code == 503 and json.loads(health.body)["cycles"] == 0
    report = json.loads(health_after.body)
    # the health probe says that the cycle failed, and nothing about users or servers
    assert health_after.code == 503 and "failed" in report["last_error"]
    assert set(report) == {
        "ok",
        "cycles",
        "last_cycle",
        "last_error",
        "dry_run",
        "actions_under_way",
    }
    assert service.metrics.registry.get_sample_value("gpuhub_cycle_errors_total") == 1


def test_the_pool_comes_from_the_counts_the_cluster_watch_publishes(tmp_path):
    """One owner for capacity: the hub's watch writes the cluster's counts into the store; the
    service's pool, its free GPUs (another workload's pod holds one) and its metrics read them.
    `gpu_totals` overrides a type's size, the counted free number still bounds its free GPUs;
    stale counts are ignored."""
    from datetime import datetime, timedelta, timezone

    from gpuhub.service.demand import Pool, demand_from
    from gpuhub.store import MeasuredCapacity, Store

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = Store.at(url)
    store.publish_capacity(
        [
            MeasuredCapacity("a100", total=4, free=0, unavailable=0),
            MeasuredCapacity("t4", total=0, free=0, unavailable=4, note="the 1 node is cordoned"),
        ],
        "kubernetes",
        valid_for=35,
    )
    store.lease_units("ada", "", "a100", 3)  # gpuhub holds 3 A100s, another workload the 4th
    service = make(store_url=url, gpu_totals={"mig": 2})
    service.setup()
    totals = service.pool_totals()
    assert dict(totals) == {"a100": 4, "t4": 0, "mig": 2}
    pool = Pool(total=totals, allocated={"a100": 3})
    assert pool.free() == {"a100": 0, "t4": 0, "mig": 2}, "4 - 3 leased, but the cluster says 0"
    assert demand_from([], pool).free_gpus["a100"] == 0
    metrics = service.metrics.exposition().decode()
    assert 'gpuhub_gpus_free_measured{gpu_type="a100"} 0.0' in metrics
    assert 'gpuhub_gpus_unavailable{gpu_type="t4"} 4.0' in metrics
    assert 'gpuhub_capacity_age_seconds{gpu_type="a100"}' in metrics

    # A configured size overrides the counted one; the counted free GPUs still bound it.
    service = make(store_url=url, gpu_totals={"a100": 8})
    service.setup()
    totals = service.pool_totals()
    assert totals["a100"] == 8
    assert Pool(total=totals, allocated={"a100": 3}).free()["a100"] == 0

    # The hub stopped publishing: its counts are not used any more.
    later = datetime.now(timezone.utc) - timedelta(seconds=60)
    store.publish_capacity([MeasuredCapacity("a100", 4, 1)], "kubernetes", 35, now=later)
    service = make(store_url=url)
    service.setup()
    assert "a100" not in service.pool_totals()
