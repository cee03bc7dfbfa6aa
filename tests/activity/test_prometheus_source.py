# ruff: noqa: E501  (exposition lines are as long as dcgm-exporter writes them)
"""PrometheusActivitySource against a real HTTP server that answers Prometheus' query API from
what a dcgm-exporter exposes (tests/prometheus_fake.py): busy and idle pods, stale series, MIG
slices, a time-sliced GPU, faults of every kind, and pods matched exactly."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_fake import FakePrometheus, parse_exposition
from traitlets import TraitError

from gpuhub.activity import GpuSample, ServerTarget
from gpuhub.activity.prometheus import PrometheusActivitySource

MIB = 1024 * 1024
A100 = 'gpu="0",UUID="GPU-5d9cc71f-b438-dc00-707d-c6c12bcfede1",pci_bus_id="00000000:52:00.0",device="nvidia0",modelName="NVIDIA A100-SXM4-80GB",Hostname="a100-0",DCGM_FI_DRIVER_VERSION="550.54.15"'
A100_UUID = "GPU-5d9cc71f-b438-dc00-707d-c6c12bcfede1"
A100_1 = 'gpu="1",UUID="GPU-81d888ca-dd11-328c-45fa-d6807a1afa6a",pci_bus_id="00000000:61:00.0",device="nvidia1",modelName="NVIDIA A100-SXM4-80GB",Hostname="a100-0",DCGM_FI_DRIVER_VERSION="550.54.15"'
A100_1_UUID = "GPU-81d888ca-dd11-328c-45fa-d6807a1afa6a"


def target(user: str, server: str = "", namespace: str | None = "jhub", **kw) -> ServerTarget:  # type: ignore[no-untyped-def]
    pod = kw.pop("pod", f"jupyter-{user}" + (f"--{server}" if server else ""))
    return ServerTarget(user, server, gpus=kw.pop("gpus", 1), namespace=namespace, pod=pod, **kw)


@pytest.fixture(scope="module")
def prom() -> Iterator[FakePrometheus]:
    server = FakePrometheus().start()
    yield server
    server.stop()


@pytest.fixture
def source(prom: FakePrometheus) -> Iterator[PrometheusActivitySource]:
    prom.clear()
    prom.answer_normally()
    s = PrometheusActivitySource(url=prom.url, staleness=90, timeout=2)
    yield s
    s.close()


# -- readings ----------------------------------------------------------------------------------


async def test_busy_and_idle_pods_in_one_query(prom, source) -> None:  # type: ignore[no-untyped-def]
    prom.scrape(f"""
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{{{A100},container="notebook",namespace="jhub",pod="jupyter-ada"}} 87
DCGM_FI_DEV_GPU_UTIL{{{A100_1},container="notebook",namespace="jhub",pod="jupyter-bob"}} 0
# HELP DCGM_FI_DEV_MEM_COPY_UTIL Memory utilization (in %).
# TYPE DCGM_FI_DEV_MEM_COPY_UTIL gauge
DCGM_FI_DEV_MEM_COPY_UTIL{{{A100},container="notebook",namespace="jhub",pod="jupyter-ada"}} 31
DCGM_FI_DEV_MEM_COPY_UTIL{{{A100_1},container="notebook",namespace="jhub",pod="jupyter-bob"}} 0
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{{{A100},container="notebook",namespace="jhub",pod="jupyter-ada"}} 30517
DCGM_FI_DEV_FB_USED{{{A100_1},container="notebook",namespace="jhub",pod="jupyter-bob"}} 425
# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).
# TYPE DCGM_FI_DEV_GPU_TEMP gauge
DCGM_FI_DEV_GPU_TEMP{{{A100},container="notebook",namespace="jhub",pod="jupyter-ada"}} 61
""")
    before = time.time()
    got = await source.sample([target("ada"), target("bob"), target("cy")])
    assert set(got) == {("ada", ""), ("bob", "")}  # cy has no series: unknown, not idle
    [ada] = got[("ada", "")]
    assert (ada.device, ada.utilization, ada.memory_utilization) == (A100_UUID, 87.0, 31.0)
    assert ada.memory_used == 30517 * MIB
    assert before - 5 <= ada.at <= time.time()
    [bob] = got[("bob", "")]
    assert (bob.device, bob.utilization, bob.memory_utilization, bob.memory_used) == (
        A100_1_UUID,
        0.0,
        0.0,
        425 * MIB,
    )
    # One instant query for all targets, restricted to their namespace.
    assert len(prom.queries) == 1
    asked = prom.queries[0]
    assert asked["method"] == "POST"
    assert 'namespace=~"jhub"' in asked["query"]
    assert "jupyter-ada" not in asked["query"]


async def test_a_server_with_two_gpus_gets_both(prom, source) -> None:  # type: ignore[no-untyped-def]
    prom.scrape(f"""
