"""Pretraining from scratch: text loading and packing, the .pt checkpoint format, the stage itself and its CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from open_instruct.api import TrainingConfig
from open_instruct.data.text import load_documents, pack_blocks
from open_instruct.errors import UserError
from open_instruct.model.scratch import ModelConfig
from tests.conftest import ROOT, cli_env, read_metrics

TINY = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, max_seq_len=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(train.txt, test.txt, tokenizer folder) of the embedded text."""
    from open_instruct.data.synthetic import write_text_corpus, write_tokenizer

    folder = tmp_path_factory.mktemp("corpus")
    train, test = write_text_corpus(folder / "text", n_train=600, n_test=100, seed=0)
    return train, test, write_tokenizer(folder / "tokenizer")


def test_pack_blocks_joins_documents_with_eos_and_drops_the_tail(corpus):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(corpus[2])
    docs = ["cat dog", "count up from 1 to 3 : 1 2 3", "lion"]
    records, stats = pack_blocks(docs, tokenizer, block_size=4)
    stream = []
    for doc in docs:  # independent: word-level tokenizer, one id per word
        stream += [tokenizer.convert_tokens_to_ids(w) for w in doc.split()] + [tokenizer.eos_token_id]
    assert [r["input_ids"] for r in records] == [stream[0:4], stream[4:8], stream[8:12], stream[12:16]]
    assert stats["dropped_tail_tokens"] == len(stream) - 16 and all(r["labels"] == r["input_ids"] for r in records)


def test_text_sources_and_their_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    assert load_documents(str(tmp_path / "a.txt"), "train", "text") == ["first doc", "second doc"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x y"}) + "\n" + json.dumps({"content": "z"}) + "\n")
    with pytest.raises(UserError, match=r"b.jsonl: row 2: field 'text' must be a string, is missing"):
        load_documents(str(tmp_path / "b.jsonl"), "train", "text")
    with pytest.raises(UserError, match=r"text file not found: .*missing.txt"):
        load_documents(str(tmp_path / "missing.txt"), "train", "text")


def test_model_config_problems_are_named():
    from open_instruct.data.synthetic import build_tokenizer

    with pytest.raises(UserError, match=r"hidden_size 65 is not a multiple of num_heads 4"):
        ModelConfig(hidden_size=65, num_heads=4).to_transformers(build_tokenizer())
    config = TINY.to_transformers(build_tokenizer())
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (2, 64, 2)
    assert config.vocab_size == len(build_tokenizer()) and config.max_position_embeddings == 32


def test_pt_checkpoint_carries_config_and_tokenizer(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from open_instruct.model.state_dict import load_pt_checkpoint, state_dict_to_folder, write_pt_checkpoint

    pt = write_pt_checkpoint(tiny_model_dir, tmp_path / "sft_final.pt", "some/tokenizer")
    model, tokenizer = load_pt_checkpoint(pt)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[2, 7, 9, 11, 13]])
    assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert torch.load(pt, weights_only=True)["tokenizer_name"] == "some/tokenizer"
    bare = tmp_path / "bare.pt"
    torch.save(original.state_dict(), bare)
    with pytest.raises(UserError, match=r"bare state dict, so it also needs a tokenizer .* carries both"):
        state_dict_to_folder(str(bare), None, None, tmp_path / "rebuilt")


