"""A flag as a dataclass field: one place for what its metadata holds (help, aliases, choices, valid range)."""

from __future__ import annotations

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
