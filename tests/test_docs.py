"""The README's API overview stays true to the code: the constructor's signature and the
exported names it lists are the ones the package has."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import mqtt_persist
from mqtt_persist import PersistentClient

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _signature_text() -> str:
    parts: list[str] = []
    keyword_only = False
    for name, parameter in inspect.signature(PersistentClient.__init__).parameters.items():
        if name == "self":
            continue
        if parameter.kind is parameter.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        if parameter.default is parameter.empty:
            parts.append(name)
        else:
            default = parameter.default
            text = f'"{default}"' if isinstance(default, str) else repr(default)
            parts.append(f"{name}={text}")
    return f"PersistentClient({', '.join(parts)})"


def test_the_readme_shows_the_constructor_as_it_is() -> None:
    assert f"`{_signature_text()}`" in README


def test_every_exported_name_is_documented_and_every_documented_error_exists() -> None:
    exported = set(mqtt_persist.__all__)
    for name in exported:
        assert getattr(mqtt_persist, name).__doc__, f"{name} has no docstring"
    # The error hierarchy row names only errors the package exports.
    row = next(line for line in README.splitlines() if line.startswith("| `MqttPersistError`"))
    for name in set(re.findall(r"`([A-Z][A-Za-z]+)`", row)) - {"TimeoutError"}:
        assert name in exported, f"README names {name}, which mqtt_persist does not export"
    errors = {
        name
        for name in exported
        if isinstance(getattr(mqtt_persist, name), type)
        and issubclass(getattr(mqtt_persist, name), BaseException)
    }
    missing = errors - set(re.findall(r"`([A-Z][A-Za-z]+)`", row))
    assert not missing, f"the README's error row leaves out {sorted(missing)}"
