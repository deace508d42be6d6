"""A YAML recipe whose value is a mapping or a list where a flag takes one value (or a nested one inside a list flag):
one error naming the file, the 1-based line and the key, for every flag of every type."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from open_instruct.config import TrainArguments
from open_instruct.config.cli import load_yaml_config
from open_instruct.config.fields import base_type
from open_instruct.errors import UserError
from tests.conftest import run_cli

HINTS = typing.get_type_hints(TrainArguments)
FLAGS = {f.name: base_type(HINTS[f.name]) for f in dataclasses.fields(TrainArguments)}
EXPECTED = {str: "text", int: "a whole number", float: "a number", bool: "true or false"}
HINT = "(quote a value that holds ': ' or starts with '{' or '[')"


def _load(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_yaml_config(path)
    return path, str(err.value)


def test_every_flag_type_is_covered():
    # a new flag type needs its expected shape named (tests below walk every flag of these types)
    assert {kind for kind, _ in FLAGS.values()} == {str, int, float, bool, dict}


@pytest.mark.parametrize("name", sorted(n for n, (kind, _) in FLAGS.items() if kind is not dict))
def test_a_mapping_where_a_flag_takes_values_names_file_line_and_key(name, tmp_path):
    kind, is_list = FLAGS[name]
    expected = f"a list of {EXPECTED[kind]} values" if is_list else EXPECTED[kind]
    path, message = _load(tmp_path, f"# a recipe\nseed: 3\n{name}:\n  first: 1\n  second: 2\n")
    assert message == f"{path}: line 3: {name}: expected {expected}, got a mapping {HINT}"
    if is_list:  # a list of lists: the nested one is named
        path, message = _load(tmp_path, f"seed: 3\n{name}:\n  - a\n  - [b, c]\n")
        assert message == f"{path}: line 2: {name}: expected {expected}, but item 2 is a list {HINT}"
    else:
        path, message = _load(tmp_path, f"seed: 3\n\n{name}: [a, b]\n")
        assert message == f"{path}: line 3: {name}: expected {expected}, got a list {HINT}"


def test_aliases_and_json_object_flags(tmp_path):
    path, message = _load(tmp_path, "model_name_or_path: m\ndpo_beta: {a: 1}\n")  # a legacy alias is named as written
    assert message == f"{path}: line 2: dpo_beta: expected a number, got a mapping {HINT}"
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("optimizer_kwargs:\n  betas: [0.9, 0.95]\nmixer_list: [a.jsonl, 1.0]\n")
    assert load_yaml_config(recipe)["optimizer_kwargs"] == {"betas": [0.9, 0.95]}  # a mapping is this flag's value


def test_the_command_line_says_it_in_one_line_and_exits_2(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: m\noutput_dir:\n  nested: value\n")
    result = run_cli([str(recipe)], tmp_path / "cache", timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {recipe}: line 2: output_dir: expected text, got a mapping {HINT}"
