"""The layers stay layers (docs/architecture.md): imports point downwards only. The pure core
imports no I/O library and nothing of gpuhub outside the core; storage imports no adapter; the
adapters do not import each other (the service not the spawners, the server extension neither)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gpuhub"

CORE = {
    "gpuhub.activity",
    "gpuhub.activity.dcgm",
    "gpuhub.activity.tracker",
}
#: the pure core's package (catalogue, options, quotas, decisions, idle, learned, queue, snapshot,
#: overrides, registration, protocol) and the simulator built on it
CORE_PACKAGES = ("gpuhub.core", "gpuhub.sim")
STORAGE = {
    "gpuhub.store",
    "gpuhub.schema",
    "gpuhub.db_retry",
    "gpuhub.nvml",
    "gpuhub.nvml_fake",
    "gpuhub.snapshot_files",
    "gpuhub.catalog_cache",
}
ADAPTERS = ("gpuhub.spawner", "gpuhub.service", "gpuhub.server")
#: what the pure core may not import (I/O, frameworks, drivers)
IO_LIBRARIES = (
    "tornado",
    "sqlalchemy",
    "alembic",
    "kubernetes",
    "kubernetes_asyncio",
    "kubespawner",
    "pynvml",
    "jupyter_server",
    "jupyterhub",
    "requests",
    "psycopg",
    "prometheus_client",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports (relative imports resolved), at any depth of the file."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


MODULES = {
    module_name(p): p
    for p in sorted(PACKAGE.rglob("*.py"))
    if "migrations" not in p.parts and "__pycache__" not in p.parts
}


def under(name: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def is_core(name: str) -> bool:
    return name in CORE or under(name, CORE_PACKAGES)


def owner(name: str) -> str | None:
    """The gpuhub module an imported name belongs to (`gpuhub.core.idle.Activity` -> its module)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


def outside_the_core(name: str) -> bool:
    module = owner(name)
    return module is not None and module not in ("gpuhub", "gpuhub.paths") and not is_core(module)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if is_core(n)))
def test_the_core_is_pure(name):
    found = imports(MODULES[name])
    bad = sorted(i for i in found if under(i, IO_LIBRARIES) or outside_the_core(i))
    assert bad == [], f"{name} (core) imports {bad}"


@pytest.mark.parametrize("name", sorted(STORAGE))
def test_storage_imports_no_adapter(name):
    bad = sorted(i for i in imports(MODULES[name]) if under(i, ADAPTERS))
    assert bad == [], f"{name} (storage) imports {bad}"


@pytest.mark.parametrize(
    ("adapter", "others"),
    [
        ("gpuhub.service", ("gpuhub.spawner", "gpuhub.server")),
        ("gpuhub.server", ("gpuhub.spawner", "gpuhub.service")),
        ("gpuhub.spawner", ("gpuhub.service", "gpuhub.server")),
    ],
)
def test_adapters_do_not_import_each_other(adapter, others):
    bad = {
        name: sorted(i for i in imports(path) if under(i, others))
        for name, path in MODULES.items()
        if under(name, (adapter,))
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_rules_see_every_layer():
    """The lists above name real modules (a renamed module does not slip out of the rules)."""
    assert set(MODULES) >= CORE | STORAGE
    for package in CORE_PACKAGES:
        assert any(under(n, (package,)) for n in MODULES), package
    assert "gpuhub.core.quotas" in MODULES and "gpuhub.core.decide" in MODULES
