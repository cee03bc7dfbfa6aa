"""NVML: the one module that talks to the NVIDIA driver (through pynvml, from nvidia-ml-py).

Without the library or a driver, gpuhub sees no GPUs and says why (`Inventory.reason`); it never
crashes. When `GPUHUB_FAKE_NVML` names a scenario file, `gpuhub.nvml_fake` stands in for pynvml
(simulated GPUs for the demo and the tests), and every device says it is simulated.
"""

from __future__ import annotations

import contextlib
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
    inv, _handles = _enumerate(lib)
    return inv


def device_minors(lib: ModuleType | None = None) -> dict[str, int]:
    """UUID -> the minor number of its physical GPU (`/dev/nvidia<minor>`), where NVML says."""
    inv, handles = _enumerate(lib)
    if not inv.available:
        return {}
    lib = lib or load_library()
    minors: dict[str, int] = {}
    for device, (_handle, physical) in zip(inv.devices, handles, strict=True):
        with contextlib.suppress(lib.NVMLError, AttributeError):
            minors[device.uuid] = int(lib.nvmlDeviceGetMinorNumber(physical))
    return minors


def _enumerate(lib: ModuleType | None) -> tuple[Inventory, list[tuple[Any, Any]]]:
    """The inventory, and (NVML handle, handle of the physical GPU) for each of its devices."""
    lib, reason = init(lib)
    if lib is None:
        return Inventory((), False, reason), []
    simulated = bool(getattr(lib, "SIMULATED", False))
    try:
        driver = _decode(lib.nvmlSystemGetDriverVersion())
    except lib.NVMLError:
        driver = None
    devices: list[GpuDevice] = []
    handles: list[tuple[Any, Any]] = []
    try:
        count = lib.nvmlDeviceGetCount()
    except lib.NVMLError as e:
        return Inventory((), False, f"NVML cannot count the GPUs: {e}", driver, simulated), []
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
                handles.append((unit, handle))
        except lib.NVMLError as e:
            log.warning("GPU %d cannot be read through NVML, leaving it out: %s", index, e)
    return Inventory(tuple(devices), True, "", driver, simulated), handles


# -- sampling: utilisation, memory and compute processes of each device ---------------------------
#
# Utilisation comes from `nvmlDeviceGetSamples` (NVML's own buffer of readings, one every 1/6 s
# to 1 s depending on the GPU), averaged over the time since the previous poll, so a burst between
# two polls is not missed. Where samples are not supported, `nvmlDeviceGetUtilizationRates` (the
# last sample period only). Where neither is (MIG instances), utilisation is unknown: `None`,
# never 0, so nothing downstream can take it for idle.

UNAVAILABLE = "unavailable"

_PROCESS_FUNCTIONS = (
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
)
#: id(lib) -> the compute-process function that works with the installed driver
_process_function: dict[int, str] = {}


@dataclass(frozen=True)
class GpuProcess:
    """A process with a compute context on a device. `pid` is a host PID (NVML does not know
    PID namespaces); `used_memory` is None where the driver does not say (e.g. without rights)."""

    pid: int
    used_memory: int | None


@dataclass(frozen=True)
class Reading:
    """One poll of one device.

    `util` and `mem_util` are percentages averaged since the previous poll; None when NVML cannot
    tell (`source` says why: "unsupported" on MIG instances, "error" after a failed call).
    `processes` is None when the driver does not list processes for this device.
    """

    uuid: str
    t: float
    util: float | None
    mem_util: float | None
    memory_used: int | None
    memory_total: int | None
    processes: tuple[GpuProcess, ...] | None
    source: str  # "samples" | "rates" | "unsupported" | "error"
    error: str = ""


@dataclass(frozen=True)
class Poll:
    """One poll of every selected device; `available` False (with `reason`) without NVML."""

    t: float
    available: bool
    reason: str
    readings: tuple[Reading, ...]
    devices: tuple[GpuDevice, ...]
    driver_version: str | None = None
    simulated: bool = False
    minors: dict[str, int] | None = None  # uuid -> /dev/nvidiaN number of its physical GPU


