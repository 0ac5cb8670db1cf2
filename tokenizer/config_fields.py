"""Type checking of JSON-loaded dataclass configs.

Configs arrive from JSON files written by other people, so every field is checked against its annotation
before a model is built from it. A wrong type fails here with the field name, the value and the expected type,
instead of surfacing later as an obscure shape error deep inside a convolution.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _matches(value: Any, annotation: Any) -> bool:
    """Whether `value` (as loaded from JSON or passed in Python) fits the type `annotation`."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(item, args[0]) for item in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, (annotation, dict))
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_field_types(config: Any) -> None:
    """Raise `TypeError` naming the first field of dataclass `config` whose value does not match its annotation."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _matches(value, hints[field.name]):
            raise TypeError(
                f"{type(config).__name__}.{field.name} must be {_type_name(hints[field.name])}, "
                f"got {value!r} ({type(value).__name__})"
            )


def read_json_file(path: str | Path) -> Any:
    """Parse a JSON file; malformed content raises `ValueError` naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def dataclass_from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config") -> T:
    """Build dataclass `cls` from a JSON dict, rejecting unknown keys (a typo or a newer format) by name.

    Lists become tuples so that a config compares equal to itself after a JSON round trip.
    """
    if not isinstance(data, dict):
        raise TypeError(f"{source} must be a JSON object, got {type(data).__name__}")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{source} has unknown field(s) {unknown} for {cls.__name__}; expected only {sorted(known)}. "
            "It may have been written by a newer version of vqstack."
        )
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
    return cls(**kwargs)
