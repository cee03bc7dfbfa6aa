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
               "minor": 0, "sample_period_s": 1.0,
               "unsupported": ["utilization", "samples", "processes", "processes_v3",
                               "processes_v2", "memory", "mig_mode"]}],
     "init_error": "library_not_found" | "driver_not_loaded" | "no_permission"}

A timeline point applies from its `at` until the next one (it may set `util`, `mem_util`,
`memory_used` and `processes`); values outside a timeline are the GPU's own. A MIG GPU
(`"mig": [...]`) exposes its instances as MIG devices, on which utilisation and samples are not
supported (as on real MIG instances). `nvmlDeviceGetSamples` returns one sample every
`sample_period_s` seconds (NVML keeps one every 1/6 s to 1 s) from a buffer of the last
`SAMPLE_BUFFER` samples, taking each value from the scenario at that sample's time.
`processes_v3` / `processes_v2` in `unsupported` make the driver lack those entry points
(`NVMLError_FunctionNotFound`, as on older drivers); `init_error` makes `nvmlInit` fail the way
a machine without a driver does. A missing scenario file is a machine without the NVML library.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynvml import (  # the real exception classes, structs and constants: callers cannot tell
    NVML_DEVICE_MIG_DISABLE,
    NVML_DEVICE_MIG_ENABLE,
    NVML_ERROR_INSUFFICIENT_SIZE,
    NVML_GPU_UTILIZATION_SAMPLES,
    NVML_MEMORY_UTILIZATION_SAMPLES,
    NVML_SUCCESS,
    NVML_VALUE_TYPE_UNSIGNED_INT,
    NVMLError,
    NVMLError_DriverNotLoaded,
    NVMLError_FunctionNotFound,
    NVMLError_InvalidArgument,
    NVMLError_LibraryNotFound,
    NVMLError_NoPermission,
    NVMLError_NotFound,
    NVMLError_NotSupported,
    NVMLError_Uninitialized,
    NVMLLibraryMismatchError,
    c_nvmlSample_t,
    c_nvmlValue_t,
)

SIMULATED = True
ENV = "GPUHUB_FAKE_NVML"
SAMPLE_BUFFER = 120  # samples NVML keeps per device and kind (the fake's choice)

__all__ = [
    "NVML_DEVICE_MIG_DISABLE",
    "NVML_DEVICE_MIG_ENABLE",
    "NVML_ERROR_INSUFFICIENT_SIZE",
    "NVML_GPU_UTILIZATION_SAMPLES",
    "NVML_MEMORY_UTILIZATION_SAMPLES",
    "NVML_SUCCESS",
    "NVML_VALUE_TYPE_UNSIGNED_INT",
    "NVMLError",
    "NVMLError_DriverNotLoaded",
    "NVMLError_FunctionNotFound",
    "NVMLError_InvalidArgument",
    "NVMLError_LibraryNotFound",
    "NVMLError_NoPermission",
    "NVMLError_NotFound",
    "NVMLError_NotSupported",
    "NVMLError_Uninitialized",
    "NVMLLibraryMismatchError",
    "c_nvmlSample_t",
    "c_nvmlValue_t",
]

_INIT_ERRORS = {
    "library_not_found": NVMLError_LibraryNotFound,
    "driver_not_loaded": NVMLError_DriverNotLoaded,
    "no_permission": NVMLError_NoPermission,
}

_lock = threading.Lock()
_state: dict[str, Any] = {"initialised": 0, "mtime": None, "scenario": None}


@dataclass
class c_nvmlMemory_t:
    total: int
    free: int
    used: int


@dataclass
class c_nvmlUtilization_t:
    gpu: int
    memory: int


@dataclass
class c_nvmlProcessInfo_t:
    pid: int
    usedGpuMemory: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


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
        st = path.stat()
    except OSError:
        raise NVMLError_LibraryNotFound() from None
    mtime = (st.st_mtime_ns, st.st_ino, st.st_size)  # replaced files always differ
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


def _values_at(gpu: dict[str, Any], t: float) -> dict[str, Any]:
    values = {
        "util": gpu.get("util", 0),
        "mem_util": gpu.get("mem_util", 0),
        "memory_used": gpu.get("memory_used", 0),
        "processes": gpu.get("processes") or [],
    }
    for point in sorted(gpu.get("timeline") or (), key=lambda p: p["at"]):
        if point["at"] <= t:
            values.update({k: v for k, v in point.items() if k != "at"})
    return values


def _now_values(gpu: dict[str, Any]) -> dict[str, Any]:
    return _values_at(gpu, time.time())


def _unsupported(gpu: dict[str, Any], what: str) -> bool:
    return what in (gpu.get("unsupported") or ()) or (
        gpu.get("_mig_instance", False) and what in ("utilization", "samples")
    )


# -- the pynvml functions ------------------------------------------------------------------------


def nvmlInit() -> None:
    scenario = _scenario()  # raises LibraryNotFound when the scenario file is missing
    error = scenario.get("init_error")
    if error:
        raise _INIT_ERRORS.get(error, NVMLError_LibraryNotFound)()
    _state["initialised"] += 1