DCGM_FI_DEV_GPU_UTIL{{{A100},container="notebook",namespace="jhub",pod="jupyter-ada--train"}} 3
DCGM_FI_DEV_GPU_UTIL{{{A100_1},container="notebook",namespace="jhub",pod="jupyter-ada--train"}} 99
""")
    got = await source.sample([target("ada", "train", gpus=2)])
    assert [(s.device, s.utilization) for s in got[("ada", "train")]] == [
        (A100_UUID, 3.0),
        (A100_1_UUID, 99.0),
    ]


async def test_a_stale_series_is_no_reading(prom, source) -> None:  # type: ignore[no-untyped-def]
    now = time.time()
    old_ms = int((now - 120) * 1000)  # the exporter (or its node) stopped 2 minutes ago
    prom.scrape(f"""
DCGM_FI_DEV_GPU_UTIL{{{A100},container="notebook",namespace="jhub",pod="jupyter-ada"}} 0 {old_ms}
DCGM_FI_DEV_GPU_UTIL{{{A100_1},container="notebook",namespace="jhub",pod="jupyter-bob"}} 0 {old_ms}
""")
    # bob's exporter is still scraped, ada's is not
    prom.scrape(
        f'DCGM_FI_DEV_GPU_UTIL{{{A100_1},container="notebook",namespace="jhub",pod="jupyter-bob"}} 12',
        now - 20,
    )
    got = await source.sample([target("ada"), target("bob")])
    assert ("ada", "") not in got
    [bob] = got[("bob", "")]
    assert bob.utilization == 12.0
    assert now - 21 <= bob.at <= now - 19  # the time of the scrape, not of the query


async def test_the_newest_sample_in_the_window_counts(prom, source) -> None:  # type: ignore[no-untyped-def]
    now = time.time()
    for age, value in ((75, 100), (45, 100), (15, 0)):
        prom.scrape(
            f'DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} {value}', now - age
        )
    [ada] = (await source.sample([target("ada")]))[("ada", "")]
    assert ada.utilization == 0.0
    assert abs(ada.at - (now - 15)) < 1


async def test_mig_slices_are_read_from_the_profiling_metrics(prom, source) -> None:  # type: ignore[no-untyped-def]
    mig = 'gpu="0",UUID="GPU-8f2c1d90-3e5a-4b17-9c2e-5da9abb51763",pci_bus_id="00000000:1B:00.0",device="nvidia0",modelName="NVIDIA A100-SXM4-80GB"'
    prom.scrape(f"""
