"""A server stops at once when the hub stops it (the local spawner sends SIGINT), even after
gpuhub's extension saved a file through Jupyter Server (a notice, run on one of AnyIO's worker
threads): Jupyter Server's clean stop runs (kernels shut down), and the process exits instead of
lingering until JupyterHub kills it 60 s later."""

from __future__ import annotations

import time

import pytest

from gpuhub.core import protocol
from gpuhub.testing import process_gone, wait_for

pytestmark = pytest.mark.slow


def test_a_stopped_server_exits_at_once_after_a_notice(service_hub):
    sh = service_hub
    sh.start("stop-stan", gpus=1)
    kernel = sh.open_notebook("stop-stan", "work.ipynb")
    sh.run("stop-stan", kernel, "x = 1")
    service = sh.service(gpu_idle_timeout=3600)
    result = sh.live.call(
        lambda: service.board.request(
            ("stop-stan", ""), protocol.NOTICE, {"path": "NOTE.md", "text": "hello"}, 30
        )
    )
    assert result.ok, result
    assert sh.read_file("stop-stan", "NOTE.md") == "hello"
    pid = sh.model("stop-stan")["state"]["pid"]

    started = time.monotonic()
    sh.hub.stop_server("stop-stan", timeout=120)
    took = time.monotonic() - started
    # JupyterHub waits 30 s after SIGINT before it sends SIGTERM: a lingering server takes longer
    assert took < 20, f"the server took {took:.0f} s to stop"
    assert wait_for(lambda: process_gone(pid), timeout=10, what="the server's process gone")
    log = sh.hub.log()
    assert "received signal 2, stopping" in log, "the server stopped cleanly on SIGINT"
