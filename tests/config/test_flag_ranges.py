"""Every numeric field declares its valid range, and one checker holds flags, YAML keys and the Python API to it:
walked from the dataclasses, so a new number is covered without a new test."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from open_instruct import api
from open_instruct.api import DPOConfig, PreferenceDatasetConfig, TrainingConfig, dpo_arguments
from open_instruct.config import TrainArguments, validate
from open_instruct.config.cli import load_yaml_config, parse_args
from open_instruct.config.flag_rules import rules_table, with_table
from open_instruct.errors import UserError
from open_instruct.ranges import Range, numeric_fields, range_problems
from tests.conftest import ROOT, cli_env

NUMERIC = numeric_fields(TrainArguments)
BASE = {"model_name_or_path": "m", "mixer_list": ["d.jsonl", "1.0"], "reference_logprobs_cache_path": "c"}


def _problem(**values) -> str:
    with pytest.raises(UserError) as err:
        validate(TrainArguments(**BASE, **values))
    return str(err.value)


def _as_field(f: dataclasses.Field, value: float):
    return [value] if "list" in str(f.type) else value


def test_the_walk_sees_the_numbers():
    names = {f.name for f in NUMERIC}
    assert {"learning_rate", "seed", "beta", "ld_alpha", "loss_weights", "zero_stage", "max_grad_norm"} <= names
    assert not names & {"use_lora", "with_tracking", "output_dir", "loss_type"}  # no bool or text


@pytest.mark.parametrize("f", NUMERIC, ids=lambda f: f.name)
def test_each_number_declares_a_range_refuses_nan_inf_and_out_of_range(f):
    valid = f.metadata.get("valid")
    assert isinstance(valid, Range), f"{f.name} declares no valid=Range(...) in its field metadata"
    defaults = TrainArguments(**BASE)
    validate(defaults)  # every default is valid
    if getattr(defaults, f.name) is None:
        assert not range_problems(TrainArguments(**BASE, **{f.name: None}))
    for bad in (math.nan, math.inf, -math.inf):
        assert f"--{f.name} must be a finite number, got {bad}" in _problem(**{f.name: _as_field(f, bad)})
    outside = valid.outside()
    if outside is not None:
        value = int(outside) if "int" in str(f.type) else outside
        assert f"--{f.name} must be {valid.describe()}, got {value}" in _problem(**{f.name: _as_field(f, value)})
    else:
        assert valid.describe() == "a finite number"


def test_sentinels_and_edges_stay_valid():
    validate(TrainArguments(**BASE, max_grad_norm=-1.0, seed=0, keep_last_n_checkpoints=-1, warmup_ratio=1.0))
    assert "--keep_last_n_checkpoints must be >= 1 or -1, got -2" in _problem(keep_last_n_checkpoints=-2)
    assert "--seed must be in [0, 4294967295], got 4294967296" in _problem(seed=2**32)


def test_cli_nan_is_one_error_line_naming_the_flag(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "open_instruct.dpo_tune_cache", "--model_name_or_path", str(tmp_path)]
        + ["--mixer_list", "x.jsonl", "1.0", "--learning_rate", "nan", "--output_dir", str(tmp_path / "out")],
        env=cli_env(tmp_path / "cache"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: invalid configuration: --learning_rate must be a finite number, got nan"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["inf", "-inf", "NaN", "-Infinity"])
def test_cli_infinities_are_refused(text):
    with pytest.raises(UserError, match="--beta must be a finite number"):
        validate(parse_args(["--model_name_or_path", "m", "--mixer_list", "d.jsonl", "1.0", "--beta", text]))


def test_cli_keeps_no_clipping_and_seed_zero():
    args = parse_args(
        ["--model_name_or_path", "m", "--mixer_list", "d.jsonl", "1.0"] + "--max_grad_norm -1 --seed 0".split()
    )
    validate(args)
    assert (args.max_grad_norm, args.seed) == (-1.0, 0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("learning_rate: .nan", "--learning_rate must be a finite number"),
        ("beta: -.inf", "--beta must be a finite number"),
        ("warmup_ratio: 1.5", "--warmup_ratio must be in [0, 1], got 1.5"),
        ("seed: .inf", "seed: expected a whole number, got inf"),
        ("seed: 1.5", "seed: expected a whole number, got 1.5"),
        ("loss_weights: [1.0, .nan]", "--loss_weights must be a finite number"),
    ],
)
def test_yaml_keys_are_held_to_the_same_ranges(tmp_path, line, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model_name_or_path: m\nmixer_list: [d.jsonl, '1.0']\nloss_type: [dpo, ipo]\n{line}\n")
    with pytest.raises(UserError) as err:
        validate(parse_args([str(path)]))
    assert message in str(err.value)
    if "seed" in line:
        with pytest.raises(UserError):
            load_yaml_config(path)


API_NUMBERS = [
    (cls, f.name) for cls in (TrainingConfig, DPOConfig, PreferenceDatasetConfig) for f in numeric_fields(cls)
]


@pytest.mark.parametrize(("cls", "name"), API_NUMBERS, ids=lambda v: getattr(v, "__name__", v))
def test_python_api_refuses_nan_and_inf_in_every_number(cls, name, tmp_path):
    for bad in (math.nan, math.inf):
        configs = {
            TrainingConfig: TrainingConfig(output_dir=str(tmp_path), micro_batch_size=2, batch_size=2),
            DPOConfig: DPOConfig(),
            PreferenceDatasetConfig: PreferenceDatasetConfig(dataset_name=str(tmp_path / "d.jsonl")),
        }
        configs[cls] = dataclasses.replace(configs[cls], **{name: bad})
        with pytest.raises(UserError):
            dpo_arguments("m", configs[TrainingConfig], configs[DPOConfig], configs[PreferenceDatasetConfig])


def test_flags_page_rules_table_is_current():
    page = (ROOT / "docs" / "flags.md").read_text()
    assert rules_table() in page
    assert with_table(page) == page, "run: python -m open_instruct.config.flag_rules --write docs/flags.md"


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, f.name) for cls in ("SFTDatasetConfig", "TextDatasetConfig") for f in numeric_fields(getattr(api, cls))],
    ids=str,
)
def test_sft_and_pretraining_configs_refuse_nan_and_inf(cls, name, tiny_model_dir, tmp_path):
    """SFT's and pretraining's own numbers (max_seq_length, block_size, amount, ...) reach the same checker."""
    from open_instruct.api import pretrain_arguments, run_sft

    train = TrainingConfig(output_dir=str(tmp_path), micro_batch_size=2, batch_size=2)
    for bad in (math.nan, math.inf):
        dataset = getattr(api, cls)(dataset_name=str(tmp_path / "d.jsonl"), **{name: bad})
        with pytest.raises(UserError):
            if cls == "SFTDatasetConfig":
                run_sft(tmp_path / "missing_checkpoint", train, dataset)
            else:
                pretrain_arguments(str(tiny_model_dir), train, dataset, None)
        assert not (tmp_path / "d.jsonl").exists()


@pytest.mark.parametrize("amount", ["nan", "inf", "nan.0", "-inf.0", "1.0e400", "1e400", "-0.5", "0.0"])
def test_mixer_amounts_must_be_finite_and_positive(amount):
    """The AMOUNT of --mixer_list (and YAML's dataset_mixer) is a number too: no NaN, no infinity, nothing <= 0."""
    from open_instruct.data.mixer import parse_mixer_list

    with pytest.raises(UserError, match=rf"--mixer_list: amount for 'a.jsonl' must be .*got '{amount}'"):
        parse_mixer_list(["a.jsonl", amount], ["train"])
    assert parse_mixer_list(["a.jsonl", "1.0e2"], ["train"])[0].amount == "1.0e2"  # finite exponent form stays valid