# HELP DCGM_FI_PROF_GR_ENGINE_ACTIVE Ratio of time the graphics engine is active.
# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{mig},GPU_I_PROFILE="3g.40gb",GPU_I_ID="1",Hostname="mig-0",container="notebook",namespace="jhub",pod="jupyter-ada"}} 0.812
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{mig},GPU_I_PROFILE="1g.10gb",GPU_I_ID="9",Hostname="mig-0",container="notebook",namespace="jhub",pod="jupyter-bob"}} 0.000000
# HELP DCGM_FI_PROF_DRAM_ACTIVE Ratio of cycles the device memory interface is active sending or receiving data.
# TYPE DCGM_FI_PROF_DRAM_ACTIVE gauge
DCGM_FI_PROF_DRAM_ACTIVE{{{mig},GPU_I_PROFILE="3g.40gb",GPU_I_ID="1",Hostname="mig-0",container="notebook",namespace="jhub",pod="jupyter-ada"}} 0.25
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{{{mig},GPU_I_PROFILE="1g.10gb",GPU_I_ID="9",Hostname="mig-0",container="notebook",namespace="jhub",pod="jupyter-bob"}} 14
""")
    got = await source.sample([target("ada"), target("bob")])
    [ada] = got[("ada", "")]
    assert ada.device == "GPU-8f2c1d90-3e5a-4b17-9c2e-5da9abb51763/1"
    assert ada.utilization == pytest.approx(81.2)
    assert ada.memory_utilization == pytest.approx(25.0)
    assert ada.memory_used is None
    [bob] = got[("bob", "")]
    assert bob.device == "GPU-8f2c1d90-3e5a-4b17-9c2e-5da9abb51763/9"  # same GPU, another slice
    assert (bob.utilization, bob.memory_utilization, bob.memory_used) == (0.0, None, 14 * MIB)


async def test_the_busier_of_two_utilisation_counters_counts(prom, source) -> None:  # type: ignore[no-untyped-def]
    prom.scrape(f"""
DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} 2
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{A100},namespace="jhub",pod="jupyter-ada"}} 0.4
""")
    [ada] = (await source.sample([target("ada")]))[("ada", "")]
    assert ada.utilization == pytest.approx(40.0)


async def test_a_time_sliced_gpu_reads_as_the_whole_gpu_for_every_sharer(prom, source) -> None:  # type: ignore[no-untyped-def]
    """dcgm-exporter (KUBERNETES_VIRTUAL_GPUS) copies the GPU's series for each pod that shares
    it: ada, idle herself, reads as busy while bob works on the same GPU."""
    t4 = 'gpu="0",UUID="GPU-be6e8706-1ee7-9ce9-7c5e-80ebf0f66714",pci_bus_id="00000000:00:1E.0",device="nvidia0",modelName="Tesla T4",Hostname="t4-0"'
    prom.scrape(f"""
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{{{t4},container="notebook",namespace="jhub",pod="jupyter-ada",vgpu="0"}} 64
DCGM_FI_DEV_GPU_UTIL{{{t4},container="notebook",namespace="jhub",pod="jupyter-bob",vgpu="1"}} 64
""")
    got = await source.sample([target("ada"), target("bob")])
    assert got[("ada", "")] == [
        GpuSample("GPU-be6e8706-1ee7-9ce9-7c5e-80ebf0f66714", 64.0, None, got[("ada", "")][0].at)
    ]
    assert got[("bob", "")][0].utilization == 64.0
    assert got[("bob", "")][0].device == got[("ada", "")][0].device

    # Only when the whole GPU is idle are both idle.
    prom.scrape(f"""
DCGM_FI_DEV_GPU_UTIL{{{t4},container="notebook",namespace="jhub",pod="jupyter-ada",vgpu="0"}} 0
DCGM_FI_DEV_GPU_UTIL{{{t4},container="notebook",namespace="jhub",pod="jupyter-bob",vgpu="1"}} 0
""")
    got = await source.sample([target("ada"), target("bob")])
    assert [s.utilization for key in (("ada", ""), ("bob", "")) for s in got[key]] == [0, 0]


async def test_nan_and_negative_values_are_no_reading(prom, source) -> None:  # type: ignore[no-untyped-def]
    prom.scrape(f"""
DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} NaN
DCGM_FI_DEV_FB_USED{{{A100},namespace="jhub",pod="jupyter-ada"}} 1024
DCGM_FI_DEV_GPU_UTIL{{{A100_1},namespace="jhub",pod="jupyter-bob"}} -1
DCGM_FI_DEV_GPU_UTIL{{{A100_1},namespace="jhub",pod="jupyter-cy"}} +Inf
""")
    got = await source.sample([target("ada"), target("bob"), target("cy")])
    [ada] = got[("ada", "")]  # the memory reading is there, the utilisation is unknown
    assert (ada.utilization, ada.memory_used) == (None, 1024 * MIB)
    assert ("bob", "") not in got
    assert ("cy", "") not in got


# -- pods are matched exactly ------------------------------------------------------------------


async def test_a_pod_of_the_same_name_in_another_namespace_is_not_the_server(prom, source) -> None:  # type: ignore[no-untyped-def]
    prom.scrape(f"""
DCGM_FI_DEV_GPU_UTIL{{{A100},container="notebook",namespace="jhub",pod="jupyter-ada"}} 0
DCGM_FI_DEV_GPU_UTIL{{{A100_1},container="trainer",namespace="research",pod="jupyter-ada"}} 100
""")
    got = await source.sample([target("ada")])
    assert [(s.device, s.utilization) for s in got[("ada", "")]] == [(A100_UUID, 0.0)]
    assert got == await source.sample([target("ada")])

    # Also when the query does not restrict the namespace, the match does.
    source.query = '{__name__="DCGM_FI_DEV_GPU_UTIL"}[$window]'
    got = await source.sample([target("ada")])
    assert [(s.device, s.utilization) for s in got[("ada", "")]] == [(A100_UUID, 0.0)]
    got = await source.sample([target("ada", namespace="research")])
    assert [(s.device, s.utilization) for s in got[("ada", "")]] == [(A100_1_UUID, 100.0)]


async def test_pod_names_are_matched_exactly_never_by_prefix(prom, source) -> None:  # type: ignore[no-untyped-def]
    """ada's named server "gpu" runs in jupyter-ada--gpu; a user "ada-" or a server named so
    that its pod starts with another's name gets nothing of the other's readings."""
    prom.scrape(f"""
DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada--gpu"}} 95
DCGM_FI_DEV_GPU_UTIL{{{A100_1},namespace="jhub",pod="jupyter-ada"}} 0
""")
    got = await source.sample(
        [
            target("ada"),  # jupyter-ada
            target("ada", "gpu"),  # jupyter-ada--gpu
            target("ada-", "-gpu"),  # a lookalike: jupyter-ada---gpu
            target("ad"),  # jupyter-ad, a prefix of both
        ]
    )
    assert {key: [s.utilization for s in samples] for key, samples in got.items()} == {
        ("ada", ""): [0.0],
        ("ada", "gpu"): [95.0],
    }


async def test_a_pod_two_servers_claim_belongs_to_neither(prom, source) -> None:  # type: ignore[no-untyped-def]
    prom.scrape(f'DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} 0')
    got = await source.sample([target("ada"), target("eve", pod="jupyter-ada")])
    assert got == {}


async def test_targets_without_a_pod_are_left_out_without_a_query(prom, source) -> None:  # type: ignore[no-untyped-def]
    got = await source.sample(
        [
            ServerTarget("ada", "", gpus=1),  # local backend target: no pod
            target("bob", namespace=None),
            target("cy", namespace='jhub"|.*'),  # not a namespace name: never put in a query
        ]
    )
    assert got == {}
    assert prom.queries == []


async def test_series_matchers_keep_out_series_from_other_scrape_jobs(prom, source) -> None:  # type: ignore[no-untyped-def]
    """A series claiming to be ada's GPU from another scrape job (an endpoint a user controls)
    does not count when the exporter's job is named."""
    prom.scrape(
        f'DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} 0', job="user-metrics"
    )
    assert (await source.sample([target("ada")]))[("ada", "")][0].utilization == 0.0
    source.series_matchers = 'job="nvidia-dcgm-exporter"'
    assert await source.sample([target("ada")]) == {}
    prom.scrape(f'DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} 70')
    assert (await source.sample([target("ada")]))[("ada", "")][0].utilization == 70.0


