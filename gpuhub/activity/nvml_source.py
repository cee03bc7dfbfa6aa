"""Trusted GPU readings on the local backend: the hub host's own NVML (`gpuhub.nvml`), read by the
service for the devices the store says each server leased. Users run their servers on this host
but cannot change what the driver reports for a GPU."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import ModuleType

from .. import nvml
from . import GpuSample, ServerKey, ServerTarget


class NvmlActivitySource:
    """Reads every leased device with one NVML poll per call."""

    def __init__(self, interval: float = 10.0, lib: ModuleType | None = None) -> None:
        self.interval = interval
        self.sampler = nvml.Sampler(lib=lib)
        self.reason = ""

    async def sample(self, targets: Sequence[ServerTarget]) -> dict[ServerKey, list[GpuSample]]:
        if not any(t.devices for t in targets):
            return {}
        poll = await asyncio.to_thread(self.sampler.poll, time.time(), self.interval)
        if not poll.available:
            self.reason = poll.reason
            return {}
        self.reason = ""
        by_device = {r.uuid: r for r in poll.readings}
        out: dict[ServerKey, list[GpuSample]] = {}
        for target in targets:
            samples = []
            for device in target.devices:
                r = by_device.get(device)
                if r is None or r.source == "error":
                    continue
                samples.append(
                    GpuSample(device, r.util, r.memory_used, r.t, memory_utilization=r.mem_util)
                )
            if samples:
                out[target.key] = samples
        return out

    def close(self) -> None:
        return
