"""Helpers every config dataclass uses: a field's help string, required fields, range checks,
and the number fields' text (YAML and ``--set`` values) read by the field's type.

The CLI and the generated reference read a field's ``metadata["help"]`` (and ``"required"``);
every stage, app and command config declares its fields through these, so there is one spelling.
"""

from __future__ import annotations

import importlib
import types
import typing
from dataclasses import field, fields
from pathlib import Path

from nlakit.errors import NLAError
from nlakit.fileio import read_yaml


def hint(text: str) -> dict:
    """A config field's metadata: its help string (the CLI shows it beside the default)."""
    return {"help": text}


def option(default, help: str):
    """A dataclass field with a default and its help string."""
    return field(default=default, metadata=hint(help))


def required(text: str):
    """A config field without a default: the CLI makes its flag required."""
    return field(metadata={"help": text, "required": True})


def check_range(owner: str, name: str, value, *, low=None, high=None, low_open=False,
                optional=False) -> None:
    """NLAError naming `owner.name` (and its flag) when `value` is not a number in [low, high]
    ((low, high] with `low_open`); None passes when `optional`."""
    if value is None and optional:
        return
    fix = f"set --{name.replace('_', '-')} (or `{name}:` in the config file)"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise NLAError(f"{owner}.{name} must be a number, got {value!r}; {fix}")
    if (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and value > high):
        bounds = [f"{'>' if low_open else '>='} {low}"] if low is not None else []
        bounds += [f"<= {high}"] if high is not None else []
        raise NLAError(f"{owner}.{name} must be {' and '.join(bounds)}, got {value!r}; {fix} to "
                       "such a value")


def hint_kinds(hint) -> tuple[set, bool]:
    """The non-None types of a type hint (``int | None`` -> {int}) and whether it admits None."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(
        hint) is typing.Union else (hint,)
    kinds = {typing.get_origin(a) or a for a in args if a is not type(None)}
    return kinds, type(None) in args


def numbers_from_text(cls, values: dict, owner: str) -> dict:
    """`values` with the text given for number fields of `cls` converted by the field's type.
    PyYAML reads ``2e-4`` and ``1e-3`` (no dot) as strings, in a config file and in ``--set``
    alike; a float field takes them as numbers, an int field takes ``"8"``. Other text for a
    number field is an NLAError naming the field."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        if not isinstance(value, str) or key not in hints:
            continue
        kinds, optional = hint_kinds(hints[key])
        if not kinds or not kinds <= {int, float}:
            continue
        if optional and value.strip().lower() in ("none", "null"):
            out[key] = None
            continue
        try:
            out[key] = float(value) if float in kinds else int(value)
        except ValueError:
            kind = "a number" if float in kinds else "an integer"
            raise NLAError(f"{owner}.{key} must be {kind}{' or none' if optional else ''}, got "
                           f"{value!r}") from None
    return out





def build_config(cls, section: dict, owner: str, overrides: dict | None = None):
    """`cls` from a mapping (a config file's, a pipeline section's) with `overrides` (the flags)
    on top: an unknown key is an NLAError listing the known ones; number text is converted."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise NLAError(f"{owner}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**{**numbers_from_text(cls, section, owner), **(overrides or {})})


def read_config_file(path: str | None, owner: str) -> dict:
    """The mapping of a ``--config FILE.yaml`` ({} without one)."""
    if not path:
        return {}
    if not Path(path).is_file():
        raise NLAError(f"--config {path} does not exist")
    section = read_yaml(path) or {}
    if not isinstance(section, dict):
        raise NLAError(f"--config {path} must hold a mapping of {owner} settings")
    return section


def load_ref(ref: str):
    """The object a ``"module:name"`` reference names (config tables name classes this way so
    that listing them imports nothing heavy)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def token_counts(name: str, value) -> tuple[int, ...]:
    """A tuple of positive token counts from a tuple/list or a comma-separated string."""
    if isinstance(value, str):
        value = [x for x in value.split(",") if x.strip()]
    try:
        counts = tuple(int(q) for q in value)
    except (TypeError, ValueError):
        raise NLAError(f"{name} must be comma-separated token counts, got {value!r}") from None
    if any(c < 1 for c in counts):
        raise NLAError(f"{name}: token counts must be >= 1, got {counts}")
    return counts
