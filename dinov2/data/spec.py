"""Dataset spec strings: ``Kind:key=value:key=value``.

This is the one place where spec strings are split and their values converted. Each dataset kind
declares its keys as a mapping ``name -> SpecKey``; :func:`parse_dataset_spec` turns the string into
``(kind, options)`` and :func:`resolve_options` checks the keys of one kind, converts the values and
fills in defaults. Unknown kinds and keys are errors that list the valid ones.

A value may itself contain ``:`` (``urls=https://host:8080/train-{000000..000009}.tar``,
``urls=pipe:aws s3 cp s3://bucket/a.tar -``): a ``:`` only starts the next key when the text after
it is ``name=`` with ``name`` a key-like word (letters, digits, ``_``, ``.``, ``-``; no ``/`` or
spaces). Everything else up to such a ``:`` belongs to the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

_MISSING = object()
# The start of a ``key=value`` part; any other part continues the value before it.
_KEY_PART = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_.-]*\s*=")
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
    groups: list[list[str]] = []  # the ':'-separated parts of each key=value, colons of values rejoined
    for part in parts:
        if _KEY_PART.match(part):
            groups.append([part])
        elif groups:
            groups[-1].append(part)
        elif part.strip():
            raise DatasetSpecError(f"dataset spec {spec!r}: expected key=value, got {part!r}")
        # an empty part before the first key: tolerate 'Kind:' and 'Kind::key=...'
    options: dict[str, str] = {}
    for group in groups:
        key, _, value = ":".join(group).partition("=")
        key = key.strip()
        if key in options:
            raise DatasetSpecError(f"dataset spec {spec!r}: key {key!r} given twice")
        options[key] = value.strip().rstrip(":").strip()  # tolerate 'key=value:' and 'key=value::next=...'
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