def _held_out_perplexity(checkpoint, test_file, tokenizer_dir, block: int) -> float:
    """Independent: plain cross-entropy of the model over the packed held-out blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    stream = []
    for line in test_file.read_text().splitlines():
        stream += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = torch.tensor([stream[i : i + block] for i in range(0, len(stream) - block + 1, block)])
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    return math.exp(nll.item())


@pytest.mark.slow
def test_pretraining_lowers_held_out_perplexity_fourfold(corpus, tmp_path):
    """Stated margin: 30 steps on the embedded text cut held-out perplexity at least 4-fold (measured ~137 -> ~20)."""
    from open_instruct.api import run_training

    train, test, tokenizer = corpus
    config = TrainingConfig(
        dataset_name=str(train),
        eval_dataset_name=str(test),
        tokenizer_name=str(tokenizer),
        output_dir=str(tmp_path / "pretrain"),
        batch_size=16,
        micro_batch_size=16,
        learning_rate=3e-3,
        max_steps=30,
        warmup_steps=3,
        log_every=10,
        eval_every=30,
    )
    path = run_training(TINY, config)
    evals = [r for r in read_metrics(path) if "eval/perplexity" in r]
    assert [r["training_step"] for r in evals] == [0, 30]
    before, after = evals[0]["eval/perplexity"], evals[-1]["eval/perplexity"]
    assert after < before / 4, (before, after)
    assert after == pytest.approx(_held_out_perplexity(path, test, tokenizer, 32), rel=1e-4)
    run_config = json.loads((path / "run_config.json").read_text())
    assert run_config["stage"] == "pretrain" and run_config["max_seq_length"] == 32


@pytest.mark.slow
def test_pretraining_resumes_exactly(corpus, tmp_path, capsys):
    """Drop the last checkpoint, rerun: it resumes from step 2 and lands on the same final weights."""
    import shutil

    from safetensors.torch import load_file

    from open_instruct.api import run_training

    train, _, tokenizer = corpus
    config = TrainingConfig(
        dataset_name=str(train),
        tokenizer_name=str(tokenizer),
        output_dir=str(tmp_path / "run"),
        batch_size=8,
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        max_steps=4,
        save_every=2,
        log_every=1,
    )
    path = run_training(TINY, config)
    first = load_file(path / "model.safetensors")
    shutil.rmtree(path / "step_4")
    capsys.readouterr()
    run_training(TINY, config)
    assert "resumed at optimizer step 2" in capsys.readouterr().out
    second = load_file(path / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert [r["training_step"] for r in read_metrics(path) if "train_loss" in r] == [1, 2, 3, 4]


def test_pretrain_cli_rejects_bad_input_before_work(corpus, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "open_instruct.pretrain", "--model_name_or_path", str(tmp_path / "missing_config")]
        + ["--tokenizer_name_or_path", str(corpus[2]), "--mixer_list", str(corpus[0]), "1.0", "--beta", "0.5"],
        cwd=ROOT,
        env=cli_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "error: --beta: not used by pretraining" in result.stderr


def test_training_config_save_format_and_eval_settings(tmp_path):
    from open_instruct.api import SFTDatasetConfig, dataset_arguments, training_arguments

    with pytest.raises(UserError, match=r"save_format must be 'hf' .* or 'pt' .*, got 'safetensors'"):
        training_arguments(TrainingConfig(save_format="safetensors"))
    with pytest.raises(UserError, match=r"save_format='pt' writes full weights; a LoRA run saves an adapter"):
        training_arguments(TrainingConfig(save_format="pt", extra={"use_lora": True}))
    # TrainingConfig's evaluation set applies when the stage's dataset config names none (and only then).
    train = TrainingConfig(output_dir=str(tmp_path), eval_dataset_name="/data/test.jsonl", eval_every=5)
    values = dataset_arguments(SFTDatasetConfig("/data/train.jsonl"), train, "SFT")
    assert values["eval_mixer_list"] == ["/data/test.jsonl", "1.0"]
    own = dataset_arguments(SFTDatasetConfig("/data/train.jsonl", eval_fraction=0.1), train, "SFT")
    assert "eval_mixer_list" not in own and own["eval_fraction"] == 0.1


@pytest.mark.slow
def test_pretrain_cli_trains_from_a_config_folder(corpus, tmp_path):
    """``python -m open_instruct.pretrain``: architecture from a config.json folder, text from a .txt file."""
    from transformers import AutoModelForCausalLM

    from open_instruct.data.synthetic import build_tokenizer
    from open_instruct.model.scratch import write_config_folder

    config = write_config_folder(TINY.to_transformers(build_tokenizer()), tmp_path / "arch")
    result = subprocess.run(
        [sys.executable, "-m", "open_instruct.pretrain", "--model_name_or_path", str(config)]
        + ["--tokenizer_name_or_path", str(corpus[2]), "--mixer_list", str(corpus[0]), "1.0"]
        + ["--eval_mixer_list", str(corpus[1]), "1.0", "--eval_steps", "3", "--max_seq_length", "32"]
        + ["--max_train_steps", "3", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3"]
        + ["--output_dir", str(tmp_path / "out")],
        cwd=ROOT,
        env=cli_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^eval step=3 loss=[\d.]+ perplexity=[\d.]+$", result.stdout, re.M), result.stdout[-2000:]
    rows = read_metrics(tmp_path / "out")
    assert [r["training_step"] for r in rows if "eval/loss" in r] == [0, 3]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    best = min((r["eval/loss"], r["training_step"]) for r in rows if "eval/loss" in r)
    assert summary["stage"] == "pretrain" and summary["ended"]["status"] == "finished"
    assert (summary["eval"]["loss"]["best"], summary["eval"]["loss"]["best_step"]) == best
    assert summary["commands"]["plan"] is None and " -m open_instruct.pretrain " in summary["commands"]["resume"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 2
