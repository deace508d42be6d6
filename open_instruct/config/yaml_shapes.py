"""A YAML recipe's values checked for their shape before any is converted: a mapping or a list where a flag takes one
value (``output_dir:`` followed by indented keys, an unquoted ``{...}`` or ``[...]``), or a nested one inside a list
flag, is one error naming the file, the 1-based line and the key. Converting it instead would turn it into text such
as ``"{'a': 1}"`` (a folder of that name) or a message without a place.
"""

from __future__ import annotations

from typing import Any

import yaml

from open_instruct.errors import UserError

_EXPECTED = {str: "text", int: "a whole number", float: "a number", bool: "true or false"}


def key_lines(text: str) -> dict[str, int]:
    """1-based line of each top-level key of a YAML mapping document (empty for any other document)."""
    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value): key.start_mark.line + 1 for key, _ in node.value}


def _shape(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else ""


def shape_problem(value: Any, kind: Any, is_list: bool) -> str:
    """ "" when ``value`` has the shape a flag of element type ``kind`` (a list flag with ``is_list``) takes; else
    what was expected and found."""
    if kind is dict:  # a JSON-object flag (``dataset_mixer``, ``optimizer_kwargs``): a mapping is what it takes
        return ""
    expected = _EXPECTED.get(kind, "one value")
    if is_list:
        if isinstance(value, dict):
            return f"expected a list of {expected} values, got a mapping"
        nested = [f"item {i + 1} is {_shape(v)}" for i, v in enumerate(value if isinstance(value, list) else [])]
        nested = [n for n in nested if not n.endswith(" is ")]
        return f"expected a list of {expected} values, but {nested[0]}" if nested else ""
    found = _shape(value)
    return f"expected {expected}, got {found}" if found else ""


def check_shapes(raw: dict[str, Any], flag_types: dict[str, tuple[Any, bool]], text: str, source: str) -> None:
    """Raise one UserError for the first key of ``raw`` whose value does not have its flag's shape.
    ``flag_types``: each known key -> (element type, is_list)."""
    lines: dict[str, int] | None = None
    for key, value in raw.items():
        if key not in flag_types:
            continue
        problem = shape_problem(value, *flag_types[key])
        if problem:
            lines = key_lines(text) if lines is None else lines
            where = f"line {lines[key]}: " if key in lines else ""
            raise UserError(
                f"{source}: {where}{key}: {problem} (quote a value that holds ': ' or starts with '{{' or '[')"
            )