def _sample_value(lib: ModuleType, value_type: int, sample: Any) -> float:
    value = sample.sampleValue
    field = {
        getattr(lib, "NVML_VALUE_TYPE_DOUBLE", 0): "dVal",
        getattr(lib, "NVML_VALUE_TYPE_UNSIGNED_INT", 1): "uiVal",
        getattr(lib, "NVML_VALUE_TYPE_UNSIGNED_LONG", 2): "ulVal",
        getattr(lib, "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", 3): "ullVal",
        getattr(lib, "NVML_VALUE_TYPE_SIGNED_LONG_LONG", 4): "sllVal",
        getattr(lib, "NVML_VALUE_TYPE_SIGNED_INT", 5): "siVal",
    }.get(value_type, "uiVal")
    return float(getattr(value, field))


def compute_processes(lib: ModuleType, handle: Any) -> tuple[GpuProcess, ...] | None:
    """Processes with a compute context on the device; None where the driver cannot list them.

    The struct behind `nvmlDeviceGetComputeRunningProcesses` changed across drivers (v1, v2,
    v3); like nvitop and gpustat, try the newest entry point and fall back when the driver lacks
    it (`NVMLError_FunctionNotFound`), remembering the one that works. A driver that has none of
    the versioned entry points gets the v1 struct through ctypes.
    """
    not_found = getattr(lib, "NVMLError_FunctionNotFound", ())
    cached = _process_function.get(id(lib))
    names = [n for n in (cached, *_PROCESS_FUNCTIONS) if n and n != "v1"]
    for name in names:
        function = getattr(lib, name, None)
        if function is None:
            continue
        try:
            raw = function(handle)
        except not_found:
            continue
        except getattr(lib, "NVMLLibraryMismatchError", ()):  # unversioned call, older driver
            continue
        except (lib.NVMLError_NotSupported, getattr(lib, "NVMLError_NoPermission", ())):
            return None
        _process_function[id(lib)] = name
        return tuple(_process(p) for p in raw)
    raw = _compute_processes_v1(lib, handle)
    if raw is None:
        return None
    _process_function[id(lib)] = "v1"
    return tuple(_process(p) for p in raw)


def _process(raw: Any) -> GpuProcess:
    used = getattr(raw, "usedGpuMemory", None)
    if used is not None and used >= 2**64 - 1:  # NVML_VALUE_NOT_AVAILABLE
        used = None
    return GpuProcess(pid=int(raw.pid), used_memory=None if used is None else int(used))


def _compute_processes_v1(lib: ModuleType, handle: Any) -> list[Any] | None:
    """The v1 call (drivers older than the _v2 entry point), with its own struct."""
    get_pointer = getattr(lib, "_nvmlGetFunctionPointer", None)
    if get_pointer is None:
        return None
    import ctypes

    class ProcessInfoV1(ctypes.Structure):
        _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]

    try:
        function = get_pointer("nvmlDeviceGetComputeRunningProcesses")
    except lib.NVMLError:
        return None
    count = ctypes.c_uint(0)
    ret = function(handle, ctypes.byref(count), None)
    if ret == lib.NVML_SUCCESS:
        return []
    if ret != lib.NVML_ERROR_INSUFFICIENT_SIZE:
        return None
    count.value = count.value * 2 + 5
    array = (ProcessInfoV1 * count.value)()
    if function(handle, ctypes.byref(count), array) != lib.NVML_SUCCESS:
        return None
    return [array[i] for i in range(count.value)]


