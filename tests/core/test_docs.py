"""The documentation says what the code does: every setting has help text and is documented."""

from __future__ import annotations

from pathlib import Path

from gpuhub import config_reference

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_has_help_text():
    for target in config_reference.CLASSES:
        cls = config_reference._load(target)
        assert cls is not None, f"{target} cannot be imported"
        for name, trait in config_reference.own_traits(cls).items():
            assert (trait.help or "").strip(), f"{cls.__name__}.{name} has no help text"


def test_configuration_reference_is_up_to_date():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    start = doc.index(config_reference.BEGIN)
    end = doc.index(config_reference.END) + len(config_reference.END)
    assert doc[start:end] == config_reference.reference(), (
        "docs/configuration.md is stale: run "
        "`.venv/bin/python -m gpuhub.config_reference --update docs/configuration.md`"
    )