async def test_exported_labels_when_prometheus_does_not_honour_the_exporters() -> None:
    prom = FakePrometheus(honor_labels=False).start()
    source = PrometheusActivitySource(url=prom.url, timeout=2)
    try:
        prom.scrape(f'DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} 50')
        assert await source.sample([target("ada")]) == {}  # namespace/pod are the exporter's own
        source.namespace_label, source.pod_label = "exported_namespace", "exported_pod"
        got = await source.sample([target("ada")])
        assert got[("ada", "")][0].utilization == 50.0
    finally:
        source.close()
        prom.stop()


# -- faults: no readings, a log line, never an exception -----------------------------------------


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.getMessage().startswith("gpuhub:")
    ]


async def test_prometheus_down(prom, source, caplog) -> None:  # type: ignore[no-untyped-def]
    gone = FakePrometheus().start()
    url = gone.url
    gone.stop()
    source.url = url
    caplog.set_level(logging.INFO)
    for _ in range(3):
        assert await source.sample([target("ada")]) == {}
    [message] = warnings(caplog)  # one line, not one per cycle
    assert "no GPU readings from Prometheus" in message and "cannot reach" in message

    # back: readings again, and a line saying so
    source.url = prom.url
    prom.scrape(f'DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} 9')
    assert (await source.sample([target("ada")]))[("ada", "")][0].utilization == 9.0
    assert "GPU readings from Prometheus are back" in caplog.records[-1].getMessage()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, "internal error\n", "answered 500: internal error"),
        (
            503,
            '{"status":"error","errorType":"timeout","error":"query timed out in expression evaluation"}',
            "answered 503: query failed: query timed out",
        ),
        (
            422,
            '{"status":"error","errorType":"execution","error":"query processing would load too many samples"}',
            "answered 422: query failed: query processing would load too many samples",
        ),
        (401, "Unauthorized", "answered 401"),
        (302, "", "answered 302"),  # an auth proxy's login page is not followed
        (200, "<html><body>Grafana</body></html>", "not JSON"),
        (
            200,
            '{"status":"success","data":{"resultType":"vector","result":{"a":1}}}',
            "no data.result list",
        ),
        (
            200,
            '{"status":"success","data":{"resultType":"scalar","result":[1700000000,"1"]}}',
            "resultType 'scalar'",
        ),
        (
            200,
            '{"status":"success","data":{"resultType":"vector","result":[{"metric":{"pod":7},"value":[1,"1"]}]}}',
            "not a string",
        ),
        (
            200,
            '{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":["x","1"]}]}}',
            "not a number",
        ),
        (200, "[1, 2, 3]", "not a JSON object"),
        (200, "", "not JSON"),
    ],
)
async def test_a_bad_answer_is_no_readings(prom, source, caplog, status, body, expected) -> None:  # type: ignore[no-untyped-def]
    prom.scrape(f'DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} 0')
    prom.answer_with(status, body, "application/json" if body.startswith("{") else "text/html")
    assert await source.sample([target("ada")]) == {}
    [message] = warnings(caplog)
    assert expected in message


async def test_an_oversized_answer_is_dropped(prom, source, caplog) -> None:  # type: ignore[no-untyped-def]
    source.max_answer_bytes = 64 * 1024
    # Many GPU pods in the namespace: a real answer larger than the cap.
    lines = [
        f'DCGM_FI_DEV_GPU_UTIL{{gpu="{i % 8}",UUID="GPU-{i:08d}",device="nvidia{i % 8}",Hostname="node-{i // 8}",namespace="jhub",pod="jupyter-user{i}"}} 50'
        for i in range(600)
    ]
    prom.scrape("\n".join(lines))
    assert await source.sample([target("user1")]) == {}
    assert "larger than max_answer_bytes" in warnings(caplog)[-1]
    source.max_answer_bytes = 32 * 1024 * 1024
    assert (await source.sample([target("user1")]))[("user1", "")][0].utilization == 50.0

    # Also when the answer says nothing of its length (chunked) and never ends.
    source.max_answer_bytes = 64 * 1024
    prom.answer_streamed(b" " * 16384, 100_000)
    caplog.clear()
    started = time.monotonic()
    assert await source.sample([target("user1")]) == {}
    assert time.monotonic() - started < 2
    assert "larger than max_answer_bytes" in warnings(caplog)[-1]


