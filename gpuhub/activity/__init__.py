"""GPU activity from sources a user cannot forge: the hub host's NVML (local backend) and NVIDIA
dcgm-exporter through Prometheus (Kubernetes).

A source returns raw readings (`GpuSample`) per server; the service turns them into idle/busy
`Activity` with the same rules as everywhere else (`gpuhub.core.idle`). No reading means "unknown",
never "idle".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

ServerKey = tuple[str, str]  # (user, server name)


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU (or MIG slice) that a server holds."""

    device: str  # GPU or MIG UUID where known, else a stable label of the device
    utilization: float | None  # percent, 0..100; None: the source has no reading
    memory_used: int | None  # bytes; None: unknown
    at: float  # Unix seconds of the reading
    #: memory-controller utilisation, percent 0..100; None where the source has no such reading
    #: (the GPU utilisation alone then decides idle or busy)
    memory_utilization: float | None = None


@dataclass(frozen=True)
class ServerTarget:
    """A server whose GPUs the service wants readings of."""

    user: str
    server: str
    gpus: int = 0
    devices: tuple[str, ...] = ()  # local backend: the leased GPU/MIG UUIDs
    namespace: str | None = None  # Kubernetes: where the server's pod runs
    pod: str | None = None
    #: Unix seconds the server (its current pod) started: readings taken earlier belong to an
    #: earlier run (a pod of the same name) and are not the server's. None: no such filter.
    since: float | None = None

    @property
    def key(self) -> ServerKey:
        return (self.user, self.server)


class ActivitySource(Protocol):
    """Where trusted GPU readings come from."""

    async def sample(self, targets: Sequence[ServerTarget]) -> dict[ServerKey, list[GpuSample]]:
        """The latest readings for each target's GPUs; a target without readings is left out
        (its activity is then unknown)."""
        ...

    def close(self) -> None: ...
