from __future__ import annotations

import pytest

from gpuhub.testing import Hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory, run_marker):
    """A real gpuhub JupyterHub (demo configuration, 4 simulated GPUs) for the module's tests."""
    hub = Hub(tmp_path_factory.mktemp("hub"), run_marker).start()
    yield hub
    hub.stop_all_servers()
    hub.stop()