def nvmlShutdown() -> None:
    _require_init()
    _state["initialised"] -= 1


def nvmlSystemGetDriverVersion() -> str:
    _require_init()
    return str(_scenario().get("driver_version", "560.35.03"))


def nvmlDeviceGetCount() -> int:
    _require_init()
    return len(_scenario()["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    _require_init()
    if not 0 <= index < len(_scenario()["gpus"]):
        raise NVMLError_InvalidArgument()
    return _Handle(index)


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    return str(_gpu(handle)["uuid"])


def nvmlDeviceGetName(handle: _Handle) -> str:
    return str(_gpu(handle)["name"])


def nvmlDeviceGetMinorNumber(handle: _Handle) -> int:
    gpu = _gpu(handle)
    if gpu.get("_mig_instance"):
        raise NVMLError_NotSupported()
    return int(gpu.get("minor", handle.gpu))


def nvmlDeviceGetMemoryInfo(handle: _Handle, version: int | None = None) -> c_nvmlMemory_t:
    gpu = _gpu(handle)
    if _unsupported(gpu, "memory"):
        raise NVMLError_NotSupported()
    total = int(gpu["memory_total"])
    used = min(int(_now_values(gpu)["memory_used"]), total)
    return c_nvmlMemory_t(total=total, free=total - used, used=used)


def nvmlDeviceGetMigMode(handle: _Handle) -> list[int]:
    gpu = _gpu(handle)
    if gpu.get("_mig_instance") or "mig_mode" in (gpu.get("unsupported") or ()):
        raise NVMLError_NotSupported()
    mode = NVML_DEVICE_MIG_ENABLE if gpu.get("mig") else NVML_DEVICE_MIG_DISABLE
    return [mode, mode]


def nvmlDeviceGetMaxMigDeviceCount(handle: _Handle) -> int:
    gpu = _gpu(handle)
    if not gpu.get("mig"):
        raise NVMLError_NotSupported()
    return 7


def nvmlDeviceGetMigDeviceHandleByIndex(handle: _Handle, index: int) -> _Handle:
    gpu = _gpu(handle)
    instances = gpu.get("mig") or []
    if index >= len(instances):
        raise NVMLError_NotFound()
    return _Handle(handle.gpu, index)


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> c_nvmlUtilization_t:
    gpu = _gpu(handle)
    if _unsupported(gpu, "utilization"):
        raise NVMLError_NotSupported()
    values = _now_values(gpu)
    return c_nvmlUtilization_t(gpu=int(values["util"]), memory=int(values["mem_util"]))


def nvmlDeviceGetSamples(device: _Handle, sampling_type: int, timeStamp: int):
    """(value type, samples newer than `timeStamp` µs) as NVML returns them."""
    gpu = _gpu(device)
    if _unsupported(gpu, "samples"):
        raise NVMLError_NotSupported()
    if sampling_type == NVML_GPU_UTILIZATION_SAMPLES:
        key = "util"
    elif sampling_type == NVML_MEMORY_UTILIZATION_SAMPLES:
        key = "mem_util"
    else:
        raise NVMLError_NotSupported()
    period = float(gpu.get("sample_period_s", 1.0))
    now = time.time()
    last = int(now // period)
    first = max(last - SAMPLE_BUFFER + 1, int((timeStamp / 1e6) // period) + 1)
    samples = []
    for k in range(first, last + 1):
        t = k * period
        if int(t * 1e6) <= timeStamp:
            continue
        value = int(_values_at(gpu, t)[key])
        samples.append(
            c_nvmlSample_t(timeStamp=int(t * 1e6), sampleValue=c_nvmlValue_t(uiVal=value))
        )
    if not samples:
        raise NVMLError_NotFound()
    return (NVML_VALUE_TYPE_UNSIGNED_INT, samples)


def _processes(handle: _Handle, version: str) -> list[c_nvmlProcessInfo_t]:
    gpu = _gpu(handle)
    if _unsupported(gpu, f"processes_{version}"):
        raise NVMLError_FunctionNotFound()
    if _unsupported(gpu, "processes"):
        raise NVMLError_NotSupported()
    return [
        c_nvmlProcessInfo_t(pid=int(p["pid"]), usedGpuMemory=int(p.get("used_memory", 0)))
        for p in _now_values(gpu)["processes"]
    ]


def nvmlDeviceGetComputeRunningProcesses_v3(handle: _Handle) -> list[c_nvmlProcessInfo_t]:
    return _processes(handle, "v3")


def nvmlDeviceGetComputeRunningProcesses_v2(handle: _Handle) -> list[c_nvmlProcessInfo_t]:
    return _processes(handle, "v2")


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[c_nvmlProcessInfo_t]:
    """The unversioned call is the v3 one, as in nvidia-ml-py 12+ (mismatch error without it)."""
    try:
        return _processes(handle, "v3")
    except NVMLError_FunctionNotFound:
        raise NVMLLibraryMismatchError(
            "Unversioned function called and the pyNVML version does not match the NVML lib "
            "version. Either use matching pyNVML and NVML lib versions or use a versioned "
            "function such as nvmlDeviceGetComputeRunningProcesses_v2"
        ) from None


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(scenario, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
