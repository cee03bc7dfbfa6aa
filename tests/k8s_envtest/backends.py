"""The clusters the Kubernetes tests run against: the emulator everywhere, a real control plane
(`EnvtestCluster`) where controller-runtime's envtest binaries are (`KUBEBUILDER_ASSETS`). A
module's `emulator` fixture parametrized with `BACKENDS` runs its tests against both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from k8s_emulator import KubeEmulator
from k8s_emulator.hub import GPU_TAINT, emulator_path

from .cluster import EnvtestCluster
from .control_plane import assets

#: The backends the same Kubernetes tests run against: the emulator everywhere, a real control
#: plane where controller-runtime's envtest binaries are (`KUBEBUILDER_ASSETS`).
BACKENDS = ["emulated", pytest.param("envtest", marks=pytest.mark.envtest)]


def start_cluster(
    backend: str,
    root: Path,
    scheduler_profiles: dict[str, Any] | None = None,
    **emulator_settings: Any,
) -> Any:
    """A started cluster of `backend` whose pods run as local processes (the emulator, or a real
    API server with gpuhub's kubelet stand-ins); `scheduler_profiles`: scheduler name ->
    `pluginConfig` of the extra kube-scheduler profiles."""
    if backend == "envtest":
        folder, why = assets()
        assert folder is not None, why
        return EnvtestCluster(
            root, folder, {"PATH": emulator_path()}, scheduler_profiles=scheduler_profiles
        ).start()
    from k8s_emulator.scheduling import ScoringStrategy

    schedulers = {"default-scheduler": ScoringStrategy()}
    for name, plugin_config in (scheduler_profiles or {}).items():
        schedulers[name] = ScoringStrategy.from_plugin_config(plugin_config)
    return KubeEmulator(
        root,
        run_containers=True,
        container_env={"PATH": emulator_path()},
        schedulers=schedulers,
        **emulator_settings,
    ).start()


def add_standard_nodes(em: Any) -> None:
    """Two A100 nodes (2 + 1 GPUs, tainted), a time-sliced T4 node, a MIG node, a CPU node."""
    em.add_node(
        "a100-0",
        {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        {"nvidia.com/gpu": 2},
        [GPU_TAINT],
    )
    em.add_node(
        "a100-1",
        {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        {"nvidia.com/gpu": 1},
        [GPU_TAINT],
    )
    em.add_node(
        "t4-0",
        {"nvidia.com/gpu.product": "Tesla-T4-SHARED"},
        {"nvidia.com/gpu.shared": 4},
        [GPU_TAINT],
    )
    em.add_node(
        "mig-0",
        {"nvidia.com/mig.strategy": "mixed"},
        {"nvidia.com/mig-1g.10gb": 7, "nvidia.com/mig-3g.40gb": 2},
        [GPU_TAINT],
    )
    em.add_node("cpu-0")