class DeviceSampler:
    """Reads one device; keeps the timestamp of the last NVML sample it has seen."""

    def __init__(self, lib: ModuleType, device: GpuDevice, handle: Any) -> None:
        self.lib = lib
        self.device = device
        self.handle = handle
        self.samples_supported = True
        self.rates_supported = True
        self._last_seen_us: dict[int, int] = {}
        self._last_poll: float | None = None

    def _samples(self, kind: int, since: float) -> list[tuple[int, float]] | None:
        """(timestamp µs, value) of NVML samples newer than the last seen; [] when there is
        none yet, None when the device does not keep samples."""
        lib = self.lib
        last = self._last_seen_us.get(kind) or int(since * 1e6)
        try:
            value_type, raw = lib.nvmlDeviceGetSamples(self.handle, kind, last)
        except lib.NVMLError_NotFound:  # no sample since `last`
            return []
        except (lib.NVMLError_NotSupported, getattr(lib, "NVMLError_FunctionNotFound", ())):
            return None
        out = [(int(s.timeStamp), _sample_value(lib, value_type, s)) for s in raw]
        out = [(ts, v) for ts, v in out if ts > last]
        if out:
            self._last_seen_us[kind] = max(ts for ts, _ in out)
        return out

    def _utilisation(self, now: float, interval: float) -> tuple[float | None, float | None, str]:
        lib = self.lib
        since = self._last_poll if self._last_poll is not None else now - interval
        if self.samples_supported:
            gpu = self._samples(getattr(lib, "NVML_GPU_UTILIZATION_SAMPLES", 1), since)
            if gpu is None:
                self.samples_supported = False
            else:
                mem = self._samples(getattr(lib, "NVML_MEMORY_UTILIZATION_SAMPLES", 2), since)
                if gpu and mem:
                    return (
                        sum(v for _, v in gpu) / len(gpu),
                        sum(v for _, v in mem) / len(mem),
                        "samples",
                    )
                # no new sample in one of the buffers: the rates hold the latest period
        if self.rates_supported:
            try:
                rates = lib.nvmlDeviceGetUtilizationRates(self.handle)
            except lib.NVMLError_NotSupported:
                self.rates_supported = False
            else:
                return float(rates.gpu), float(rates.memory), "rates"
        return None, None, "unsupported"

    def read(self, now: float, interval: float) -> Reading:
        lib = self.lib
        try:
            util, mem_util, source = self._utilisation(now, interval)
            try:
                memory = lib.nvmlDeviceGetMemoryInfo(self.handle)
                used, total = int(memory.used), int(memory.total)
            except lib.NVMLError_NotSupported:
                used, total = None, self.device.memory_total
            processes = compute_processes(lib, self.handle)
        except lib.NVMLError as e:
            return Reading(self.device.uuid, now, None, None, None, None, None, "error", str(e))
        finally:
            self._last_poll = now
        return Reading(self.device.uuid, now, util, mem_util, used, total, processes, source)


class Sampler:
    """Polls the devices whose UUIDs pass `select` (all when None).

    Not thread-safe: one owner calls `poll`. Without NVML every poll says why (`Poll.reason`) and
    tries again at most every `retry_s` seconds, so a driver loaded later is picked up.
    """

    def __init__(
        self,
        select: Any = None,
        lib: ModuleType | None = None,
        retry_s: float = 60.0,
    ) -> None:
        self.select = select
        self._lib_override = lib
        self.retry_s = retry_s
        self._devices: list[DeviceSampler] | None = None
        self._inventory: Inventory | None = None
        self._minors: dict[str, int] = {}
        self._failed_at: float | None = None
        self._reason = ""

    def _open(self, now: float) -> bool:
        if self._devices is not None:
            return True
        if self._failed_at is not None and now - self._failed_at < self.retry_s:
            return False
        try:
            lib = self._lib_override or load_library()
        except ImportError as e:
            self._failed_at, self._reason = now, f"nvidia-ml-py is not installed ({e})"
            return False
        inv, handles = _enumerate(lib)
        if not inv.available:
            self._failed_at, self._reason = now, inv.reason
            self._inventory = inv
            return False
        samplers = []
        minors: dict[str, int] = {}
        for device, (handle, physical) in zip(inv.devices, handles, strict=True):
            if self.select is not None and not self.select(device):
                continue
            samplers.append(DeviceSampler(lib, device, handle))
            with contextlib.suppress(lib.NVMLError, AttributeError):
                minors[device.uuid] = int(lib.nvmlDeviceGetMinorNumber(physical))
        self._devices, self._inventory, self._minors = samplers, inv, minors
        self._failed_at, self._reason = None, ""
        return True

    def poll(self, now: float, interval: float) -> Poll:
        """Read every selected device at `now` (unix seconds); `interval` is the polling period
        (how far back the first poll looks in NVML's sample buffer)."""
        if not self._open(now):
            inv = self._inventory
            return Poll(
                now,
                False,
                self._reason,
                (),
                (),
                inv.driver_version if inv else None,
                inv.simulated if inv else False,
            )
        assert self._devices is not None and self._inventory is not None
        devices = tuple(d.device for d in self._devices)
        readings = tuple(d.read(now, interval) for d in self._devices)
        inv, minors = self._inventory, dict(self._minors)
        if any(r.source == "error" for r in readings):
            self._devices = None  # enumerate again next time (a GPU fell off the bus, a reset)
        return Poll(now, True, "", readings, devices, inv.driver_version, inv.simulated, minors)
