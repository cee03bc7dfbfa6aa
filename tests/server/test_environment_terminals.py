"""The environment in terminals and VS Code's defaults, unit by unit (the browser test in
tests/e2e/test_terminals.py runs them for real)."""

from __future__ import annotations

import json
import subprocess

from gpuhub.server import code_server, terminals
from gpuhub.spawner.local import ENV_BIN, interpreter_env


def test_interpreter_env_names_a_venv_or_a_conda_environment(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    assert interpreter_env(venv / "bin" / "python") == {
        ENV_BIN: str(venv / "bin"),
        "VIRTUAL_ENV": str(venv),
    }
    conda = tmp_path / "conda"
    (conda / "bin").mkdir(parents=True)
    (conda / "conda-meta").mkdir()
    assert interpreter_env(conda / "bin" / "python")["CONDA_PREFIX"] == str(conda)


def test_the_terminal_puts_the_environment_back_after_the_login_profile(tmp_path):
    assert terminals.shell_command({}) is None
    bin_dir = tmp_path / "env" / "bin"
    bin_dir.mkdir(parents=True)
    tool = bin_dir / "gpuhub-probe"
    tool.write_text("#!/bin/sh\necho from-the-environment\n")
    tool.chmod(0o755)
    command = terminals.shell_command({ENV_BIN: str(bin_dir), "SHELL": "/bin/bash"})
    assert command is not None and command[:3] == ["/bin/bash", "-l", "-c"]
    # the login shell (whose /etc/profile sets PATH anew) ends in an interactive shell that
    # finds the environment's programs first
    done = subprocess.run(
        command,
        input="gpuhub-probe\nexit\n",
        capture_output=True,
        text=True,
        env={ENV_BIN: str(bin_dir), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=30,
    )
    assert "from-the-environment" in done.stdout, done.stderr


def test_code_server_defaults_never_override_the_users_choice(tmp_path):
    path = code_server.settings_file(tmp_path)
    wanted = code_server.defaults("/envs/pytorch/bin/python", ["/bin/bash", "-l"])
    assert code_server.apply_defaults(path, wanted)
    data = json.loads(path.read_text())
    assert data["security.workspace.trust.enabled"] is False
    assert data["python.defaultInterpreterPath"] == "/envs/pytorch/bin/python"
    assert data["terminal.integrated.defaultProfile.linux"] == code_server.PROFILE
    # the user's own choice stays, and a second start changes nothing
    data["python.defaultInterpreterPath"] = "/home/me/mine/bin/python"
    path.write_text(json.dumps(data))
    assert not code_server.apply_defaults(path, wanted)
    assert (
        json.loads(path.read_text())["python.defaultInterpreterPath"] == "/home/me/mine/bin/python"
    )
    # a settings file with comments (JSONC) is left as it is
    path.write_text('{\n  // mine\n  "editor.fontSize": 15\n}\n')
    assert not code_server.apply_defaults(path, wanted)
    assert "// mine" in path.read_text()
