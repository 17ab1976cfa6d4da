"""Dataset spec strings: ``Kind:key=value:key=value``.

This is the one place where spec strings are split and their values converted. Each dataset kind
declares its keys as a mapping ``name -> SpecKey``; :func:`parse_dataset_spec` turns the string into
``(kind, options)`` and :func:`resolve_options` checks the keys of one kind, converts the values and
fills in defaults. Unknown kinds and keys are errors that list the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

_MISSING = object()
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class DatasetSpecError(ValueError):
    """A dataset spec string that cannot be used (unknown kind or key, bad value, missing key)."""


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass(frozen=True)
class SpecKey:
    """One key a dataset kind accepts.

    ``parse`` converts the text after ``=``; ``choices`` (compared case-insensitively) restricts it;
    a key without a default is required.
    """

    parse: Callable[[str], Any] = str
    default: Any = _MISSING
    help: str = ""
    choices: Sequence[str] = field(default_factory=tuple)

    @property
    def required(self) -> bool:
        return self.default is _MISSING


def parse_dataset_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``Kind:key=value:...`` into the kind and a dict of raw string values."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetSpecError(f"dataset spec must be a non-empty string like 'ImageFolder:root=/data', got {spec!r}")
    kind, *parts = spec.strip().split(":")
    kind = kind.strip()
    if not kind:
        raise DatasetSpecError(f"dataset spec {spec!r} has no kind before the first ':'")
    options: dict[str, str] = {}
    for part in parts:
        if not part.strip():
            continue  # tolerate 'Kind:' and '::'
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DatasetSpecError(f"dataset spec {spec!r}: expected key=value, got {part!r}")
        if key in options:
            raise DatasetSpecError(f"dataset spec {spec!r}: key {key!r} given twice")
        options[key] = value.strip()
    return kind, options


def resolve_options(
    kind: str, options: Mapping[str, str], keys: Mapping[str, SpecKey], spec: str = ""
) -> dict[str, Any]:
    """Check the keys of one kind, convert the values and add defaults."""
    where = f"dataset spec {spec!r}" if spec else f"{kind} dataset"
    unknown = sorted(set(options) - set(keys))
    if unknown:
        raise DatasetSpecError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)} for kind {kind!r}; "
            f"valid keys: {', '.join(sorted(keys))}"
        )
    resolved: dict[str, Any] = {}
    for name, key in keys.items():
        if name not in options:
            if key.required:
                raise DatasetSpecError(f"{where}: kind {kind!r} needs key {name!r} ({key.help})")
            resolved[name] = key.default
            continue
        text = options[name]
        if key.choices:
            lowered = {c.lower(): c for c in key.choices}
            if text.lower() not in lowered:
                raise DatasetSpecError(
                    f"{where}: key {name!r} has value {text!r}; valid values: {', '.join(key.choices)}"
                )
            text = lowered[text.lower()]
        try:
            resolved[name] = key.parse(text)
        except (TypeError, ValueError) as exc:
            raise DatasetSpecError(f"{where}: key {name!r} has invalid value {text!r}: {exc}") from None
    return resolved
