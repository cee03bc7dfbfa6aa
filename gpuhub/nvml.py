"""NVML: the one module that talks to the NVIDIA driver (through pynvml, from nvidia-ml-py).

Without the library or a driver, gpuhub sees no GPUs and says why (`Inventory.reason`); it never
crashes. When `GPUHUB_FAKE_NVML` names a scenario file, `gpuhub.nvml_fake` stands in for pynvml
(simulated GPUs for the demo and the tests), and every device says it is simulated.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

FAKE_ENV = "GPUHUB_FAKE_NVML"


@dataclass(frozen=True)
class GpuDevice:
    """One device a server can be given: a whole GPU, or a MIG instance of one."""

    index: int
    uuid: str
    name: str
    memory_total: int
    mig_enabled: bool = False
    parent_uuid: str | None = None
    simulated: bool = False

    @property
    def is_mig_instance(self) -> bool:
        return self.parent_uuid is not None


@dataclass(frozen=True)
class Inventory:
    devices: tuple[GpuDevice, ...]
    available: bool
    reason: str = ""
    driver_version: str | None = None
    simulated: bool = False


_lock = threading.Lock()
_initialised: dict[int, bool] = {}


def load_library() -> ModuleType:
    """pynvml, or the fake when `GPUHUB_FAKE_NVML` is set."""
    if os.environ.get(FAKE_ENV):
        from . import nvml_fake

        return nvml_fake
    import pynvml

    return pynvml


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def init(lib: ModuleType | None = None) -> tuple[ModuleType | None, str]:
    """Initialise NVML once per process; returns the library, or None and why it is unavailable."""
    try:
        lib = lib or load_library()
    except ImportError as e:
        return None, f"nvidia-ml-py is not installed ({e})"
    with _lock:
        if _initialised.get(id(lib)):
            return lib, ""
        try:
            lib.nvmlInit()
        except lib.NVMLError as e:
            return None, _describe_init_error(lib, e)
        except OSError as e:  # a broken library file
            return None, f"the NVML library cannot be loaded: {e}"
        _initialised[id(lib)] = True
        return lib, ""


def _describe_init_error(lib: ModuleType, error: Exception) -> str:
    if isinstance(error, getattr(lib, "NVMLError_LibraryNotFound", ())):
        return "no NVIDIA driver library (libnvidia-ml.so) on this machine"
    if isinstance(error, getattr(lib, "NVMLError_DriverNotLoaded", ())):
        return "the NVIDIA driver is not loaded"
    if isinstance(error, getattr(lib, "NVMLError_NoPermission", ())):
        return "no permission to talk to the NVIDIA driver"
    return f"NVML could not be initialised: {error}"


def _mig_enabled(lib: ModuleType, handle: Any) -> bool:
    try:
        current, _pending = lib.nvmlDeviceGetMigMode(handle)
    except lib.NVMLError:
        return False  # not supported: not a MIG-capable GPU
    return bool(current == getattr(lib, "NVML_DEVICE_MIG_ENABLE", 1))


def _mig_instances(lib: ModuleType, parent: Any, parent_uuid: str) -> list[tuple[Any, str]]:
    out = []
    try:
        count = lib.nvmlDeviceGetMaxMigDeviceCount(parent)
    except lib.NVMLError:
        return out
    for i in range(count):
        try:
            handle = lib.nvmlDeviceGetMigDeviceHandleByIndex(parent, i)
        except lib.NVMLError:
            continue  # an empty slot
        out.append((handle, parent_uuid))
    return out


def inventory(lib: ModuleType | None = None) -> Inventory:
    """The devices NVML sees: whole GPUs, and the MIG instances of GPUs in MIG mode."""
    lib, reason = init(lib)
    if lib is None:
        return Inventory((), False, reason)
    simulated = bool(getattr(lib, "SIMULATED", False))
    try:
        driver = _decode(lib.nvmlSystemGetDriverVersion())
    except lib.NVMLError:
        driver = None
    devices: list[GpuDevice] = []
    try:
        count = lib.nvmlDeviceGetCount()
    except lib.NVMLError as e:
        return Inventory((), False, f"NVML cannot count the GPUs: {e}", driver, simulated)
    for index in range(count):
        try:
            handle = lib.nvmlDeviceGetHandleByIndex(index)
            uuid = _decode(lib.nvmlDeviceGetUUID(handle))
            mig = _mig_enabled(lib, handle)
            units = _mig_instances(lib, handle, uuid) if mig else [(handle, None)]
            for unit, parent in units:
                devices.append(
                    GpuDevice(
                        index=len(devices),
                        uuid=_decode(lib.nvmlDeviceGetUUID(unit)),
                        name=_decode(lib.nvmlDeviceGetName(unit)),
                        memory_total=int(lib.nvmlDeviceGetMemoryInfo(unit).total),
                        mig_enabled=mig,
                        parent_uuid=parent,
                        simulated=simulated,
                    )
                )
        except lib.NVMLError as e:
            log.warning("GPU %d cannot be read through NVML, leaving it out: %s", index, e)
    return Inventory(tuple(devices), True, "", driver, simulated)
