"""Markdown reference of every gpuhub setting, from the traitlets themselves (their `help=`).

`python -m gpuhub.config_reference` prints it; `python -m gpuhub.config_reference --update
docs/configuration.md` refreshes the document's generated section, and a test checks that the
document is up to date.
"""

from __future__ import annotations

import importlib
import inspect
import textwrap

from traitlets import HasTraits

#: The configurable classes whose own settings are documented ("module:Class").
CLASSES = [
    "gpuhub.settings:GpuhubConfig",
    "gpuhub.spawner.mixin:GPUSpawnerMixin",
    "gpuhub.spawner.queueing:GPUQueueMixin",
    "gpuhub.spawner.local:LocalGPUSpawner",
    "gpuhub.spawner.kube:GPUKubeSpawner",
    "gpuhub.server.app:GpuhubExtension",
    "gpuhub.service.app:GpuhubService",
    "gpuhub.service.learning:LearnedRelease",
    "gpuhub.service.web.config:GpuhubPages",
    "gpuhub.activity.prometheus:PrometheusActivitySource",
    "gpuhub.demo:DemoAuthenticator",
]

BEGIN = "<!-- BEGIN generated settings reference -->"
END = "<!-- END generated settings reference -->"


def _load(target: str) -> type[HasTraits] | None:
    module_name, name = target.split(":")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return None


def own_traits(cls: type[HasTraits]) -> dict:
    """The configurable traits `cls` itself defines (not those of its bases)."""
    traits = cls.class_traits(config=True)
    return {name: t for name, t in sorted(traits.items()) if name in vars(cls)}


def _default(trait) -> str:  # type: ignore[no-untyped-def]
    try:
        value = trait.default_value_repr()
    except Exception:
        value = "(computed)"
    return value if len(value) < 70 else value[:67] + "..."


def reference() -> str:
    out = [BEGIN, ""]
    for target in CLASSES:
        cls = _load(target)
        if cls is None:
            continue
        out.append(f"### `{cls.__name__}`")
        out.append("")
        doc = inspect.getdoc(cls) or ""
        if doc:
            out.append(doc.split("\n\n")[0])
            out.append("")
        for name, trait in own_traits(cls).items():
            help_text = textwrap.dedent(trait.help or "").strip()
            kind, default_value = type(trait).__name__, _default(trait)
            out.append(f"- **`c.{cls.__name__}.{name}`** ({kind}, default `{default_value}`)")
            for line in help_text.splitlines():
                out.append(f"  {line.strip()}" if line.strip() else "")
            out.append("")
    out.append(END)
    return "\n".join(out)


def update(path: str) -> bool:
    """Replace the generated section of the document at `path`; True when it changed."""
    from pathlib import Path

    doc = Path(path)
    text = doc.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + reference() + text[end:]
    doc.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update"]:
        print("updated" if update(sys.argv[2]) else "up to date")
    else:
        print(reference())
