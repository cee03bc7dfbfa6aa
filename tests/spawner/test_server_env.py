"""Both backends give a server the same GPUHUB_* variables, built by one function
(`gpuhub.spawner.server_env`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from traitlets.config import Config

from gpuhub.core.catalog import catalog_from_dict
from gpuhub.core.options import Selection
from gpuhub.spawner.kube_objects import PodBase, pod_settings
from gpuhub.spawner.local import LocalGPUSpawner
from gpuhub.spawner.server_env import NAMES

CATALOG = catalog_from_dict(
    {
        "interfaces": [{"id": "jupyterlab", "display_name": "JupyterLab", "default_url": "/lab"}],
        "environments": [
            {"id": "pytorch", "display_name": "PyTorch", "image": "quay.io/x/pytorch:1"}
        ],
        "gpu_types": [
            {"id": "a100", "display_name": "A100", "resource": "nvidia.com/gpu"},
        ],
    }
)


def local_env(selection: Selection, devices: list[str], tmp_path) -> dict[str, str]:
    user = SimpleNamespace(name="ada", groups=[], spawners={}, url="/user/ada/", db=None)
    config = Config()
    config.GpuhubConfig.store_url = f"sqlite:///{tmp_path / 'gpuhub.sqlite'}"
    spawner = LocalGPUSpawner(user=user, hub=SimpleNamespace(), config=config)
    environment = CATALOG.environment(selection.environment)
    assert environment is not None
    return spawner._selection_env(selection, environment, devices)


def kube_env(selection: Selection) -> dict[str, str]:
    settings = pod_settings(selection, CATALOG, PodBase(image="x"), "ada")
    return {k: v for k, v in settings.environment.items() if isinstance(v, str)}


def gpuhub_names(env: dict[str, str]) -> set[str]:
    return {k for k in env if k.startswith("GPUHUB_") and k != "GPUHUB_KERNEL_PYTHON"}


@pytest.mark.parametrize(
    ("selection", "devices"),
    [
        (Selection("jupyterlab", "pytorch", 2, "a100"), ["GPU-0", "GPU-1"]),
        (Selection("jupyterlab", "pytorch", 0, None), []),
    ],
)
def test_both_backends_give_the_same_variables(selection, devices, tmp_path):
    local, kube = local_env(selection, devices, tmp_path), kube_env(selection)
    same = set(NAMES) - {"GPUHUB_GPUS"}
    assert {k: local[k] for k in same} == {k: kube[k] for k in same}
    assert local["GPUHUB_GPU_COUNT"] == str(selection.gpus)
    assert local["GPUHUB_GPU_TYPE"] == (selection.gpu_type or "")
    assert local["GPUHUB_GPUS"] == ",".join(devices)
    if selection.gpus:
        # on Kubernetes the device plugin picks the GPUs when the pod starts: the server finds
        # them in its container (CUDA_VISIBLE_DEVICES, NVML), gpuhub cannot name them
        assert gpuhub_names(local) == set(NAMES)
        assert gpuhub_names(kube) == set(NAMES) - {"GPUHUB_GPUS"}
    else:
        assert gpuhub_names(local) == gpuhub_names(kube) == set(NAMES)
        assert kube["GPUHUB_GPUS"] == ""
