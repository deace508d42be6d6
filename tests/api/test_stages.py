"""The Python API: same engine and numbers as the CLI, clear config errors, .pt state dicts, hub names, the example."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex

import pytest
import torch

from open_instruct import DPOConfig, PreferenceDatasetConfig, TrainingConfig, UserError, run_dpo
from open_instruct.api import dpo_arguments, preference_arguments
from open_instruct.api.configs import writes_pt
from open_instruct.config.cli import parse_args
from open_instruct.model.state_dict import load_pt_checkpoint
from tests.conftest import read_metrics, run_cli, small_run_args

LOG_LINE = re.compile(r"^step=\d+ loss=-?\d+\.\d{4} accuracy=\d+\.\d{2}% lr=\d\.\d{3}e[-+]\d{2}$", re.M)


def _small_configs(tmp_path, train_file, **train_overrides):
    train = TrainingConfig(
        output_dir=str(tmp_path / "api_out"),
        batch_size=8,
        micro_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        log_every=1,
        seed=1,
        **train_overrides,
    )
    dpo = DPOConfig(
        beta=5.0,
        loss_type="dpo_norm",
        max_length=32,
        max_prompt_length=32,
        reference_cache_dir=str(tmp_path / "api_cache"),
    )
    return train, dpo, PreferenceDatasetConfig(str(train_file), amount=64)


@pytest.mark.slow
def test_run_dpo_and_the_cli_give_the_same_metrics(tiny_model_dir, synthetic_data, tmp_path):
    torch.set_num_threads(1)  # as the CLI subprocess (OMP_NUM_THREADS=1): same kernels, same rounding
    train, dpo, data = _small_configs(tmp_path, synthetic_data[0])
    path = run_dpo(tiny_model_dir, train, dpo, data)
    assert path == tmp_path / "api_out" and (path / "model.safetensors").is_file()
    cli = run_cli(
        small_run_args(
            tiny_model_dir,
            synthetic_data[0],
            tmp_path / "cli_out",
            warmup_ratio=None,
            warmup_steps="0",
            lr_scheduler_type="constant",  # the API's default
        ),
        tmp_path / "cli_cache",
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert len(LOG_LINE.findall(cli.stdout)) == 8
    api_rows, cli_rows = read_metrics(path), read_metrics(tmp_path / "cli_out")
    assert len(api_rows) == len(cli_rows) == 8
    for a, c in zip(api_rows, cli_rows):
        for key in (
            "training_step",
            "learning_rate",
            "train_loss",
            "rewards/accuracy",
            "rewards/margin",
            "logps/chosen",
            "token_count",
        ):
            assert a[key] == pytest.approx(c[key], rel=1e-4, abs=1e-6), key
    # the API run sums up as the CLI does (sample answers included: on by default, and the losses above are the
    # CLI's without them); its resume command is the command line of the run's own arguments
    summary = json.loads((path / "summary.json").read_text())
    assert summary["ended"]["status"] == "finished" and summary["steps"] == {"done": 8, "total": 8}
    assert [title.split(",")[0] for title in summary["sections"]] == ["sample answers"]
    words = shlex.split(summary["commands"]["resume"])
    assert words[1:3] == ["-m", "open_instruct.dpo_tune_cache"]
    parsed = dataclasses.asdict(parse_args(words[3:]))
    recorded = json.loads((path / "run_config.json").read_text())
    shared = [name for name in recorded if name in parsed]
    differ = {k for k in shared if parsed[k] != recorded[k]}
    assert len(shared) > 150 and differ == {"packing", "share_prompt", "group_by_length"}  # recorded as resolved
    assert all(parsed[k] is None for k in differ)  # "auto" in both runs: resolved the same way at run time


@pytest.mark.parametrize(
    "train_kwargs, message",
    [
        (
            {"batch_size": 30, "micro_batch_size": 8, "gradient_accumulation_steps": None},
            r"batch_size 30 \(global\) cannot be split evenly into micro_batch_size 8 x 1 process\(es\): make it a "
            "multiple of 8",
        ),
        ({"mixed_precision": "fp8"}, "mixed_precision must be 'bf16', 'fp16' or 'no'"),
        ({"extra": {"not_a_flag": 1}}, "unknown setting.*not_a_flag"),
        ({"eval_every": 5}, "eval_every needs an evaluation set"),
        ({"learning_rate": -1.0}, "--learning_rate must be >= 0"),
        ({"save_every": 0}, "--checkpointing_steps must be a positive integer"),  # mapped to the CLI flag
    ],
)
def test_config_errors_are_clear(train_kwargs, message, tmp_path):
    train = TrainingConfig(output_dir=str(tmp_path), **train_kwargs)
    with pytest.raises(UserError, match=message):
        dpo_arguments("model", train, DPOConfig(), PreferenceDatasetConfig(str(tmp_path / "pairs.jsonl")))


def test_batch_size_mapping_and_derived_accumulation(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    train = TrainingConfig(
        output_dir=str(tmp_path),
        batch_size=32,
        micro_batch_size=4,
        gradient_accumulation_steps=None,
        max_steps=7,
        warmup_steps=3,
        log_every=2,
    )
    args = dpo_arguments(
        "model", train, DPOConfig(max_length=100, max_prompt_length=28), PreferenceDatasetConfig("pairs.jsonl")
    )
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 4)
    assert (args.max_train_steps, args.warmup_steps, args.logging_steps, args.max_seq_length) == (7, 3, 2, 128)
    with pytest.raises(UserError, match=r"micro_batch_size 8 x 2 process\(es\): make it a multiple of 16"):
        dpo_arguments(
            "model",
            TrainingConfig(batch_size=8, micro_batch_size=8),
            DPOConfig(),
            PreferenceDatasetConfig("pairs.jsonl"),
        )


def test_no_dataset_is_a_clear_error():
    with pytest.raises(UserError, match="no preference dataset"):
        dpo_arguments("model", TrainingConfig(), DPOConfig(), PreferenceDatasetConfig())


@pytest.mark.parametrize("name, fmt", [("Anthropic/hh-rlhf", "hh_rlhf"), ("stanfordnlp/SHP", "shp")])
def test_hub_datasets_map_to_their_parser_and_test_split(name, fmt, tmp_path):
    values = preference_arguments(
        PreferenceDatasetConfig(name, amount=1000), TrainingConfig(output_dir=str(tmp_path), eval_every=50)
    )
    assert values["mixer_list"] == [name, "1000"] and values["dataset_format"] == fmt
    assert values["eval_mixer_list"] == [name, "1.0"] and values["eval_mixer_list_splits"] == ["test"]


def test_custom_rows_in_memory_become_a_file_the_engine_reads(tmp_path):
    from open_instruct.data.mixer import parse_mixer_list
    from tests.data_oracle import build_mix

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    values = preference_arguments(
        PreferenceDatasetConfig(rows, eval_fraction=0.2), TrainingConfig(output_dir=str(tmp_path))
    )
    pairs, _ = build_mix(parse_mixer_list(values["mixer_list"], ["train"]), seed=0)
    assert [p["chosen"][0]["content"] for p in pairs] == [f"good {i}" for i in range(5)]
    assert values["eval_fraction"] == 0.2 and values["dataset_format"] == "auto"


def test_pt_state_dict_needs_a_tokenizer_and_a_config(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pt = tmp_path / "weights.pt"
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), pt)
    data = PreferenceDatasetConfig(str(tmp_path / "pairs.jsonl"))
    with pytest.raises(UserError, match=r"bare state dict, so it also needs a tokenizer .* and a model config"):
        run_dpo(pt, TrainingConfig(output_dir=str(tmp_path / "o")), DPOConfig(), data)
    tok_only = tmp_path / "tok"
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tok_only)  # a folder without config.json
    with pytest.raises(UserError, match=r"needs a model config") as err:
        run_dpo(pt, TrainingConfig(output_dir=str(tmp_path / "o")), DPOConfig(), data, tokenizer_name=str(tok_only))
    assert "tokenizer" not in str(err.value).split("needs")[1]
    bad = tmp_path / "bad.pt"
    torch.save({"foo.weight": torch.zeros(2)}, bad)
    with pytest.raises(UserError, match=r"does not match the model config .*missing .*unexpected \['foo.weight'\]"):
        run_dpo(
            bad, TrainingConfig(output_dir=str(tmp_path / "o")), DPOConfig(), data, tokenizer_name=str(tiny_model_dir)
        )


def test_pt_state_dict_trains_from_the_same_weights(tiny_model_dir, synthetic_data, tmp_path):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pt = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in original.state_dict().items()}}, pt)  # DDP-style
    train, dpo, data = _small_configs(tmp_path, synthetic_data[0], max_steps=2)
    path = run_dpo(pt, train, dpo, data, tokenizer_name=str(tiny_model_dir))
    rebuilt = AutoModelForCausalLM.from_pretrained(path / "initial_model")
    ids = torch.tensor([[2, 7, 9, 11, 13]])
    assert torch.equal(rebuilt(input_ids=ids).logits, original(input_ids=ids).logits)
    assert [r["training_step"] for r in read_metrics(path)] == [1, 2]
    final = AutoModelForCausalLM.from_pretrained(path)
    # By default the stage also writes <output_dir>/dpo_final.pt (renamed into place: no temporary file left).
    pt_model, _ = load_pt_checkpoint(path / "dpo_final.pt")
    assert torch.equal(pt_model(input_ids=ids).logits, final(input_ids=ids).logits)
    assert not [p.name for p in path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "save_format, extra, written",
    [(None, {}, True), ("pt", {}, True), ("hf", {}, False), (None, {"use_lora": True}, False)],
)
def test_final_pt_written_by_default_except_for_adapters(save_format, extra, written):
    assert writes_pt(TrainingConfig(save_format=save_format, extra=extra)) is written
