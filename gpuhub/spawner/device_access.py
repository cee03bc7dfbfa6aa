"""Who may open a GPU's device file (`/dev/nvidiaN`) on the local backend.

`CUDA_VISIBLE_DEVICES` is advice: a process that unsets it sees every GPU it can open. When servers
run as their users' own system accounts (`LocalGPUSpawner`), the device file of a leased GPU is
given to the lease holder (owner, mode 0600, or 0660 with `group`) and taken back when the lease
ends (owner root, the same mode): the other GPUs' files stay closed to them. The host must start
with every `/dev/nvidiaN` closed and the driver must not reopen them (docs/security.md).

Pure except `DeviceFiles.grant`/`close` (chown/chmod). Device files are never reached through a
link.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..nvml import GpuDevice


class DeviceAccessError(RuntimeError):
    """A device file that cannot be given or taken back (missing, a link, no rights)."""


def device_file_names(
    devices: Iterable[GpuDevice],
    mapping: Mapping[str, str],
    minors: Mapping[str, int],
) -> dict[str, str]:
    """UUID -> device file name for each whole GPU: `mapping` by UUID or by index (as text),
    else `nvidia<minor>` (NVML's minor number), else `nvidia<index>`. MIG instances have none
    here (their access goes through /dev/nvidia-caps: not handled, see docs/security.md)."""
    out: dict[str, str] = {}
    for device in devices:
        if device.is_mig_instance:
            continue
        name = mapping.get(device.uuid) or mapping.get(str(device.index))
        if not name:
            name = f"nvidia{minors.get(device.uuid, device.index)}"
        out[device.uuid] = name
    return out


@dataclass(frozen=True)
class DeviceFiles:
    """The device files under `directory`; `group`: a group id kept on them (None: root's)."""

    directory: Path
    group: int | None = None

    def path(self, name: str) -> Path:
        if not name or "/" in name or name in (".", ".."):
            raise DeviceAccessError(f"device_files: {name!r} is not a file name")
        return self.directory / name

    @property
    def mode(self) -> int:
        return 0o660 if self.group is not None else 0o600

    def grant(self, names: Iterable[str], uid: int) -> None:
        """Give the files to `uid` (only it, root and `group` may open them)."""
        for name in names:
            self._set(name, uid)

    def close(self, names: Iterable[str]) -> None:
        """Take the files back: owned by root, nobody else may open them (but `group`)."""
        for name in names:
            self._set(name, 0)

    def _set(self, name: str, uid: int) -> None:
        path = self.path(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise DeviceAccessError(f"no device file {path}") from None
        if not (stat.S_ISCHR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise DeviceAccessError(f"{path}: not a device file (a link or a folder): refused")
        gid = self.group if self.group is not None else 0
        try:
            os.chown(path, uid, gid, follow_symlinks=False)
            os.chmod(path, self.mode, follow_symlinks=False)
        except (OSError, NotImplementedError) as e:
            raise DeviceAccessError(f"{path}: cannot set its owner and mode ({e})") from None

    def holder(self, name: str) -> int | None:
        """The uid a file is given to (None: closed, owned by root)."""
        uid = os.lstat(self.path(name)).st_uid
        return uid or None
