"""A stand-in for pynvml, driven by a scenario file, for the demo's simulated GPUs and the tests.

It implements the pynvml functions gpuhub calls, with the same names, signatures, return types
and exception classes (those of nvidia-ml-py itself), so `gpuhub.nvml` runs the same code on it as
on a real driver. The scenario (JSON, path in `GPUHUB_FAKE_NVML`) is re-read whenever it changes,
so `gpuhub demo-gpu` can make a simulated GPU busy or idle in a running demo:

    {"driver_version": "...",
     "gpus": [{"uuid": "GPU-...", "name": "...", "memory_total": bytes,
               "util": percent, "mem_util": percent, "memory_used": bytes,
               "processes": [{"pid": 123, "used_memory": bytes}],
               "timeline": [{"at": unix_seconds, "util": ..., "mem_util": ..., "memory_used": ...}],
               "mig": [{"uuid": "MIG-...", "name": "...", "memory_total": bytes, ...}],
               "unsupported": ["utilization", "samples", ...]}]}

A timeline point applies from its `at` until the next one; values outside a timeline are the
GPU's own. A MIG GPU (`"mig": [...]`) exposes its instances as MIG devices.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynvml import (  # the real exception classes and constants, so callers cannot tell
    NVML_DEVICE_MIG_DISABLE,
    NVML_DEVICE_MIG_ENABLE,
    NVMLError,
    NVMLError_InvalidArgument,
    NVMLError_NotFound,
    NVMLError_NotSupported,
    NVMLError_Uninitialized,
)

SIMULATED = True
ENV = "GPUHUB_FAKE_NVML"

__all__ = [
    "NVML_DEVICE_MIG_DISABLE",
    "NVML_DEVICE_MIG_ENABLE",
    "NVMLError",
    "NVMLError_InvalidArgument",
    "NVMLError_NotFound",
    "NVMLError_NotSupported",
    "NVMLError_Uninitialized",
]

_lock = threading.Lock()
_state: dict[str, Any] = {"initialised": 0, "mtime": None, "scenario": None}


@dataclass
class c_nvmlMemory_t:  # noqa: N801 - pynvml's name
    total: int
    free: int
    used: int


@dataclass
class c_nvmlUtilization_t:  # noqa: N801
    gpu: int
    memory: int


@dataclass
class c_nvmlProcessInfo_t:  # noqa: N801
    pid: int
    usedGpuMemory: int  # noqa: N815
    gpuInstanceId: int = 0xFFFFFFFF  # noqa: N815
    computeInstanceId: int = 0xFFFFFFFF  # noqa: N815


@dataclass(frozen=True)
class _Handle:
    gpu: int
    mig: int | None = None


def scenario_path() -> Path:
    path = os.environ.get(ENV)
    if not path:
        raise NVMLError_Uninitialized()
    return Path(path)


def _scenario() -> dict[str, Any]:
    path = scenario_path()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        from pynvml import NVMLError_LibraryNotFound

        raise NVMLError_LibraryNotFound() from None
    with _lock:
        if _state["mtime"] != mtime or _state["scenario"] is None:
            _state["scenario"] = json.loads(path.read_text())
            _state["mtime"] = mtime
        return _state["scenario"]


def _require_init() -> None:
    if not _state["initialised"]:
        raise NVMLError_Uninitialized()


def _gpu(handle: _Handle) -> dict[str, Any]:
    _require_init()
    if not isinstance(handle, _Handle):
        raise NVMLError_InvalidArgument()
    gpus = _scenario()["gpus"]
    if handle.gpu >= len(gpus):
        raise NVMLError_InvalidArgument()
    gpu = gpus[handle.gpu]
    if handle.mig is not None:
        return {**gpu, **gpu["mig"][handle.mig], "mig": None, "_mig_instance": True}
    return gpu


def _now_values(gpu: dict[str, Any]) -> dict[str, Any]:
    values = {
        "util": gpu.get("util", 0),
        "mem_util": gpu.get("mem_util", 0),
        "memory_used": gpu.get("memory_used", 0),
    }
    now = time.time()
    for point in gpu.get("timeline") or ():
        if point["at"] <= now:
            values.update({k: v for k, v in point.items() if k != "at"})
    return values


def _unsupported(gpu: dict[str, Any], what: str) -> bool:
    return what in (gpu.get("unsupported") or ()) or (
        gpu.get("_mig_instance", False) and what in ("utilization", "samples")
    )


# -- the pynvml functions ------------------------------------------------------------------------


def nvmlInit() -> None:  # noqa: N802
    _scenario()  # raises LibraryNotFound when the scenario file is missing
    _state["initialised"] += 1


def nvmlShutdown() -> None:  # noqa: N802
    _require_init()
    _state["initialised"] -= 1


def nvmlSystemGetDriverVersion() -> str:  # noqa: N802
    _require_init()
    return str(_scenario().get("driver_version", "560.35.03"))


def nvmlDeviceGetCount() -> int:  # noqa: N802
    _require_init()
    return len(_scenario()["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:  # noqa: N802
    _require_init()
    if not 0 <= index < len(_scenario()["gpus"]):
        raise NVMLError_InvalidArgument()
    return _Handle(index)


def nvmlDeviceGetUUID(handle: _Handle) -> str:  # noqa: N802
    return str(_gpu(handle)["uuid"])


def nvmlDeviceGetName(handle: _Handle) -> str:  # noqa: N802
    return str(_gpu(handle)["name"])


def nvmlDeviceGetMemoryInfo(handle: _Handle) -> c_nvmlMemory_t:  # noqa: N802
    gpu = _gpu(handle)
    total = int(gpu["memory_total"])
    used = min(int(_now_values(gpu)["memory_used"]), total)
    return c_nvmlMemory_t(total=total, free=total - used, used=used)


def nvmlDeviceGetMigMode(handle: _Handle) -> list[int]:  # noqa: N802
    gpu = _gpu(handle)
    if gpu.get("_mig_instance") or "mig_mode" in (gpu.get("unsupported") or ()):
        raise NVMLError_NotSupported()
    mode = NVML_DEVICE_MIG_ENABLE if gpu.get("mig") else NVML_DEVICE_MIG_DISABLE
    return [mode, mode]


def nvmlDeviceGetMaxMigDeviceCount(handle: _Handle) -> int:  # noqa: N802
    gpu = _gpu(handle)
    if not gpu.get("mig"):
        raise NVMLError_NotSupported()
    return 7


def nvmlDeviceGetMigDeviceHandleByIndex(handle: _Handle, index: int) -> _Handle:  # noqa: N802
    gpu = _gpu(handle)
    instances = gpu.get("mig") or []
    if index >= len(instances):
        raise NVMLError_NotFound()
    return _Handle(handle.gpu, index)


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> c_nvmlUtilization_t:  # noqa: N802
    gpu = _gpu(handle)
    if _unsupported(gpu, "utilization"):
        raise NVMLError_NotSupported()
    values = _now_values(gpu)
    return c_nvmlUtilization_t(gpu=int(values["util"]), memory=int(values["mem_util"]))


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[c_nvmlProcessInfo_t]:  # noqa: N802
    gpu = _gpu(handle)
    if _unsupported(gpu, "processes"):
        raise NVMLError_NotSupported()
    return [
        c_nvmlProcessInfo_t(pid=int(p["pid"]), usedGpuMemory=int(p.get("used_memory", 0)))
        for p in gpu.get("processes") or ()
    ]


# -- writing scenarios (demo and tests) -----------------------------------------------------------


def simulated_gpus(count: int, name: str = "NVIDIA A100-SXM4-80GB") -> dict[str, Any]:
    """A scenario of `count` idle simulated GPUs with stable UUIDs."""
    return {
        "driver_version": "560.35.03 (simulated)",
        "gpus": [
            {
                "uuid": f"GPU-00000000-0000-4000-8000-{i:012d}",
                "name": f"{name} (simulated)",
                "memory_total": 80 * 1024**3,
                "util": 0,
                "mem_util": 0,
                "memory_used": 0,
                "processes": [],
            }
            for i in range(count)
        ],
    }


def write_scenario(path: Path, scenario: dict[str, Any]) -> None:
    """Replace the scenario atomically, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(scenario, indent=1))
    os.replace(tmp, path)
