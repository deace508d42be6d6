"""The tiny Llama, padded batch and error measure the log-prob tests share (test_logprobs, test_precision,
test_gpu_paths and the interpreted-Liger script liger_interpreted.py)."""

from __future__ import annotations

from typing import Any

import torch

from open_instruct.data.tokenize import IGNORE_INDEX

VOCAB = 97
# 2 layers, grouped-query attention, untied head (so both embeddings get their own gradient)
TINY_LLAMA = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
}


def tiny_llama(attn: str | None = None, **overrides: Any) -> Any:
    """A Llama initialised from seed 0 in fp32, in training mode: ``TINY_LLAMA`` with ``overrides``; ``attn`` sets
    the attention implementation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    if attn is not None:
        config._attn_implementation = attn
    return LlamaForCausalLM(config).float()


def padded_rows() -> dict[str, torch.Tensor]:
    """Four right-padded rows ``[4, 12]`` (lengths 12, 7, 10, 9) of seeded ids, labels after a 3-token prompt."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, 12), generator=g)
    attention = (torch.arange(12) < torch.tensor([12, 7, 10, 9])[:, None]).long()
    labels = torch.where((torch.arange(12) >= 3) & (attention == 1), ids, IGNORE_INDEX)
    return {"input_ids": ids * attention, "attention_mask": attention, "labels": labels}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in fp64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