async def test_a_slow_answer_is_no_readings(prom, source, caplog) -> None:  # type: ignore[no-untyped-def]
    prom.scrape(f'DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} 0')
    source.timeout = 0.5
    prom.delay = 2
    started = time.monotonic()
    assert await source.sample([target("ada")]) == {}
    assert time.monotonic() - started < 1.5
    assert "Timeout" in warnings(caplog)[-1]


async def test_no_url_is_no_readings(caplog) -> None:  # type: ignore[no-untyped-def]
    source = PrometheusActivitySource()
    assert await source.sample([target("ada")]) == {}
    assert "no Prometheus URL" in warnings(caplog)[0]


# -- behind authentication ---------------------------------------------------------------------


async def test_bearer_token_from_a_file_read_every_cycle(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    prom = FakePrometheus(bearer_token="s3cret-1").start()
    token = tmp_path / "token"
    source = PrometheusActivitySource(url=prom.url, timeout=2, bearer_token_file=str(token))
    try:
        prom.scrape(f'DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} 33')
        assert await source.sample([target("ada")]) == {}  # no file yet: nothing sent
        assert prom.queries == []
        assert "cannot read bearer_token_file" in warnings(caplog)[-1]

        token.write_text("s3cret-1\n")
        assert (await source.sample([target("ada")]))[("ada", "")][0].utilization == 33.0
        assert prom.queries[-1]["authorization"] == "Bearer s3cret-1"

        prom.bearer_token = "s3cret-2"  # rotated on the server first: 401, no readings
        assert await source.sample([target("ada")]) == {}
        assert "answered 401" in warnings(caplog)[-1]
        token.write_text("s3cret-2")  # ... then in the file
        assert (await source.sample([target("ada")]))[("ada", "")][0].utilization == 33.0

        token.write_text("two\nlines")
        assert await source.sample([target("ada")]) == {}
        assert "no single-line token" in warnings(caplog)[-1]
    finally:
        source.close()
        prom.stop()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prometheus.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "prom.crt", tmp_path / "prom.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_https_with_the_configured_ca(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    prom = FakePrometheus(ssl_context=context).start()
    source = PrometheusActivitySource(url=prom.url, timeout=2)
    try:
        prom.scrape(f'DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} 21')
        assert prom.url.startswith("https://")
        assert await source.sample([target("ada")]) == {}  # not trusted by default
        assert "CERTIFICATE_VERIFY_FAILED" in warnings(caplog)[-1]
        source.ca_file = str(cert)
        assert (await source.sample([target("ada")]))[("ada", "")][0].utilization == 21.0
    finally:
        source.close()
        prom.stop()


# -- settings ----------------------------------------------------------------------------------


def test_settings_are_checked() -> None:
    with pytest.raises(TraitError, match="http:// or https://"):
        PrometheusActivitySource(url="prometheus:9090")
    with pytest.raises(TraitError, match="not a label name"):
        PrometheusActivitySource(pod_label="exported-pod")
    with pytest.raises(TraitError, match="query: not a valid template"):
        PrometheusActivitySource(query="DCGM_FI_DEV_GPU_UTIL{namespace=~$nss}")
    with pytest.raises(TraitError, match="staleness: must be > 0"):
        PrometheusActivitySource(staleness=0)
    assert PrometheusActivitySource(url="http://prometheus:9090/").url == "http://prometheus:9090"


def test_the_exposition_parser_reads_dcgm_exporter_output() -> None:
    """The test helper itself: labels with escapes, timestamps, comments, special values."""
    samples = parse_exposition(
        "# HELP x y\n"
        'DCGM_FI_DEV_GPU_UTIL{UUID="GPU-1",modelName="A \\"quoted\\" name",pod="p"} 42 1700000000123\n'
        "DCGM_FI_DEV_FB_USED NaN\n"
    )
    assert samples[0].labels == {"UUID": "GPU-1", "modelName": 'A "quoted" name', "pod": "p"}
    assert (samples[0].value, samples[0].timestamp_ms) == (42.0, 1700000000123)
    assert samples[1].labels == {} and samples[1].value != samples[1].value
    with pytest.raises(ValueError, match="line 1"):
        parse_exposition("not a sample line at all {")
    assert json.loads(json.dumps([s.name for s in samples])) == [
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
    ]


async def test_custom_queries_instant_vectors_and_or(prom, source, caplog) -> None:  # type: ignore[no-untyped-def]
    prom.scrape(f"""
DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} 17
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{A100_1},GPU_I_PROFILE="1g.10gb",GPU_I_ID="3",namespace="jhub",pod="jupyter-bob"}} 0.5
""")
    # An instant vector: the reading's time is the query's.
    source.query = 'DCGM_FI_DEV_GPU_UTIL{namespace=~"$namespaces"}'
    before = time.time()
    got = await source.sample([target("ada")])
    assert got[("ada", "")][0].utilization == 17.0
    assert got[("ada", "")][0].at >= before - 0.01

    # One query per metric, joined with `or`.
    source.query = (
        'DCGM_FI_DEV_GPU_UTIL{$namespace_label=~"$namespaces"}[$window]'
        ' or DCGM_FI_PROF_GR_ENGINE_ACTIVE{$namespace_label=~"$namespaces"}[$window]'
    )
    got = await source.sample([target("ada"), target("bob")])
    assert got[("ada", "")][0].utilization == 17.0
    assert got[("bob", "")][0].utilization == 50.0
    assert got[("bob", "")][0].device == f"{A100_1_UUID}/3"

    # A query Prometheus refuses: no readings, and its error in the log.
    source.query = 'max by (pod) (DCGM_FI_DEV_GPU_UTIL{namespace=~"$namespaces"})'
    assert await source.sample([target("ada")]) == {}
    assert "answered 400: query failed: parse error" in warnings(caplog)[-1]


async def test_an_unexpected_error_is_logged_not_raised(prom, source, caplog, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import gpuhub.activity.prometheus as module

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    prom.scrape(f'DCGM_FI_DEV_GPU_UTIL{{{A100},namespace="jhub",pod="jupyter-ada"}} 0')
    monkeypatch.setattr(module, "readings", broken)
    assert await source.sample([target("ada")]) == {}
    assert any("RuntimeError: a bug" in m for m in warnings(caplog))


async def test_readings_of_an_earlier_pod_of_the_same_name_are_not_the_servers(
    prom, source
) -> None:  # type: ignore[no-untyped-def]
    """A server restarted (a GPU given back) runs in a new pod of the same name: the old pod's
    series, still inside the staleness window, are not its readings."""
    now = time.time()
    prom.scrape(
        f'DCGM_FI_DEV_GPU_UTIL{{{A100},container="notebook",namespace="jhub",pod="jupyter-ada"}} 0',
        now - 60,
    )
    prom.scrape(
        f'DCGM_FI_DEV_GPU_UTIL{{{A100_1},container="notebook",namespace="jhub",pod="jupyter-ada"}} 55',
        now - 10,
    )
    got = await source.sample([target("ada")])
    assert [s.device for s in got[("ada", "")]] == [A100_UUID, A100_1_UUID]  # without `since`
    got = await source.sample([target("ada", since=now - 30)])
    assert [(s.device, s.utilization) for s in got[("ada", "")]] == [(A100_1_UUID, 55.0)]
