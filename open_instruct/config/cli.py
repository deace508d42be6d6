"""Command-line and YAML parsing for :class:`~open_instruct.config.TrainArguments`.

``prog [config.yaml] [--flag value ...]``: the YAML file (the only positional argument) sets values, flags override it.
Booleans accept ``--flag``, ``--flag true`` and ``--flag false``. Unknown flags and unknown YAML keys are errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from open_instruct.config import TrainArguments, compat, help_text
from open_instruct.config.fields import base_type, field_default
from open_instruct.config.yaml_shapes import check_shapes
from open_instruct.errors import UserError

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def str_to_bool(text: str) -> bool:
    """Parse a boolean flag value."""
    lowered = str(text).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional_number(kind: type):
    def parse(text: str):
        if str(text).lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


class _Parser(argparse.ArgumentParser):
    """Errors are a UserError (one line); ``--help`` is :mod:`.help_text`'s grouped text for the parser's stage."""

    stage = "dpo"
    flags_of: type = TrainArguments

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(message)

    def format_usage(self) -> str:
        return help_text.usage(self.prog)

    def format_help(self) -> str:
        return help_text.render(self.flags_of, self.prog, self.stage)


def _alias_map(cls: type = TrainArguments) -> dict[str, str]:
    """Every accepted name (field names and legacy aliases) -> field name."""
    names = {}
    for f in dataclasses.fields(cls):
        names[f.name] = f.name
        for alias in f.metadata.get("aliases", ()):
            names[alias] = f.name
    return names


def build_parser(cls: type = TrainArguments, stage: str = "dpo") -> argparse.ArgumentParser:
    """An argparse parser with one option per dataclass field (plus its aliases); its help is that of ``stage``."""
    parser = _Parser(allow_abbrev=False)
    parser.stage, parser.flags_of = stage, cls
    parser.add_argument("config_file", nargs="?", help="YAML recipe; flags given after it override its values")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, is_list = base_type(hints[f.name])
        names = [f"--{f.name}"] + [f"--{a}" for a in f.metadata.get("aliases", ())]
        options: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
        if kind is bool:
            options.update(nargs="?", const=True, type=str_to_bool, metavar="BOOL")
            if f.default is True:  # as Hugging Face's argument parser (open-instruct's): --no_<flag> turns it off
                negatives = [f"--no_{name[2:]}" for name in names]
                parser.add_argument(*negatives, dest=f.name, action="store_false", default=argparse.SUPPRESS)
        elif is_list:
            options.update(nargs="+", type=kind)
        elif kind in (int, float):
            options.update(type=_optional_number(kind))
        else:
            options.update(type=str)
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        parser.add_argument(*names, **options)
    return parser


def _normalize_yaml(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Map aliases to field names, a ``dataset_eval_mixer`` mapping to an eval mixer list (``dataset_mixer`` is a
    flag of its own), and reject unknown keys."""
    names = _alias_map()
    values: dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        if key == "dataset_eval_mixer":
            if not isinstance(value, dict):
                raise UserError(f"{source}: {key} must be a mapping of dataset -> amount")
            values["eval_mixer_list"] = [str(x) for item in value.items() for x in item]
            continue
        if key not in names:
            unknown.append(key)
            continue
        values[names[key]] = value
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    return values


def _coerce(value: Any, annotation: Any, name: str, source: str) -> Any:
    kind, is_list = base_type(annotation)
    try:
        if value is None:
            return None
        if is_list:
            items = value if isinstance(value, list) else str(value).split()
            return [kind(v) for v in items]
        if kind is bool:
            return value if isinstance(value, bool) else str_to_bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected a whole number, got {value}")  # int() would truncate it silently
        if kind in (int, float, str):
            return kind(value)
    except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError) as err:
        raise UserError(f"{source}: {name}: {err}") from err
    return value


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Field values from a YAML recipe, aliases resolved and types checked."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a folder; expected a YAML file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values")
    hints = typing.get_type_hints(TrainArguments)
    check_shapes(raw, {k: base_type(hints[f]) for k, f in _alias_map().items() if k in raw}, text, str(path))
    values = _normalize_yaml(raw, str(path))
    return {k: _coerce(v, hints[k], k, str(path)) for k, v in values.items()}


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """``--flag -1e-5`` -> ``--flag=-1e-5``: argparse would take a negative number in exponent form for an option."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and token.startswith("-"):
            try:
                float(token)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={token}"
                continue
        out.append(token)
    return out


def exit_on_user_error(entry: Callable[[], object]) -> None:
    """Run a command-line entry; a UserError becomes one ``error: ...`` line on stderr and exit code 2."""
    try:
        entry()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None = None, stage: str = "dpo") -> TrainArguments:
    """Parse a YAML recipe (optional) and flags into validated-by-type TrainArguments (``--help``: that of
    ``stage``, dpo, sft or pretrain)."""
    parser = build_parser(stage=stage)
    namespace = parser.parse_args(_attach_negative_numbers(list(sys.argv[1:] if argv is None else argv)))
    values: dict[str, Any] = {}
    if namespace.config_file:
        values.update(load_yaml_config(namespace.config_file))
    values.update({k: v for k, v in vars(namespace).items() if k != "config_file"})
    for name in ("mixer_list", "eval_mixer_list"):
        if isinstance(values.get(name), str):  # a JSON mapping given on the command line
            values[name] = [str(x) for item in json.loads(values[name]).items() for x in item]
    line = compat.notice(list(values))
    if line and os.environ.get("RANK", "0") == "0":
        print(line)
    return TrainArguments(**values)


def command_line_flags(args: TrainArguments, stage: str = "dpo") -> list[str] | None:
    """The flags that parse back to ``args`` (those that differ from the defaults): the command line of a run the
    Python API started. None when a value has no command-line spelling (a None where the default is a value, an empty
    list) or the flags would not parse back to the same arguments."""
    hints = typing.get_type_hints(TrainArguments)
    flags: list[str] = []
    for f in dataclasses.fields(TrainArguments):
        value = getattr(args, f.name)
        if value == field_default(f):
            continue
        kind, _ = base_type(hints[f.name])
        if isinstance(value, bool):
            words = ["true" if value else "false"]
        elif value is None:
            if kind not in (int, float):
                return None
            words = ["none"]
        elif isinstance(value, list | tuple):
            words = [repr(v) if isinstance(v, float) else str(v) for v in value]
        elif isinstance(value, dict):
            words = [json.dumps(value)]
        else:
            words = [repr(value) if isinstance(value, float) else str(value)]
        if not words:
            return None
        flags += [f"--{f.name}", *words]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # parse_args prints open-instruct's compatibility notes
            same = parse_args(flags, stage) == args
    except (UserError, SystemExit, ValueError, TypeError):
        return None
    return flags if same else None
