"""Spawn options: the `user_options` contract, shared by the spawn form and the REST API.

Pure core. `parse` turns untrusted `user_options` into a frozen `Selection` or raises
`OptionsError` naming the field; `options_from_form` turns the spawn form's fields (lists of
strings) into the same `user_options`; `form_choices` says what the form offers to a user.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .catalog import Catalog, Environment, GpuType, Interface

OPTION_KEYS = ("interface", "environment", "gpus", "gpu_type", "when_no_gpu")
MAX_ID_LENGTH = 200
#: what a spawn asking for GPUs does when none is free: wait in the queue (the default), or
#: start at once without a GPU and keep its place, to be switched to the GPU at its turn
WAIT, START_ON_CPU = "wait", "start-on-cpu"
WHEN_NO_GPU = (WAIT, START_ON_CPU)


class OptionsError(ValueError):
    """A user option that cannot be accepted; `field` names it (HTTP 400)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class Selection:
    """What a user asked for, validated against the catalogue and their groups."""

    interface: str
    environment: str
    gpus: int
    gpu_type: str | None
    when_no_gpu: str = WAIT

    @property
    def starts_on_cpu(self) -> bool:
        """Whether the spawn starts without a GPU when none is free (and waits for one)."""
        return self.gpus > 0 and self.when_no_gpu == START_ON_CPU

    def as_user_options(self) -> dict[str, Any]:
        """The options as stored and shown; `when_no_gpu` only when it is not the default."""
        options: dict[str, Any] = {
            "interface": self.interface,
            "environment": self.environment,
            "gpus": self.gpus,
            "gpu_type": self.gpu_type,
        }
        if self.when_no_gpu != WAIT:
            options["when_no_gpu"] = self.when_no_gpu
        return options


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _id_option(options: Mapping[str, Any], key: str, default: str | None) -> str | None:
    if key not in options or options[key] is None:
        return default
    value = options[key]
    if not isinstance(value, str):
        raise OptionsError(key, f"must be a string, not {type(value).__name__} {_shown(value)}")
    if not value or len(value) > MAX_ID_LENGTH:
        raise OptionsError(key, f"{_shown(value)} is not a valid id")
    return value


