"""The environment catalogue: what users may start, and who may start it.

Pure core: plain frozen dataclasses and one loader from YAML or from a mapping. A catalogue that
cannot be used raises `CatalogError` naming the source, the field and what is wrong, so a hub with a
bad catalogue fails at start with a message an admin can act on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

ID_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")

#: The interfaces gpuhub knows how to open, with the URL the server opens at.
KNOWN_INTERFACES: dict[str, tuple[str, str]] = {
    "jupyterlab": ("JupyterLab", "/lab"),
    "vscode": ("VS Code", "/vscode/"),
}

GPU_SHARING_KINDS = ("dedicated", "shared", "mig")


class CatalogError(ValueError):
    """The catalogue cannot be used: `source` (file), `field` (dotted path) and what is wrong."""

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        super().__init__(f"{source}: {field}: {problem}")


@dataclass(frozen=True)
class Interface:
    id: str
    display_name: str
    default_url: str


@dataclass(frozen=True)
class LocalRuntime:
    """How the local backend runs an environment: the Python interpreter of its kernels."""

    python: str | None = None
    kernel_display_name: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Environment:
    id: str
    display_name: str
    description: str = ""
    image: str | None = None
    local: LocalRuntime = field(default_factory=LocalRuntime)
    interfaces: tuple[str, ...] = tuple(KNOWN_INTERFACES)
    groups: frozenset[str] = frozenset()
    enabled: bool = True

    def allowed_for(self, groups: Iterable[str]) -> bool:
        return self.enabled and (not self.groups or bool(self.groups & set(groups)))


@dataclass(frozen=True)
class GpuType:
    id: str
    display_name: str
    resource: str = "nvidia.com/gpu"
    sharing: str = "dedicated"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    max_per_server: int = 1
    groups: frozenset[str] = frozenset()
    #: Local backend: which NVML devices are of this type (substring of the device name; MIG
    #: devices match on their profile name). Empty: every device not claimed by another type.
    local_match: str = ""

    def allowed_for(self, groups: Iterable[str]) -> bool:
        return not self.groups or bool(self.groups & set(groups))


@dataclass(frozen=True)
class Catalog:
    environments: tuple[Environment, ...]
    interfaces: tuple[Interface, ...]
    gpu_types: tuple[GpuType, ...]
    default_interface: str
    default_environment: str
    default_gpu_type: str | None
    source: str = "<catalog>"
    #: Environments admins added at runtime (`core.overrides.merge_environments`); every other
    #: environment comes from the catalogue file.
    runtime_ids: frozenset[str] = frozenset()

    def file_environments(self) -> list[Environment]:
        return [e for e in self.environments if e.id not in self.runtime_ids]

    def file_interpreters(self) -> list[str]:
        """The kernel interpreters the catalogue file names (`local.python`)."""
        return sorted({e.local.python for e in self.file_environments() if e.local.python})

    def environment(self, env_id: str) -> Environment | None:
        return next((e for e in self.environments if e.id == env_id), None)

    def interface(self, interface_id: str) -> Interface | None:
        return next((i for i in self.interfaces if i.id == interface_id), None)

    def gpu_type(self, type_id: str) -> GpuType | None:
        return next((g for g in self.gpu_types if g.id == type_id), None)

    def environments_for(self, groups: Iterable[str]) -> list[Environment]:
        groups = set(groups)
        return [e for e in self.environments if e.allowed_for(groups)]

    def gpu_types_for(self, groups: Iterable[str]) -> list[GpuType]:
        groups = set(groups)
        return [g for g in self.gpu_types if g.allowed_for(groups)]


def devices_by_type(
    gpu_types: Iterable[GpuType], device_names: Mapping[str, str]
) -> dict[str, list[str]]:
    """Sort local devices (id -> NVML name) into GPU types by `local_match`.

    A device goes to the first type whose `local_match` is part of its name; a device no type
    matches goes to the first type without a `local_match`, or nowhere.
    """
    gpu_types = list(gpu_types)
    catch_all = next((g.id for g in gpu_types if not g.local_match), None)
    out: dict[str, list[str]] = {g.id: [] for g in gpu_types}
    for device, name in device_names.items():
        match = next((g.id for g in gpu_types if g.local_match and g.local_match in name), None)
        target = match or catch_all
        if target is not None:
            out[target].append(device)
    return out


# -- loading -----------------------------------------------------------------------------------


class _Reader:
    """Reads one mapping of the catalogue, reporting errors with the dotted field path."""

    def __init__(self, source: str, path: str, data: Any) -> None:
        self.source = source
        self.path = path
        if not isinstance(data, Mapping):
            self.fail(path, f"must be a mapping, not {_type_name(data)}")
        self.data: Mapping[str, Any] = data

    def fail(self, field: str, problem: str) -> None:
        raise CatalogError(self.source, field, problem)

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def check_keys(self, allowed: Iterable[str]) -> None:
        unknown = sorted(set(map(str, self.data)) - set(allowed))
        if unknown:
            self.fail(self.field(unknown[0]), f"unknown field (allowed: {', '.join(allowed)})")

    def str(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        if key not in self.data or self.data[key] is None:
            if required:
                self.fail(self.field(key), "is required")
            return default
        value = self.data[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(self.field(key), f"must be a non-empty string, not {value!r}")
        return value

    def id(self, key: str = "id") -> str:
        value = self.str(key, required=True)
        assert value is not None
        if not ID_PATTERN.match(value):
            self.fail(
                self.field(key),
                f"{value!r} is not a valid id (lower-case letters, digits, '.', '_', '-')",
            )
        return value

    def int(self, key: str, default: int, *, minimum: int = 0) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(self.field(key), f"must be an integer >= {minimum}, not {value!r}")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(self.field(key), f"must be true or false, not {value!r}")
        return value

    def str_list(self, key: str) -> tuple[str, ...] | None:
        if key not in self.data or self.data[key] is None:
            return None
        value = self.data[key]
        if isinstance(value, str) or not isinstance(value, list):
            self.fail(self.field(key), f"must be a list of strings, not {_type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.fail(f"{self.field(key)}[{i}]", f"must be a non-empty string, not {item!r}")
        return tuple(value)

    def str_map(self, key: str) -> dict[str, str]:
        value = self.data.get(key) or {}
        if not isinstance(value, Mapping):
            self.fail(self.field(key), f"must be a mapping, not {_type_name(value)}")
        for k, v in value.items():
            if (
                not isinstance(k, str)
                or not isinstance(v, str | int | float)
                or isinstance(v, bool)
            ):
                self.fail(f"{self.field(key)}.{k}", f"must map strings to strings, not {v!r}")
        return {k: str(v) for k, v in value.items()}

    def child(self, key: str) -> _Reader:
        return _Reader(self.source, self.field(key), self.data.get(key) or {})

    def items(self, key: str) -> list[_Reader]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(self.field(key), f"must be a list, not {_type_name(value)}")
        return [_Reader(self.source, f"{self.field(key)}[{i}]", v) for i, v in enumerate(value)]


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _unique(readers: list[_Reader], ids: list[str], what: str) -> None:
    seen: set[str] = set()
    for reader, ident in zip(readers, ids, strict=True):
        if ident in seen:
            reader.fail(reader.field("id"), f"duplicate {what} id {ident!r}")
        seen.add(ident)


def _read_interface(r: _Reader) -> Interface:
    r.check_keys(["id", "display_name", "default_url"])
    ident = r.id()
    if ident not in KNOWN_INTERFACES:
        r.fail(r.field("id"), f"unknown interface {ident!r} (known: {', '.join(KNOWN_INTERFACES)})")
    name, url = KNOWN_INTERFACES[ident]
    return Interface(ident, r.str("display_name", name) or name, r.str("default_url", url) or url)


def read_environment(r: _Reader, interface_ids: Iterable[str]) -> Environment:
    r.check_keys(
        ["id", "display_name", "description", "image", "local", "interfaces", "groups", "enabled"]
    )
    ident = r.id()
    local = r.child("local")
    local.check_keys(["python", "kernel_display_name", "env"])
    interfaces = r.str_list("interfaces")
    interface_ids = list(interface_ids)
    if interfaces is not None:
        if not interfaces:
            r.fail(r.field("interfaces"), "must name at least one interface")
        for i, name in enumerate(interfaces):
            if name not in interface_ids:
                r.fail(
                    f"{r.field('interfaces')}[{i}]",
                    f"unknown interface {name!r} (known: {', '.join(interface_ids)})",
                )
    return Environment(
        id=ident,
        display_name=r.str("display_name", ident) or ident,
        description=r.str("description", "") or "",
        image=r.str("image"),
        local=LocalRuntime(
            python=local.str("python"),
            kernel_display_name=local.str("kernel_display_name"),
            env=local.str_map("env"),
        ),
        interfaces=tuple(interfaces) if interfaces is not None else tuple(interface_ids),
        groups=frozenset(r.str_list("groups") or ()),
        enabled=r.bool("enabled", True),
    )


def environment_from_dict(
    data: Any, interface_ids: Iterable[str], source: str = "<environment>", path: str = ""
) -> Environment:
    """One environment from plain data in the shape of a catalogue file's `environments` entry;
    `CatalogError` names `source` and the field (under `path`) otherwise."""
    return read_environment(_Reader(source, path, data), interface_ids)


def _read_gpu_type(r: _Reader) -> GpuType:
    r.check_keys(
        [
            "id",
            "display_name",
            "resource",
            "sharing",
            "node_selector",
            "tolerations",
            "max_per_server",
            "groups",
            "local_match",
        ]
    )
    ident = r.id()
    resource = r.str("resource", "nvidia.com/gpu") or "nvidia.com/gpu"
    if not re.match(r"^[a-z0-9.-]+/[A-Za-z0-9._-]+$", resource):
        r.fail(r.field("resource"), f"{resource!r} is not an extended resource name")
    sharing = r.str("sharing", "dedicated") or "dedicated"
    if sharing not in GPU_SHARING_KINDS:
        r.fail(
            r.field("sharing"), f"must be one of {', '.join(GPU_SHARING_KINDS)}, not {sharing!r}"
        )
    tolerations = r.items("tolerations")
    for t in tolerations:
        t.check_keys(["key", "operator", "value", "effect", "tolerationSeconds"])
    return GpuType(
        id=ident,
        display_name=r.str("display_name", ident) or ident,
        resource=resource,
        sharing=sharing,
        node_selector=r.str_map("node_selector"),
        tolerations=tuple(dict(t.data) for t in tolerations),
        max_per_server=r.int("max_per_server", 1, minimum=1),
        groups=frozenset(r.str_list("groups") or ()),
        local_match=r.str("local_match", "") or "",
    )


def catalog_from_dict(data: Any, source: str = "<catalog>") -> Catalog:
    """Build a `Catalog` from plain data (parsed YAML or traitlets config)."""
    root = _Reader(source, "", data)
    root.check_keys(["interfaces", "environments", "gpu_types", "defaults"])

    interface_readers = root.items("interfaces")
    if interface_readers:
        interfaces = [_read_interface(r) for r in interface_readers]
        _unique(interface_readers, [i.id for i in interfaces], "interface")
    else:
        interfaces = [Interface(k, n, u) for k, (n, u) in KNOWN_INTERFACES.items()]
    interface_ids = [i.id for i in interfaces]

    env_readers = root.items("environments")
    if not env_readers:
        root.fail("environments", "must list at least one environment")
    environments = [read_environment(r, interface_ids) for r in env_readers]
    _unique(env_readers, [e.id for e in environments], "environment")

    gpu_readers = root.items("gpu_types")
    gpu_types = [_read_gpu_type(r) for r in gpu_readers]
    _unique(gpu_readers, [g.id for g in gpu_types], "GPU type")

    defaults = root.child("defaults")
    defaults.check_keys(["interface", "environment", "gpu_type"])
    default_interface = defaults.str("interface", interface_ids[0]) or interface_ids[0]
    if default_interface not in interface_ids:
        defaults.fail("defaults.interface", f"unknown interface {default_interface!r}")
    default_environment = defaults.str("environment", environments[0].id) or environments[0].id
    if default_environment not in [e.id for e in environments]:
        defaults.fail("defaults.environment", f"unknown environment {default_environment!r}")
    default_gpu_type = defaults.str("gpu_type", gpu_types[0].id if gpu_types else None)
    if default_gpu_type is not None and default_gpu_type not in [g.id for g in gpu_types]:
        defaults.fail("defaults.gpu_type", f"unknown GPU type {default_gpu_type!r}")

    return Catalog(
        environments=tuple(environments),
        interfaces=tuple(interfaces),
        gpu_types=tuple(gpu_types),
        default_interface=default_interface,
        default_environment=default_environment,
        default_gpu_type=default_gpu_type,
        source=source,
    )


def load_catalog(path: str | Path) -> Catalog:
    """Load a catalogue YAML file.

    Relative `local.python` paths resolve against the file's folder.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise CatalogError(source, "(file)", f"cannot be read: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise CatalogError(source, where, f"is not valid YAML: {getattr(e, 'problem', e)}") from e
    catalog = catalog_from_dict(data, source)
    return _resolve_local_paths(catalog, path.parent)


def _resolve_local_paths(catalog: Catalog, base: Path) -> Catalog:
    envs = []
    for env in catalog.environments:
        python = env.local.python
        if python and not Path(python).is_absolute() and "/" in python:
            # normpath, not resolve(): a virtual environment's python is a symlink to the base
            # interpreter, and only the link path runs with the environment's packages.
            python = os.path.normpath(os.path.join(os.path.abspath(base), python))
        envs.append(replace(env, local=replace(env.local, python=python)))
    return replace(catalog, environments=tuple(envs))
