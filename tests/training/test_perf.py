"""The FLOP count behind ``perf/mfu_step`` against two independent counts.

1. By hand from a Llama config: every projection (q, k, v with grouped KV heads, o, gate/up/down), the LM head at every
   token, and attention's two ``L x L`` matmuls per layer (scores and weighted sum, no causal halving), times 3 for
   forward + backward.
2. Measured: torch's own FlopCounterMode over a real forward + backward of a tiny Llama (eager attention, so the full
   score matrix is one matmul it can see).
And, for a dense model at short sequences, against the ``6 N tokens`` rule of thumb.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from open_instruct.training.perf import FlopCounter, matmul_parameters

LLAMA_1B = dict(  # Llama-3.2-1B's shape
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


def by_hand(shape: dict, lengths: list[int]) -> float:
    """Forward + backward matmul FLOPs of training on sequences of these lengths, from the shape alone."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    per_token_forward = (
        layers * (2 * h * h + 2 * 2 * h * kv + 2 * h * h + 3 * 2 * h * inter) + 2 * h * shape["vocab_size"]
    )
    attention_forward = [layers * 2 * (2 * length * length * h) for length in lengths]  # QK^T and AV
    return 3 * (per_token_forward * sum(lengths) + sum(attention_forward))


def norm_parameters(shape: dict) -> int:
    """RMSNorm weights (2 per layer + the final one): in ``N`` by PaLM's convention, though no matmul uses them."""
    return (2 * shape["num_hidden_layers"] + 1) * shape["hidden_size"]


def flops_of(model, lengths: list[int]) -> float:
    batch = {"attention_mask": torch.stack([(torch.arange(max(lengths)) < n).long() for n in lengths])}
    return FlopCounter(model)(batch)


@pytest.mark.parametrize("lengths", [[2048], [4096, 1000, 17]])
def test_llama_1b_count_matches_the_hand_count(lengths):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B))
    expected = by_hand(LLAMA_1B, lengths) + 6 * norm_parameters(LLAMA_1B) * sum(lengths)
    assert flops_of(model, lengths) == pytest.approx(expected, rel=1e-12)
    assert 1.23e9 < matmul_parameters(model) < 1.24e9  # 1.236B: the tied head counts, the lookup does not


def test_count_under_zero3_partitioning_uses_the_full_sizes():
    """ZeRO-3 loads the model partitioned: each parameter an empty placeholder carrying its size as ``ds_numel``."""
    config = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": 2})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = matmul_parameters(model)
    for param in model.parameters():
        param.ds_numel = param.numel()
        param.data = torch.empty(0, device="meta")
    assert model.model.embed_tokens.weight.numel() == 0
    assert matmul_parameters(model) == expected


@pytest.mark.parametrize("tied", [False, True])
def test_count_matches_torch_flop_counter_on_a_real_step(tied):
    from torch.utils.flop_counter import FlopCounterMode

    shape = {**TINY, "tie_word_embeddings": tied}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="eager")).float()
    length = 24
    ids = torch.randint(0, shape["vocab_size"], (1, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    measured = counter.get_total_flops()
    assert measured == by_hand(shape, [length])
    assert flops_of(model, [length]) == measured + 6 * norm_parameters(shape) * length


def test_dense_model_at_short_sequences_is_6_n_tokens():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B))
    n, tokens = matmul_parameters(model), 128 * 64
    flops = flops_of(model, [64] * 128)
    attention = 12 * LLAMA_1B["num_hidden_layers"] * LLAMA_1B["hidden_size"] * 64 * 64 * 128
    assert flops == pytest.approx(6 * n * tokens + attention, rel=1e-12)
    assert flops == pytest.approx(6 * n * tokens, rel=0.005)  # attention is 0.34% at 64 tokens for a 1B model


@pytest.mark.parametrize("lengths", [[2048], [4096, 1000, 17]])
def test_causal_count_halves_attention_only(lengths):
    from open_instruct.training.perf import training_flops

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B))
    n, layers, hidden = matmul_parameters(model), LLAMA_1B["num_hidden_layers"], LLAMA_1B["hidden_size"]
    attention_by_hand = 3 * sum(layers * 2 * (2 * n_tok * n_tok * hidden) for n_tok in lengths)  # as by_hand counts it
    full = training_flops(n, layers, hidden, torch.tensor(lengths))
    causal = training_flops(n, layers, hidden, torch.tensor(lengths), causal=True)
    assert full - causal == pytest.approx(attention_by_hand / 2, rel=1e-12)
