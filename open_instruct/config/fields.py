"""A flag as a dataclass field: one place for what its metadata holds (help, aliases, choices, valid range)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any

from open_instruct.ranges import Range

POS = Range(1)  # counts and sizes
NONNEG = Range(0)


def flag(
    default: Any,
    help: str,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    valid: Range | None = None,
) -> Any:
    """A flag: its default, help, legacy aliases, choices and (numbers) valid range, checked by ``validate``."""
    meta: dict[str, Any] = {"help": help, "aliases": aliases}
    if choices is not None:
        meta["choices"] = choices
    if valid is not None:
        meta["valid"] = valid
    if isinstance(default, list | dict):  # a fresh copy per instance
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def base_type(annotation: Any) -> tuple[Any, bool]:
    """(element type, is_list) of a field annotation such as ``int | None`` or ``list[str]``: what the command-line
    parser, the YAML checks and ``--help`` read of a field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return base_type(inner[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def field_default(spec: dataclasses.Field) -> Any:
    """A dataclass field's default value (its factory's product for a list or dict)."""
    if spec.default is not dataclasses.MISSING:
        return spec.default
    return spec.default_factory()  # type: ignore[misc]