def _gpu_count(options: Mapping[str, Any]) -> int:
    if "gpus" not in options or options["gpus"] is None:
        return 0
    value = options["gpus"]
    if isinstance(value, bool):
        raise OptionsError("gpus", f"must be a whole number of GPUs, not the boolean {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not text.isascii() or not text.isdigit() or len(text) > 6:
            raise OptionsError("gpus", f"must be a whole number >= 0, not {_shown(value)}")
        return int(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise OptionsError(
            "gpus", f"must be a whole number >= 0, not {type(value).__name__} {_shown(value)}"
        )
    if value < 0:
        raise OptionsError("gpus", f"must be >= 0, not {value}")
    return value


def _when_no_gpu(options: Mapping[str, Any]) -> str:
    if "when_no_gpu" not in options or options["when_no_gpu"] is None:
        return WAIT
    value = options["when_no_gpu"]
    if not isinstance(value, str):
        raise OptionsError(
            "when_no_gpu", f"must be a string, not {type(value).__name__} {_shown(value)}"
        )
    if value not in WHEN_NO_GPU:
        allowed = " or ".join(repr(w) for w in WHEN_NO_GPU)
        raise OptionsError("when_no_gpu", f"must be {allowed}, not {_shown(value)}")
    return value


def _default_environment(catalog: Catalog, groups: set[str]) -> str:
    allowed = [e.id for e in catalog.environments_for(groups)]
    if catalog.default_environment in allowed or not allowed:
        return catalog.default_environment
    return allowed[0]


def parse(
    user_options: Any,
    catalog: Catalog,
    groups: Iterable[str],
    capacity: Mapping[str, int] | None = None,
) -> Selection:
    """Validate `user_options` for a user in `groups`.

    `capacity` is the number of GPUs of each type the pool has in all (not only free ones): asking
    for more than exist can never be satisfied and is refused here. `None` skips that check.
    """
    if not isinstance(user_options, Mapping):
        raise OptionsError("user_options", f"must be an object, not {type(user_options).__name__}")
    unknown = sorted(str(k) for k in user_options if k not in OPTION_KEYS)
    if unknown:
        raise OptionsError(
            unknown[0], f"unknown option (allowed options: {', '.join(OPTION_KEYS)})"
        )
    groups = set(groups)

    interface_id = _id_option(user_options, "interface", None)
    environment_id = _id_option(user_options, "environment", _default_environment(catalog, groups))
    gpus = _gpu_count(user_options)
    gpu_type_id = _id_option(user_options, "gpu_type", None)
    when_no_gpu = _when_no_gpu(user_options)

    environment = catalog.environment(environment_id or "")
    if environment is None or not environment.enabled:
        raise OptionsError(
            "environment", f"no environment {_shown(environment_id)} in the catalogue"
        )
    if not environment.allowed_for(groups):
        raise OptionsError(
            "environment", f"environment {environment.id!r} is not available to your groups"
        )

    if interface_id is None:
        interface_id = (
            catalog.default_interface
            if catalog.default_interface in environment.interfaces
            else environment.interfaces[0]
        )
    if catalog.interface(interface_id) is None:
        raise OptionsError("interface", f"no interface {_shown(interface_id)}")
    if interface_id not in environment.interfaces:
        raise OptionsError(
            "interface", f"environment {environment.id!r} cannot be used from {interface_id!r}"
        )

    if gpu_type_id is None:
        gpu_type_id = catalog.default_gpu_type
        if gpu_type_id is None and gpus:
            raise OptionsError("gpus", "this hub has no GPU types configured")
    elif catalog.gpu_type(gpu_type_id) is None:
        raise OptionsError("gpu_type", f"no GPU type {_shown(gpu_type_id)} in the catalogue")
    gpu_type = catalog.gpu_type(gpu_type_id) if gpu_type_id else None

    if gpus:
        assert gpu_type is not None
        if not gpu_type.allowed_for(groups):
            raise OptionsError(
                "gpu_type", f"GPU type {gpu_type.id!r} is not available to your groups"
            )
        if gpus > gpu_type.max_per_server:
            raise OptionsError(
                "gpus",
                f"{gpus} GPUs asked, at most {gpu_type.max_per_server} of type "
                f"{gpu_type.id!r} per server",
            )
        if capacity is not None and gpus > capacity.get(gpu_type.id, 0):
            raise OptionsError(
                "gpus",
                f"{gpus} GPUs asked, the pool has {capacity.get(gpu_type.id, 0)} of type "
                f"{gpu_type.id!r} in all",
            )
    return Selection(
        interface_id,
        environment.id,
        gpus,
        gpu_type.id if gpu_type else None,
        when_no_gpu if gpus else WAIT,
    )


def options_from_form(form: Mapping[str, list[str]]) -> dict[str, Any]:
    """The spawn form's fields (each a list of strings) as `user_options` for `parse`.

    Only the first value of each field is kept; unknown fields are passed on so that `parse`
    refuses them by name. `gpus` stays a string: `parse` accepts numeric strings.
    """
    options: dict[str, Any] = {}
    for key, values in form.items():
        if key == "_xsrf":
            continue
        value = values[0] if isinstance(values, list | tuple) and values else values
        if isinstance(value, bytes):
            value = value.decode("utf8", "replace")
        options[key] = value
    if options.get("gpus") in ("", None):
        options["gpus"] = "0"
    if options.get("gpu_type") == "":
        options.pop("gpu_type")
    if options.get("when_no_gpu") == "":
        options.pop("when_no_gpu")
    return options


@dataclass(frozen=True)
class GpuChoice:
    gpu_type: GpuType
    total: int
    free: int
    counts: tuple[int, ...]


@dataclass(frozen=True)
class FormChoices:
    interfaces: tuple[Interface, ...]
    environments: tuple[Environment, ...]
    gpu_choices: tuple[GpuChoice, ...]
    selected: Selection


def form_choices(
    catalog: Catalog,
    groups: Iterable[str],
    capacity: Mapping[str, tuple[int, int]],
    previous: Mapping[str, Any] | None = None,
) -> FormChoices:
    """What the spawn form offers to a user in `groups`.

    `capacity` maps a GPU type id to `(total, free)`. `previous` (the last `user_options`)
    preselects the user's last choice where it is still valid.
    """
    groups = set(groups)
    environments = tuple(catalog.environments_for(groups))
    used_interfaces = {i for e in environments for i in e.interfaces}
    interfaces = tuple(i for i in catalog.interfaces if i.id in used_interfaces)
    gpu_choices = []
    for gpu_type in catalog.gpu_types_for(groups):
        total, free = capacity.get(gpu_type.id, (0, 0))
        most = min(gpu_type.max_per_server, total)
        gpu_choices.append(GpuChoice(gpu_type, total, free, tuple(range(1, most + 1))))
    try:
        selected = parse(previous or {}, catalog, groups)
    except OptionsError:
        selected = parse({}, catalog, groups) if environments else Selection("", "", 0, None)
    return FormChoices(interfaces, environments, tuple(gpu_choices), selected)
