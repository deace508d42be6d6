"""Flag parsing: aliases, booleans, YAML with overrides, unknown flags, range validation."""

from __future__ import annotations

import dataclasses

import pytest

from open_instruct.config import TrainArguments, validate
from open_instruct.config.cli import parse_args
from open_instruct.errors import UserError

BASE = ["--model_name_or_path", "m", "--mixer_list", "data.jsonl", "1.0"]


def test_defaults_follow_tulu3():
    args = parse_args(BASE)
    assert (args.loss_type, args.beta) == (["dpo_norm"], 5.0)


def test_reference_cache_path_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REFERENCE_LOGPROBS_CACHE_PATH", str(tmp_path))
    assert parse_args(BASE).reference_logprobs_cache_path == str(tmp_path)
    monkeypatch.delenv("REFERENCE_LOGPROBS_CACHE_PATH")
    assert parse_args(BASE).reference_logprobs_cache_path.endswith(".cache/open_instruct/reference_logprobs")


@pytest.mark.parametrize(
    "alias,field,value,expected",
    [
        ("--tokenizer_name", "tokenizer_name_or_path", "tok", "tok"),
        ("--dataset_mixer_list", "mixer_list", "a.jsonl", ["a.jsonl"]),
        ("--num_train_epochs", "num_epochs", "3", 3),
        ("--dpo_loss_type", "loss_type", "dpo", ["dpo"]),
        ("--dpo_beta", "beta", "0.1", 0.1),
    ],
)
def test_open_instruct_aliases(alias, field, value, expected):
    args = parse_args(["--model_name_or_path", "m", alias, value] + (["1.0"] if field == "mixer_list" else []))
    expected = expected + ["1.0"] if field == "mixer_list" else expected
    assert getattr(args, field) == expected


@pytest.mark.parametrize(
    "flags,expected",
    [
        ([], False),
        (["--with_tracking"], True),
        (["--with_tracking", "true"], True),
        (["--with_tracking", "false"], False),
        (["--with_tracking", "False"], False),
    ],
)
def test_boolean_forms(flags, expected):
    assert parse_args(BASE + flags).with_tracking is expected


def test_bad_boolean_is_an_error():
    with pytest.raises(UserError, match="with_tracking"):
        parse_args(BASE + ["--with_tracking", "maybe"])


def test_unknown_flag_is_named():
    with pytest.raises(UserError, match="--not_a_flag"):
        parse_args(BASE + ["--not_a_flag", "1"])


def test_abbreviations_are_not_accepted():
    with pytest.raises(UserError, match="--learning"):
        parse_args(BASE + ["--learning", "1e-5"])


def test_yaml_then_flags_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_name_or_path: from_yaml\ndpo_beta: 0.5\nlearning_rate: 1.0e-6\n"
        "dataset_mixer:\n  a.jsonl: 1.0\n  b.jsonl: 100\nwith_tracking: true\n"
    )
    args = parse_args([str(recipe), "--learning_rate", "2e-6"])
    assert args.model_name_or_path == "from_yaml"
    assert args.beta == 0.5
    assert args.learning_rate == 2e-6
    assert args.mixer_list == ["a.jsonl", "1.0", "b.jsonl", "100"]
    assert args.with_tracking is True


def test_yaml_unknown_key_is_named(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: m\nleraning_rate: 1\n")
    with pytest.raises(UserError, match="leraning_rate"):
        parse_args([str(recipe)])


def test_missing_yaml_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        parse_args([str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--learning_rate", "-1e-5"], "--learning_rate must be >= 0"),
        (["--beta", "0"], "--beta must be > 0"),
        (["--beta", "-2"], "--beta must be > 0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
        (["--warmup_ratio", "1.5"], "--warmup_ratio"),
        (["--checkpointing_steps", "soon"], "--checkpointing_steps"),
    ],
)
def test_out_of_range_values(flags, message):
    with pytest.raises(UserError, match=message):
        validate(parse_args(BASE + flags))


def test_odd_mixer_list_is_an_error():
    with pytest.raises(UserError, match="pairs of DATASET AMOUNT"):
        validate(parse_args(["--model_name_or_path", "m", "--mixer_list", "a.jsonl", "1.0", "b.jsonl"]))


def test_model_is_required():
    with pytest.raises(UserError, match="--model_name_or_path is required"):
        validate(parse_args(["--mixer_list", "a.jsonl", "1.0"]))


def test_command_line_flags_parse_back_to_the_same_arguments():
    """An API run's command line (its summary's resume command): only the flags that differ from the defaults, and
    they parse back to the same arguments; a value with no command-line spelling gives None, never a wrong command."""
    from open_instruct.config.cli import command_line_flags

    args = parse_args(
        ["--model_name_or_path", "m", "--mixer_list", "a.jsonl", "0.5", "b", "3", "--learning_rate", "-1e-5"]
        + ["--gradient_checkpointing", "--use_slow_tokenizer", "false", "--max_train_steps", "7", "--beta", "0.1"]
        + ["--additional_model_arguments", '{"rope_theta": 5}', "--output_dir", "out dir"]
    )
    flags = command_line_flags(args)
    assert flags is not None and parse_args(flags) == args
    assert "--use_slow_tokenizer" not in flags and flags[flags.index("--max_train_steps") + 1] == "7"
    assert command_line_flags(TrainArguments(model_name_or_path="m", reference_logprobs_cache_path="c")) == [
        "--model_name_or_path", "m", "--reference_logprobs_cache_path", "c"
    ]  # fmt: skip
    assert command_line_flags(dataclasses.replace(args, exp_name=None)) is None  # a name flag cannot say None
