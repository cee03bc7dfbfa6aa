"""The gpuhub Jupyter Server extension: GPU activity from NVML and kernel snapshots.

Enabled automatically when gpuhub is installed (`etc/jupyter/jupyter_server_config.d/
gpuhub.json`). Configure it as `c.GpuhubExtension.<setting>` in `jupyter_server_config.py`
(`jupyter server --help-all` lists every setting).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Int, Unicode, default

from ..core import idle
from ..core.snapshot import iso
from . import procs
from .handlers import handlers
from .monitor import GpuMonitor
from .reporter import Reporter
from .snapshots import KERNEL_ACTIONS, SnapshotManager, SnapshotSettings

ACTIVITY_KEY = "gpuhub"


def stop_on_interrupt(serverapp: Any) -> bool:
    """Have SIGINT stop `serverapp` cleanly, as SIGTERM does, unless it has a terminal (where
    Jupyter Server asks first). True when the handler was installed."""
    if sys.stdin is not None and sys.stdin.isatty():
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGINT, serverapp._signal_stop)
    return True


class GpuhubExtension(ExtensionApp):
    """GPU activity and kernel snapshots for a gpuhub single-user server."""

    name = "gpuhub"
    load_other_extensions = True

    # -- sampling -------------------------------------------------------------------------------

    sample_interval = Float(
        5.0,
        config=True,
        help="""Seconds between two NVML readings of the server's GPUs. Each reading averages
        NVML's own samples since the previous one, so bursts in between are not missed.""",
    )
    history_seconds = Float(
        4 * 3600.0,
        config=True,
        help="""Seconds of readings kept per GPU. `idle_since` cannot reach further back than
        this (at least `window_seconds`).""",
    )
    process_scan_interval = Float(
        15.0,
        config=True,
        help="""Seconds between two scans of /proc for processes holding the server's GPUs
        (kernels, terminals, scripts started from them).""",
    )
    device_file_pattern = Unicode(
        procs.DEFAULT_DEVICE_PATTERN,
        config=True,
        help="""Regular expression for a GPU's device file; its group is the GPU's minor
        number as NVML reports it.""",
    )

    # -- idle rule (gpuhub.core.idle.IdleRule; the defaults and their reasons are documented there)

    util_threshold = Float(
        idle.IdleRule.util_threshold,
        config=True,
        help="GPU utilisation percent at or below which a reading is idle.",
    )
    mem_util_threshold = Float(
        idle.IdleRule.mem_util_threshold,
        config=True,
        help="Memory-controller utilisation percent at or below which a reading is idle.",
    )
    min_busy_seconds = Float(
        idle.IdleRule.min_busy_s,
        config=True,
        help="Busy stretches shorter than this (seconds) do not end an idle period.",
    )
    window_seconds = Float(
        idle.IdleRule.window_s,
        config=True,
        help="Seconds over which the busy fraction is reported.",
    )
    max_gap_seconds = Float(
        idle.IdleRule.max_gap_s,
        config=True,
        help="A reading holds at most this long; past it the GPU's state is unknown.",
    )

    # -- activity -------------------------------------------------------------------------------

    report_activity = Bool(
        True,
        config=True,
        help="""Count a busy GPU as activity of this server (what JupyterHub sees as the
        server's last activity), so a long job keeps the server alive while nobody types.""",
    )
    external_processes_count_as_busy = Bool(
        True,
        config=True,
        help="""Count a process outside the kernels that holds one of the server's GPUs (a
        training script started from a terminal) as activity: its state cannot be
        snapshotted, so releasing the GPU would end it.""",
    )

    # -- snapshots ------------------------------------------------------------------------------

    snapshot_dir = Unicode(
        "~/.gpuhub/snapshots",
        config=True,
        help="Folder for kernel snapshots (on the persistent home); `~` is the user's home.",
    )
    snapshot_size_limit = Int(
        8 * 1024**3,
        config=True,
        help="""Bytes one kernel's snapshot may take; variables that do not fit are skipped
        and listed in the manifest. 0: no limit (the disk reserve still applies).""",
    )
    snapshot_disk_reserve = Int(
        256 * 1024**2,
        config=True,
        help="Bytes a snapshot always leaves free on the disk it writes to.",
    )
    snapshots_kept = Int(
        3,
        config=True,
        help="Snapshots kept per notebook; older ones are removed after a new one is saved.",
    )
    snapshot_timeout = Float(
        600.0,
        config=True,
        help="Seconds a snapshot of one kernel may take before the request gives up.",
    )
    restore_timeout = Float(
        600.0,
        config=True,
        help="Seconds a restore into one kernel may take before the request gives up.",
    )
    auto_restore = Bool(
        True,
        config=True,
        help="""When a notebook's kernel starts, restore the notebook's latest snapshot into it
        (once per snapshot, and only before any cell ran). `%gpuhub_restore` restores on
        demand either way.""",
    )

    # -- reporting to the gpuhub service (gpuhub.core.protocol) -----------------------------------

    service_url = Unicode(
        config=True,
        help="""The gpuhub service's URL prefix, where this server reports its status with its
        own JUPYTERHUB_API_TOKEN and picks up commands (snapshots before a release, notices).
        Default: $GPUHUB_SERVICE_URL, set by gpuhub's spawners. Empty: no reports (a server that
        does not report keeps its GPU only up to the maximum GPU lease).""",
    )

    @default("service_url")
    def _default_service_url(self) -> str:
        return os.environ.get("GPUHUB_SERVICE_URL", "")

    report_hold = Float(
        30.0,
        config=True,
        help="""Seconds the service may hold a report's answer open until a command comes. A
        change that matters for a release (a kernel starts executing) is reported at once.""",
    )

    report_retry_max = Float(
        60.0,
        config=True,
        help="""Seconds between two attempts at most while reports to the gpuhub service fail
        (the wait doubles from 1 s up to this; a change that matters is reported at once).""",
    )

    stop_on_interrupt = Bool(
        True,
        config=True,
        help="""On SIGINT (how JupyterHub's local spawner stops a server), stop as on SIGTERM:
        kernels shut down and extensions stopped, then the process exits. Without it a server
        run by `jupyterhub-singleuser` leaves its event loop at once, and its process lingers
        until it is killed (60 s later with JupyterHub's defaults). A server with a terminal
        keeps Jupyter Server's own handling (it asks for confirmation).""",
    )

    code_server_defaults = Bool(
        True,
        config=True,
        help="""At start, add to the user's VS Code (code-server) settings what they have not set
        themselves: the home folder trusted (no "Restricted Mode") and the environment's
        interpreter ($GPUHUB_KERNEL_PYTHON, else this server's) as the default Python.""",
    )

    def rule(self) -> idle.IdleRule:
        return idle.IdleRule(
            util_threshold=self.util_threshold,
            mem_util_threshold=self.mem_util_threshold,
            min_busy_s=self.min_busy_seconds,
            window_s=self.window_seconds,
            max_gap_s=self.max_gap_seconds,
        )

    def initialize_settings(self) -> None:
        self.monitor = GpuMonitor(
            self.rule(),
            interval=self.sample_interval,
            history_s=self.history_seconds,
            scan_interval=self.process_scan_interval,
            device_pattern=self.device_file_pattern,
        )
        self.snapshots = SnapshotManager(
            self.serverapp.kernel_manager,
            self.serverapp.session_manager,
            SnapshotSettings(
                root=self.snapshot_dir,
                limit_bytes=self.snapshot_size_limit or None,
                reserve_bytes=self.snapshot_disk_reserve,
                keep=self.snapshots_kept,
                timeout_s=self.snapshot_timeout,
                restore_timeout_s=self.restore_timeout,
                auto_restore=self.auto_restore,
            ),
        )
        self._sampler_task: asyncio.Task | None = None
        self._reporter_task: asyncio.Task | None = None
        self.reporter: Reporter | None = None
        self.settings["gpuhub_extension"] = self

    def _link_jupyter_server_extension(self, serverapp: Any) -> None:
        super()._link_jupyter_server_extension(serverapp)
        # before the terminals extension reads it (extensions are all linked, then loaded)
        from .terminals import shell_command

        settings = dict(serverapp.terminado_settings or {})
        command = shell_command(os.environ)
        if command is not None and "shell_command" not in settings:
            serverapp.terminado_settings = {**settings, "shell_command": command}

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if self.stop_on_interrupt:
            stop_on_interrupt(serverapp)
        if self.code_server_defaults:
            self._code_server_defaults()
        serverapp.event_logger.add_listener(
            schema_id=KERNEL_ACTIONS, listener=self.snapshots.on_kernel_event
        )
        self._sampler_task = asyncio.create_task(self._sample_forever())
        token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
        if self.service_url and token:
            self.reporter = Reporter(
                service_url=self.service_url,
                token=token,
                server_name=os.environ.get("JUPYTERHUB_SERVER_NAME", ""),
                status=self.status,
                snapshots=self.snapshots,
                contents_manager=serverapp.contents_manager,
                hold=self.report_hold,
                retry_max=self.report_retry_max,
            )
            self._reporter_task = asyncio.create_task(self.reporter.run_forever())
            self.log.info("gpuhub: reporting to the gpuhub service at %s", self.service_url)

    def _code_server_defaults(self) -> None:
        import sys
        from pathlib import Path

        from . import code_server
        from .terminals import shell_command

        python = os.environ.get("GPUHUB_KERNEL_PYTHON") or sys.executable
        wanted = code_server.defaults(python, shell_command(os.environ))
        try:
            path = code_server.settings_file(Path.home())
            if code_server.apply_defaults(path, wanted):
                self.log.info("gpuhub: VS Code defaults written to %s", path)
        except OSError as e:
            self.log.warning("gpuhub: no VS Code defaults: %s", e)

    async def stop_extension(self) -> None:
        for task in (self._sampler_task, self._reporter_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.reporter is not None:
            self.reporter.close()
        await self.snapshots.close()

    # -- sampling loop --------------------------------------------------------------------------

    def kernel_models(self) -> list[dict[str, Any]]:
        km = self.serverapp.kernel_manager
        out = []
        for model in km.list_kernels():
            kernel = km.get_kernel(model["id"])
            provisioner = getattr(kernel, "provisioner", None)
            pid = getattr(provisioner, "pid", None)
            out.append({**model, "pid": pid if isinstance(pid, int) else None})
        return out

    async def _sample_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.sample_once()
            except Exception:
                self.log.exception("gpuhub: GPU sampling failed")
            await asyncio.sleep(max(0.1, self.sample_interval - (time.monotonic() - started)))

    async def sample_once(self) -> None:
        await asyncio.to_thread(self.monitor.tick)
        kernels = self.kernel_models()
        status = await asyncio.to_thread(  # /proc reads: off the event loop
            self.monitor.status, time.time(), kernels, self.external_processes_count_as_busy
        )
        if self.reporter is not None:
            self.reporter.note_status({**status, "kernels": kernels})
        if not self.report_activity:
            return
        if status["busy"]:
            now = datetime.now(timezone.utc)
            self.monitor.last_gpu_activity = now.timestamp()
            self.serverapp.web_app.settings["last_activity_times"][ACTIVITY_KEY] = now

    # -- status ---------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        now = time.time()
        kernels = self.kernel_models()
        gpu = self.monitor.status(now, kernels, self.external_processes_count_as_busy)
        notebooks = await self.snapshots.notebooks()
        kernel_entries = []
        for k in kernels:
            kernel_entries.append(
                {
                    "id": k["id"],
                    "name": k.get("name"),
                    "execution_state": k.get("execution_state"),
                    "last_activity": k.get("last_activity"),
                    "connections": k.get("connections", 0),
                    "notebook": notebooks.get(k["id"]),
                    "python": self.snapshots.is_python(k["id"]),
                    "pid": k["pid"],
                    "gpus": gpu["kernel_gpus"].get(k["id"], []),
                    "last_restore": self.snapshots.restores.get(k["id"]),
                }
            )
        started = self.serverapp.web_app.settings.get("started")
        last = self.monitor.last_gpu_activity
        return {
            "version": 1,
            "now": iso(now),
            "started": iso(started.timestamp()) if started else None,
            "interface": os.environ.get("GPUHUB_INTERFACE") or None,
            "environment": os.environ.get("GPUHUB_ENVIRONMENT") or None,
            "gpu_type": os.environ.get("GPUHUB_GPU_TYPE") or None,
            "nvml": gpu["nvml"],
            "rule": gpu["rule"],
            "gpus": gpu["gpus"],
            "kernels": kernel_entries,
            "external_processes": gpu["external_processes"],
            "busy": gpu["busy"],
            "busy_reasons": gpu["busy_reasons"],
            "last_gpu_activity": iso(last) if last else None,
        }
