"""The valid range of a numeric setting, declared in its dataclass field's metadata (``valid=Range(...)``).

One checker, :func:`range_problems`, walks a settings object's fields and reads the ranges, so the command line, a
YAML recipe and the Python API (all of which end in ``TrainArguments``) are held to the same bounds, and NaN and the
infinities are refused for every number whatever its range. This module imports nothing from the project, so both
``config.arguments`` and ``objectives.losses`` can declare ranges.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """``low <= x <= high`` (``<`` on an open side; None: unbounded), or one of ``also`` (sentinels such as -1)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[float, ...] = ()

    def contains(self, value: float) -> bool:
        """Whether a finite ``value`` is valid."""
        if value in self.also:
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        """The range in words: ``>= 1``, ``> 0``, ``in [0, 1)``, ``>= 1 or -1``, ``a finite number``."""
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            return "a finite number"
        return text + "".join(f" or {_num(v)}" for v in self.also)

    def outside(self) -> float | None:
        """A finite value outside the range (None when every finite value is valid): for tests."""
        if self.low is not None:
            candidate = self.low if self.low_open else self.low - 1
        elif self.high is not None:
            candidate = self.high if self.high_open else self.high + 1
        else:
            return None
        return candidate if candidate not in self.also else candidate - 1


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return list(value)
    return [] if value is None or isinstance(value, bool) else [value]


def range_problems(settings: Any, prefix: str = "--") -> list[str]:
    """One message per numeric field of the dataclass ``settings`` that is NaN, infinite or outside its ``valid``
    range (None, the unset value of an optional field, is always valid; a list is checked element by element)."""
    problems = []
    for f in dataclasses.fields(settings):
        valid = f.metadata.get("valid")
        for value in _numbers(getattr(settings, f.name)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                problems.append(f"{prefix}{f.name} must be a finite number, got {value}")
            elif valid is not None and not valid.contains(value):
                problems.append(f"{prefix}{f.name} must be {valid.describe()}, got {value}")
    return problems


def numeric_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that hold numbers (int, float, optional or in a list; not bool)."""
    hints = typing.get_type_hints(cls)
    numeric = []
    for f in dataclasses.fields(cls):
        kinds = {a for a in typing.get_args(hints[f.name]) or (hints[f.name],)}
        kinds |= {a for k in list(kinds) for a in typing.get_args(k)}  # list[float] -> float
        if kinds & {int, float} and bool not in kinds:
            numeric.append(f)
    return numeric
