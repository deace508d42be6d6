"""Supervised fine-tuning: labels on assistant turns, held-out NLL drops, the checkpoint feeds run_dpo, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from open_instruct import DPOConfig, PreferenceDatasetConfig, SFTDatasetConfig, TrainingConfig, run_dpo, run_sft
from open_instruct.data.sft import conversation, tokenize_conversation
from open_instruct.data.synthetic import build_tokenizer
from open_instruct.errors import UserError
from tests.conftest import ROOT, cli_env, read_metrics


def test_labels_cover_every_assistant_turn_and_nothing_else():
    tokenizer = build_tokenizer()
    messages = [
        {"role": "system", "content": "please"},
        {"role": "user", "content": "repeat cat dog"},
        {"role": "assistant", "content": "cat dog"},
        {"role": "user", "content": "count up from 1 to 3"},
        {"role": "assistant", "content": "1 2 3"},
    ]
    ids, labels = tokenize_conversation(tokenizer, messages)
    assert len(ids) == len(labels)
    labelled = [tokenizer.convert_ids_to_tokens(t) for t, lab in zip(ids, labels) if lab != -100]
    assert labelled == ["cat", "dog", "</s>", "1", "2", "3", "</s>"]
    assert all(lab in (-100, t) for t, lab in zip(ids, labels))


def test_conversation_from_chat_or_preference_rows():
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert conversation(chat) == chat["messages"]
    pref = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    assert conversation(pref) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}]
    with pytest.raises(ValueError, match="no non-empty assistant turn"):
        conversation({"messages": [{"role": "user", "content": "q"}]})


def _held_out_nll(model_dir, test_file):
    """Mean NLL per assistant token of the held-out chosen conversations, from the model's full logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for line in test_file.read_text().splitlines()[:32]:
            ids, labels = tokenize_conversation(tokenizer, json.loads(line)["chosen"])
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, synthetic_data, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sft") / "out"
    train, test = synthetic_data
    path = run_sft(
        tiny_model_dir,
        TrainingConfig(
            output_dir=str(out),
            batch_size=16,
            micro_batch_size=16,
            learning_rate=3e-3,
            max_steps=30,
            warmup_steps=3,
            log_every=5,
            eval_every=10,
        ),
        SFTDatasetConfig(str(train), eval_dataset_name=str(test), max_seq_length=64),
    )
    return path


def test_sft_lowers_held_out_nll(sft_run, tiny_model_dir, synthetic_data):
    before = _held_out_nll(tiny_model_dir, synthetic_data[1])
    after = _held_out_nll(sft_run, synthetic_data[1])
    assert after < before - 0.5, (before, after)
    rows = read_metrics(sft_run)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["training_step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert [r["training_step"] for r in rows if "train_loss" in r] == [5, 10, 15, 20, 25, 30]


def test_sft_checkpoint_feeds_run_dpo(sft_run, synthetic_data, tmp_path):
    path = run_dpo(
        sft_run,
        TrainingConfig(
            output_dir=str(tmp_path / "dpo"),
            batch_size=8,
            micro_batch_size=8,
            learning_rate=1e-3,
            max_steps=2,
            log_every=1,
        ),
        DPOConfig(beta=1.0, max_length=32, max_prompt_length=32, reference_cache_dir=str(tmp_path / "c")),
        PreferenceDatasetConfig(str(synthetic_data[0]), amount=32),
    )
    rows = read_metrics(path)
    assert [r["training_step"] for r in rows] == [1, 2]
    assert rows[0]["train_loss"] == pytest.approx(0.693147, abs=1e-4)  # policy == reference at step 1
    assert json.loads((path / "run_config.json").read_text())["model_name_or_path"] == str(sft_run)


def _finetune_cli(args, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "open_instruct.finetune", *args],
        cwd=ROOT,
        env=cli_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_finetune_cli_trains_and_rejects_dpo_flags(tiny_model_dir, synthetic_data, tmp_path):
    base = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--mixer_list",
        str(synthetic_data[0]),
        "32",
        "--max_seq_length",
        "64",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    bad = _finetune_cli(base + ["--beta", "0.2"], tmp_path)
    assert bad.returncode == 2 and "--beta: DPO-only flag(s), not used by supervised fine-tuning" in bad.stderr
    ok = _finetune_cli(base + ["--eval_fraction", "0.25", "--logging_steps", "1"], tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    rows = read_metrics(tmp_path / "out")
    assert [r["training_step"] for r in rows if "train_loss" in r] == [1, 2, 3]  # 24 of 32 for training, 8 a step
    assert [r["training_step"] for r in rows if "eval/loss" in r] == [3]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())  # the run summary names the stage's own
    assert (
        summary["stage"] == "sft" and summary["steps"] == {"done": 3, "total": 3} and "data" in summary["wall_seconds"]
    )
    assert list(summary["eval"]) == ["loss"] and summary["eval"]["loss"]["final"] == rows[-1]["eval/loss"]
    assert (
        " -m open_instruct.finetune " in summary["commands"]["resume"] and "--dry_run" in summary["commands"]["plan"]
    )


def test_sft_bad_rows_name_file_and_row(tiny_model_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
        + "\n"
        + json.dumps({"messages": "oops"})
        + "\n"
    )
    with pytest.raises(UserError, match=r"chat.jsonl: row 2: .*field 'messages' must be a non-empty list"):
        run_sft(tiny_model_dir, TrainingConfig(output_dir=str(tmp_path / "o")), SFTDatasetConfig(str(data)))
