"""The `gpuhub` command: one subcommand per job, each implemented in its own module."""

from __future__ import annotations

import importlib
import sys

#: subcommand -> ("module:function", one-line help); each function takes the remaining argv.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("gpuhub.demo:main", "start a real JupyterHub on this machine with gpuhub"),
    "demo-gpu": ("gpuhub.demo_gpu:main", "make a simulated demo GPU busy or idle"),
    "simulate": ("gpuhub.sim.cli:main", "compare GPU policies on a notebook workload trace"),
    "users": ("gpuhub.service.web.registration:main", "register users and groups from a CSV file"),
    "service": ("gpuhub.service.app:main", "run the gpuhub hub service (python -m gpuhub.service)"),
    "db": ("gpuhub.db_cli:main", "the store's schema: `db current`, `db upgrade`, `db revision`"),
}


def usage() -> str:
    lines = ["usage: gpuhub COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_t, help_) in COMMANDS.items()]
    lines += ["", "`gpuhub COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gpuhub: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    target, _help = COMMANDS[name]
    module_name, function = target.split(":")
    result = getattr(importlib.import_module(module_name), function)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
