from __future__ import annotations

import contextlib
import http.server
import os
import threading
import uuid
from collections.abc import Iterator

import pytest

from gpuhub import nvml
from gpuhub.testing import Hub, free_port_block

from .helpers import ServiceHub


class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def running_service_hub(state_dir, run_marker, gpus: int = 4) -> Iterator[ServiceHub]:
    """A real gpuhub JupyterHub (`gpus` simulated GPUs) whose `gpuhub` service is run by the
    tests, in-process, with the service's own token and scopes."""
    token = uuid.uuid4().hex
    port = free_port_block(1)
    hub = Hub(
        state_dir,
        run_marker,
        env_overrides={
            "GPUHUB_DEMO_SERVICE": "external",
            "GPUHUB_DEMO_SERVICE_TOKEN": token,
            "GPUHUB_DEMO_SERVICE_PORT": str(port),
            "GPUHUB_DEMO_GPUS": str(gpus),
        },
    )
    # The hub waits up to 30 s for an external service's address to answer HTTP; the tests start
    # the service later, so something answers there while the hub starts.
    placeholder = http.server.HTTPServer(("127.0.0.1", port), Answer)
    thread = threading.Thread(target=placeholder.serve_forever, daemon=True)
    thread.start()
    try:
        hub.start()
    finally:
        placeholder.shutdown()
        placeholder.server_close()
    # The service counts the pool with NVML, like the hub: the same simulated GPUs.
    previous = os.environ.get(nvml.FAKE_ENV)
    os.environ[nvml.FAKE_ENV] = str(hub.state_dir / "simulated-gpus.json")
    sh = ServiceHub(hub, token, service_port=port)
    try:
        yield sh
    finally:
        sh.stop_service()
        if previous is None:
            os.environ.pop(nvml.FAKE_ENV, None)
        else:
            os.environ[nvml.FAKE_ENV] = previous
        hub.stop_all_servers()
        hub.stop()


@pytest.fixture(scope="module")
def service_hub(tmp_path_factory, run_marker):
    """A real gpuhub JupyterHub (4 simulated GPUs) whose `gpuhub` service is run by the tests,
    in-process, with the service's own token and scopes."""
    with running_service_hub(tmp_path_factory.mktemp("hub"), run_marker) as sh:
        yield sh
