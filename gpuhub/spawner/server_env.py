"""The GPUHUB_* variables every server gets, from either backend (docs/architecture.md).

Pure. `GPUHUB_INTERFACE`, `GPUHUB_ENVIRONMENT`, `GPUHUB_GPU_TYPE` ("" without a GPU),
`GPUHUB_GPU_COUNT` and `GPUHUB_GPUS` (the GPUs' UUIDs, comma-separated; "" without a GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.options import Selection

#: the names `server_env` sets (a GPU server on Kubernetes lacks `GPUHUB_GPUS`, see there)
NAMES = (
    "GPUHUB_INTERFACE",
    "GPUHUB_ENVIRONMENT",
    "GPUHUB_GPU_TYPE",
    "GPUHUB_GPU_COUNT",
    "GPUHUB_GPUS",
)


def server_env(selection: Selection, devices: Sequence[str] | None) -> dict[str, str]:
    """The GPUHUB_* variables of a server running `selection` on `devices` (UUIDs).

    `devices` None: the platform picks the GPUs when the server starts (Kubernetes' device
    plugin), so a GPU server gets no `GPUHUB_GPUS` and finds its GPUs the way the server
    extension does without it (`CUDA_VISIBLE_DEVICES`, else what NVML shows in its container).
    """
    env = {
        "GPUHUB_INTERFACE": selection.interface,
        "GPUHUB_ENVIRONMENT": selection.environment,
        "GPUHUB_GPU_TYPE": (selection.gpu_type or "") if selection.gpus else "",
        "GPUHUB_GPU_COUNT": str(selection.gpus),
    }
    if devices is not None:
        env["GPUHUB_GPUS"] = ",".join(devices)
    elif not selection.gpus:
        env["GPUHUB_GPUS"] = ""
    return env
