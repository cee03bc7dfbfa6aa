"""`LocalGPUSpawner`: single-user servers as local processes, GPUs pinned with CUDA_VISIBLE_DEVICES.

The embedded default, and the real thing for one multi-GPU workstation. GPUs are discovered with
NVML and leased exclusively through the store; the environment's kernel interpreter is registered
as the server's default kernel.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner, SimpleLocalProcessSpawner
from traitlets import Float, Unicode

from .. import nvml
from ..catalog import Catalog, Environment, devices_by_type
from ..options import Selection
from ..store import NoGpuFree
from .mixin import GPUSpawnerMixin
from .queueing import GPUQueueMixin

_inventory_cache: dict[str, Any] = {"at": 0.0, "value": None}


def local_inventory(max_age: float) -> nvml.Inventory:
    """The NVML inventory, cached for `max_age` seconds (GPUs rarely come and go)."""
    now = time.monotonic()
    if _inventory_cache["value"] is None or now - _inventory_cache["at"] > max_age:
        inventory = nvml.inventory()
        if not inventory.available and _inventory_cache["value"] is None:
            nvml.log.warning("gpuhub: no GPUs: %s; servers start CPU-only", inventory.reason)
        elif inventory.simulated and _inventory_cache["value"] is None:
            nvml.log.warning(
                "gpuhub: %d SIMULATED GPU(s) (fake NVML, %s)",
                len(inventory.devices),
                nvml.FAKE_ENV,
            )
        _inventory_cache.update(at=now, value=inventory)
    return _inventory_cache["value"]


def gpu_env(devices: list[str]) -> dict[str, str]:
    """The variables that pin a process to `devices` (none: no GPU visible at all)."""
    visible = ",".join(devices)
    return {
        "CUDA_VISIBLE_DEVICES": visible,
        "NVIDIA_VISIBLE_DEVICES": visible or "void",
        "GPUHUB_GPUS": visible,
    }


def write_kernelspec(root: Path, environment: Environment) -> Path:
    """A Jupyter data folder whose `python3` kernel runs the environment's interpreter.

    Put on JUPYTER_PATH, it makes that interpreter the server's default kernel.
    """
    folder = root / environment.id
    spec_dir = folder / "kernels" / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [environment.local.python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": environment.local.kernel_display_name or environment.display_name,
        "language": "python",
        "metadata": {"gpuhub": {"environment": environment.id}},
    }
    target = spec_dir / "kernel.json"
    text = json.dumps(spec, indent=1)
    if not target.exists() or target.read_text() != text:
        tmp = spec_dir / ".kernel.json.tmp"
        tmp.write_text(text)
        tmp.replace(target)
    return folder


class LocalGPUSpawner(GPUQueueMixin, GPUSpawnerMixin, LocalProcessSpawner):
    """LocalProcessSpawner with gpuhub's environments, GPU leases and quotas."""

    kernelspec_dir = Unicode(
        "gpuhub-kernels",
        config=True,
        help="""Folder where gpuhub writes one kernelspec per environment (relative to the hub's
        working directory). Each server finds its environment's kernel there through JUPYTER_PATH.
        """,
    )

    inventory_max_age = Float(
        30.0,
        config=True,
        help="Seconds an NVML device inventory is reused before NVML is asked again.",
    )

    def devices(self, catalog: Catalog) -> dict[str, list[str]]:
        inventory = local_inventory(self.inventory_max_age)
        names = {d.uuid: d.name for d in inventory.devices}
        return devices_by_type(catalog.gpu_types, names)

    def gpus_simulated(self) -> bool:
        return local_inventory(self.inventory_max_age).simulated

    def gpu_capacity(self, catalog: Catalog) -> dict[str, tuple[int, int]]:
        leased = {lease.device for lease in self.store.leases()}
        return {
            type_id: (len(devices), sum(1 for d in devices if d not in leased))
            for type_id, devices in self.devices(catalog).items()
        }

    async def apply_selection(self, selection: Selection, catalog: Catalog) -> None:
        devices: list[str] = []
        if selection.gpus:
            assert selection.gpu_type is not None
            gpu_type = selection.gpu_type

            def take() -> list[str] | None:
                candidates = self.devices(catalog).get(gpu_type, [])
                try:
                    return self.store.lease_devices(
                        self.user.name,
                        self.name,
                        gpu_type,
                        candidates,
                        selection.gpus,
                        max_user_gpus=self.gpu_limit(),
                    )
                except NoGpuFree:
                    return None

            # No GPU free: wait in the fair queue (the spawn page shows the place in line).
            devices = await self.wait_for_gpus(selection, catalog, take)
        environment = catalog.environment(selection.environment)
        assert environment is not None
        self._gpuhub_env = self._selection_env(selection, environment, devices)

    def _selection_env(
        self, selection: Selection, environment: Environment, devices: list[str]
    ) -> dict[str, str]:
        env = {
            **gpu_env(devices),
            "GPUHUB_INTERFACE": selection.interface,
            "GPUHUB_ENVIRONMENT": selection.environment,
            "GPUHUB_GPU_TYPE": selection.gpu_type or "",
            **environment.local.env,
        }
        if environment.local.python:
            python = Path(environment.local.python)
            folder = write_kernelspec(Path(self.kernelspec_dir).resolve(), environment)
            env["JUPYTER_PATH"] = str(folder)
            env["GPUHUB_KERNEL_PYTHON"] = str(python)
        if os.environ.get(nvml.FAKE_ENV):
            env[nvml.FAKE_ENV] = os.environ[nvml.FAKE_ENV]
        return env

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        extra = getattr(self, "_gpuhub_env", None)
        if extra is None:
            extra = gpu_env([])  # never let a server see every GPU by accident
        env.update(extra)
        return env


class SharedUserLocalGPUSpawner(LocalGPUSpawner, SimpleLocalProcessSpawner):
    """LocalGPUSpawner that runs every server as the hub's own system user, homes under
    `home_dir_template`. For the demo and tests only: users are not isolated from each other."""
