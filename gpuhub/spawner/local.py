"""`LocalGPUSpawner`: single-user servers as local processes, GPUs pinned with CUDA_VISIBLE_DEVICES.

The embedded default, and the real thing for one multi-GPU workstation. GPUs are discovered with
NVML and leased exclusively through the store; the environment's kernel interpreter is registered
as the server's default kernel. Servers that run as their users' system accounts get the device
files of their leased GPUs, and only those (`device_access`, `gpuhub.spawner.device_access`).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
from pathlib import Path

from jupyterhub.spawner import LocalProcessSpawner, SimpleLocalProcessSpawner
from traitlets import Bool, Dict, Float, Unicode

from .. import nvml
from ..core.catalog import Catalog, Environment, devices_by_type
from ..core.options import Selection
from ..expiring import ExpiringCache
from ..store import GpuLease, NoGpuFree
from .device_access import DeviceAccessError, DeviceFiles, device_file_names
from .mixin import GPUSpawnerMixin, http_error
from .queueing import GPUQueueMixin
from .server_env import server_env

_inventory_cache: ExpiringCache[None, nvml.Inventory] = ExpiringCache(60)


def local_inventory(max_age: float) -> nvml.Inventory:
    """The NVML inventory, cached for `max_age` seconds (GPUs rarely come and go)."""

    def load() -> nvml.Inventory:
        inventory = nvml.inventory()
        first = not _inventory_cache.stored(None)
        if not inventory.available and first:
            nvml.log.warning("gpuhub: no GPUs: %s; servers start CPU-only", inventory.reason)
        elif inventory.simulated and first:
            nvml.log.warning(
                "gpuhub: %d SIMULATED GPU(s) (fake NVML, %s)",
                len(inventory.devices),
                nvml.FAKE_ENV,
            )
        return inventory

    return _inventory_cache.get_or_load(None, load, max_age=max_age)


def gpu_env(devices: list[str]) -> dict[str, str]:
    """The variables that pin a process to `devices` (none: no GPU visible at all); the server's
    GPUHUB_* variables come from `server_env`."""
    visible = ",".join(devices)
    return {
        "CUDA_VISIBLE_DEVICES": visible,
        "NVIDIA_VISIBLE_DEVICES": visible or "void",
    }


ENV_BIN = "GPUHUB_ENVIRONMENT_BIN"  # read by gpuhub.server.terminals too


def interpreter_env(python: Path) -> dict[str, str]:
    """What puts an environment's interpreter first for a server's terminals: its bin folder
    (`GPUHUB_ENVIRONMENT_BIN`, put first on PATH by `get_env`), and VIRTUAL_ENV (a venv) or
    CONDA_PREFIX (a conda environment). The path is kept as configured (a venv's python is a
    link to the base interpreter; resolving it would leave the venv)."""
    bin_dir = Path(os.path.abspath(python)).parent
    prefix = bin_dir.parent
    env = {ENV_BIN: str(bin_dir)}
    if (prefix / "pyvenv.cfg").is_file():
        env["VIRTUAL_ENV"] = str(prefix)
    elif (prefix / "conda-meta").is_dir():
        env["CONDA_PREFIX"] = str(prefix)
    return env


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

    device_access = Bool(
        True,
        config=True,
        help="""Give each server the device file of its leased GPUs (`/dev/nvidiaN`: owner the
        server's system user, mode 0600, or 0660 with `device_group`) and take it back when the
        lease ends (owner root). Needs the hub to run as root and the host to keep every GPU's
        device file closed otherwise (docs/security.md). Without it, CUDA_VISIBLE_DEVICES is
        only advice: a server can open any GPU the host lets it.""",
    )

    device_dir = Unicode(
        "/dev",
        config=True,
        help="Folder of the GPUs' device files (`device_access`).",
    )

    device_files = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        config=True,
        help="""GPU UUID or NVML index (as text) -> its device file's name in `device_dir`.
        Unlisted GPUs: `nvidia<minor>` with NVML's minor number, else `nvidia<index>`.""",
    )

    device_group = Unicode(
        "",
        config=True,
        help="""A group kept on the GPUs' device files (mode 0660), e.g. for a monitoring agent;
        users must not be in it. Empty: root only (mode 0600) besides the lease holder.""",
    )

    def device_file_table(self) -> DeviceFiles:
        gid = grp.getgrnam(self.device_group).gr_gid if self.device_group else None
        return DeviceFiles(Path(self.device_dir), gid)

    def device_names(self, uuids: list[str]) -> list[str]:
        """The device files of the GPUs `uuids` (`DeviceAccessError` for one without)."""
        inventory = local_inventory(self.inventory_max_age)
        names = device_file_names(inventory.devices, self.device_files, nvml.device_minors())
        missing = [u for u in uuids if u not in names]
        if missing:
            raise DeviceAccessError(
                f"no device file known for {', '.join(missing)} (a MIG instance?): "
                "device access cannot be given per lease"
            )
        return [names[u] for u in uuids]

    def grant_devices(self, uuids: list[str]) -> None:
        """Give the device files of `uuids` to the server's system user."""
        try:
            uid = pwd.getpwnam(self.user.name).pw_uid
        except KeyError:
            raise DeviceAccessError(f"no system user {self.user.name!r}") from None
        self.device_file_table().grant(self.device_names(uuids), uid)
        self.log.info("gpuhub: gave %s the device files of %s", self._log_name, ", ".join(uuids))

    def close_devices(self, leases: list[GpuLease]) -> None:
        """Take back the device files of ended leases (logged, never raised: a stop goes on)."""
        uuids = [lease.device for lease in leases if lease.device]
        if not self.device_access or not uuids:
            return
        try:
            self.device_file_table().close(self.device_names(uuids))
        except (DeviceAccessError, KeyError) as e:
            self.log.error("gpuhub: could not take back the device files of %s: %s", uuids, e)

    def leases_freed(self, leases: list[GpuLease]) -> None:
        super().leases_freed(leases)
        self.close_devices(leases)

    def free_leases(self) -> None:
        self.close_devices(self.store.leases_of(self.user.name, self.name))
        super().free_leases()

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
                        group=self.accounting_group(),
                    )
                except NoGpuFree:
                    return None

            # No GPU free: wait in the fair queue (the spawn page shows the place in line), or
            # start without one and keep the place (`when_no_gpu: start-on-cpu`).
            taken = await self.wait_for_gpus(selection, catalog, take)
            if taken is None:
                selection = self.selection or selection
            devices = taken or []
            if self.device_access and devices:
                try:
                    self.grant_devices(devices)
                except (DeviceAccessError, KeyError) as e:
                    self.log.error("gpuhub: %s: %s", self._log_name, e)
                    self.free_leases()
                    raise http_error(500, f"the GPU cannot be given to your server: {e}") from e
        environment = catalog.environment(selection.environment)
        assert environment is not None
        self._gpuhub_env = self._selection_env(selection, environment, devices)

    def _selection_env(
        self, selection: Selection, environment: Environment, devices: list[str]
    ) -> dict[str, str]:
        env = {
            **gpu_env(devices),
            **server_env(selection, devices),
            **environment.local.env,
        }
        if environment.local.python:
            python = Path(environment.local.python)
            folder = write_kernelspec(Path(self.kernelspec_dir).resolve(), environment)
            env["JUPYTER_PATH"] = str(folder)
            env["GPUHUB_KERNEL_PYTHON"] = str(python)
            env.update(interpreter_env(python))
        if os.environ.get(nvml.FAKE_ENV):
            env[nvml.FAKE_ENV] = os.environ[nvml.FAKE_ENV]
        return env

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        extra = getattr(self, "_gpuhub_env", None)
        if extra is None:
            # never let a server see every GPU by accident
            extra = {**gpu_env([]), "GPUHUB_GPUS": ""}
        env.update(extra)
        bin_dir = extra.get(ENV_BIN)
        if bin_dir:
            # terminals (JupyterLab's, VS Code's) and what they start find the environment first
            rest = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p and p != bin_dir]
            env["PATH"] = os.pathsep.join([bin_dir, *rest])
        return env


class SharedUserLocalGPUSpawner(LocalGPUSpawner, SimpleLocalProcessSpawner):
    """LocalGPUSpawner that runs every server as the hub's own system user, homes under
    `home_dir_template`. For the demo and tests only: users are not isolated from each other."""

    device_access = Bool(
        False,
        config=True,
        help="""Off: every server runs as the hub's own system user, so a device file given to
        one server is open to all of them (CUDA_VISIBLE_DEVICES is only advice here).""",
    )
