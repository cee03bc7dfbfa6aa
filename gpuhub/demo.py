"""`gpuhub demo`: a real JupyterHub with gpuhub on this machine, for trying it out and for tests.

Settings come from the environment (see README): GPUHUB_DEMO_PORT, GPUHUB_DEMO_PASSWORD,
GPUHUB_DEMO_ADMIN_TOKEN, GPUHUB_DEMO_GPUS, GPUHUB_STATE_DIR. On a machine without an NVIDIA GPU
the demo simulates GPUs (through `gpuhub.nvml_fake`) and says so in the form, the logs and the
spawner state.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from jupyterhub.auth import Authenticator
from traitlets import Dict, Unicode, default

from . import nvml, nvml_fake, paths


def state_dir() -> Path:
    """Where the demo keeps its databases, homes and simulated GPUs."""
    default_dir = paths.config_dir().parent / ".demo"
    path = Path(os.environ.get("GPUHUB_STATE_DIR") or default_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_gpus(state: Path, simulated_count: int) -> str:
    """Use the real GPUs if NVML finds any; otherwise simulate `simulated_count` of them.

    Returns a line for the log saying which. Simulation sets GPUHUB_FAKE_NVML for the hub and,
    through the spawner, for every single-user server.
    """
    if os.environ.get(nvml.FAKE_ENV):
        return f"simulated GPUs from {os.environ[nvml.FAKE_ENV]}"
    real = nvml.inventory()
    if real.available and real.devices:
        names = ", ".join(sorted({d.name for d in real.devices}))
        return f"{len(real.devices)} real GPU(s): {names}"
    scenario = state / "simulated-gpus.json"
    if simulated_count <= 0:
        return f"no GPUs ({real.reason}); servers start CPU-only"
    current = None
    if scenario.exists():
        import json

        current = json.loads(scenario.read_text())
    if current is None or len(current.get("gpus", [])) != simulated_count:
        nvml_fake.write_scenario(scenario, nvml_fake.simulated_gpus(simulated_count))
    os.environ[nvml.FAKE_ENV] = str(scenario)
    return (
        f"{simulated_count} SIMULATED GPU(s) ({real.reason}); "
        f"make one busy with: gpuhub demo-gpu --gpu 0 --util 80"
    )


class DemoAuthenticator(Authenticator):
    """Any user name with the demo password. Names starting with `admin` are hub admins; groups
    come from name prefixes (`student-ada` is in `students`), so quotas can be tried out."""

    password = Unicode(
        config=True,
        help="""The password every demo user logs in with. Empty (the default): every login is
        refused (said in the log at start); never an empty password accepted.""",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.password:
            self.log.warning(
                "gpuhub: DemoAuthenticator has no password (GPUHUB_DEMO_PASSWORD is empty): "
                "every login is refused"
            )

    admin_prefix = Unicode("admin", config=True, help="User names with this prefix are admins.")

    group_prefixes = Dict(
        {"student": "students", "admin": "staff"},
        config=True,
        help="User name prefix -> the group such users are put in.",
    )

    default_group = Unicode(
        "researchers", config=True, help="Group of users whose name matches no prefix."
    )

    @default("allow_all")
    def _allow_all(self) -> bool:
        return True

    @default("manage_groups")
    def _manage_groups(self) -> bool:
        return True

    def groups_for(self, username: str) -> list[str]:
        for prefix, group in self.group_prefixes.items():
            if username.startswith(prefix):
                return [group]
        return [self.default_group]

    async def authenticate(self, handler, data):  # type: ignore[no-untyped-def]
        import hmac

        if not self.password:
            self.log.warning("gpuhub: login refused: the demo has no password set")
            return None  # an empty password would match an empty one: fail closed
        username = self.normalize_username(data.get("username", ""))
        if not username or not hmac.compare_digest(
            data.get("password", "").encode(), self.password.encode()
        ):
            return None
        return {
            "name": username,
            "admin": username.startswith(self.admin_prefix),
            "groups": self.groups_for(username),
        }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gpuhub demo",
        description="Start a real JupyterHub with gpuhub on http://127.0.0.1:$GPUHUB_DEMO_PORT.",
    )
    parser.add_argument(
        "jupyterhub_args", nargs="*", help="extra arguments passed on to jupyterhub"
    )
    args = parser.parse_args(argv)
    if not os.environ.get("GPUHUB_DEMO_PASSWORD"):
        password = secrets.token_urlsafe(9)
        os.environ["GPUHUB_DEMO_PASSWORD"] = password
        print(f"gpuhub demo: log in with any user name and the password: {password}", flush=True)
    config = paths.config_dir() / "jupyterhub_config.py"
    jupyterhub = Path(sys.executable).with_name("jupyterhub")
    command = [str(jupyterhub), "-f", str(config), *args.jupyterhub_args]
    os.chdir(state_dir())
    os.execv(command[0], command)
    return 0  # not reached
