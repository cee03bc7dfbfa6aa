"""The environment first on PATH in JupyterLab's terminals.

gpuhub's spawners put the environment's bin folder first on the server's PATH
(`GPUHUB_ENVIRONMENT_BIN`). Jupyter Server starts terminals as login shells, and a login shell's
/etc/profile sets PATH anew, dropping it. So, unless the site configured its own
`ServerApp.terminado_settings.shell_command`, terminals start as a login shell that puts the
environment's bin folder back in front and then becomes the user's interactive shell (their
~/.bashrc or ~/.zshrc still run).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

ENV_BIN = "GPUHUB_ENVIRONMENT_BIN"


def shell_command(environ: Mapping[str, str]) -> list[str] | None:
    """The terminal command for this server's environment, or None to leave Jupyter's."""
    bin_dir = environ.get(ENV_BIN)
    if not bin_dir or os.name == "nt":
        return None
    shell = environ.get("SHELL") or shutil.which("bash") or shutil.which("sh") or "/bin/sh"
    return [
        shell,
        "-l",
        "-c",
        f'PATH="${{{ENV_BIN}}}:$PATH"; export PATH; exec "$0" -i',
        shell,
    ]
