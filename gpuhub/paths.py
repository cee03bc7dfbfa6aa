"""Where gpuhub's templates and default config files are: the source checkout, or the
`share/gpuhub` folder of an installed package (the way JupyterHub ships its own templates)."""

from __future__ import annotations

import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def _data_dir(name: str) -> Path:
    in_checkout = _CHECKOUT / name
    if in_checkout.is_dir() and (_CHECKOUT / "setup.cfg").exists():
        return in_checkout
    for prefix in (sys.prefix, sys.base_prefix, "/usr/local"):
        installed = Path(prefix) / "share" / "gpuhub" / name
        if installed.is_dir():
            return installed
    return in_checkout


def templates_dir() -> Path:
    return _data_dir("templates")


def config_dir() -> Path:
    return _data_dir("config")


def default_catalog_file() -> Path:
    return config_dir() / "catalog.yaml"
