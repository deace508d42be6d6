"""Helpers for the data tests and the data benchmark: the real HH sample and a small BPE tokenizer trained on it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# 411 real HH-RLHF rows shipped with the tests (MIT, see tests/fixtures/NOTICE): nothing outside the repo is read.
HH_SAMPLE = ROOT / "tests" / "fixtures" / "hh_rlhf_sample.jsonl.gz"
SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|im_start|>", "<|im_end|>"]


def read_hh_rows(path: Path = HH_SAMPLE) -> list[dict[str, Any]]:
    """The raw HH rows, read directly (independent of the project's loaders)."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 4000, eos_token: str = "</s>") -> Any:
    """A byte-level BPE fast tokenizer (GPT-2 style pre-tokenization) trained on ``texts``, with our special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token=eos_token,
        pad_token="<pad>",
        additional_special_tokens=[t for t in SPECIAL[3:] if t != eos_token],
    )


def random_pair_records(
    n: int, seed: int, vocab: int, prompt_lengths: tuple[int, int], reply_lengths: tuple[int, int], low: int = 3
) -> list[dict[str, Any]]:
    """``n`` tokenized pairs of random ids in ``[low, vocab)``: a prompt shared by both sides (labels -100), then each
    side's reply; lengths drawn uniformly from the (inclusive) ranges, in the order prompt, chosen, rejected."""
    import random

    rng = random.Random(seed)
    records = []
    for i in range(n):
        prompt = [rng.randrange(low, vocab) for _ in range(rng.randint(*prompt_lengths))]
        record: dict[str, Any] = {"index": i}
        for side in ("chosen", "rejected"):
            reply = [rng.randrange(low, vocab) for _ in range(rng.randint(*reply_lengths))]
            record[f"{side}_input_ids"] = prompt + reply
            record[f"{side}_labels"] = [-100] * len(prompt) + reply
        records.append(record)
    return records


GPT2_EOS = "<|endoftext|>"


def write_gpt2_style_tokenizer(folder: Path, texts: list[str], vocab_size: int = 1000) -> Path:
    """A stand-in for the hub's ``gpt2`` tokenizer, built here (no download): byte-level BPE trained on ``texts``,
    ``<|endoftext|>`` its only special token (BOS, EOS and UNK, as GPT-2's), no pad token and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[GPT2_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS
    )
    assert not tokenizer.chat_template and tokenizer.pad_token is None
    tokenizer.save_pretrained(folder)
    return folder


def write_gpt2_style_model(folder: Path, texts: list[str], vocab_size: int = 1000, seed: int = 0) -> Path:
    """A randomly initialised tiny Llama (2 layers, width 64) beside the template-less GPT-2-style tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(write_gpt2_style_tokenizer(folder, texts, vocab_size))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder
