"""Packed (padding-free) batches: layout, per-sequence log-probs equal to the padded path, CLI runs, MFU arithmetic."""

from __future__ import annotations

import math
import random

import pytest
import torch

from open_instruct.data.collate import PackedPairCollator, PaddedPairCollator
from open_instruct.data.tokenize import IGNORE_INDEX
from open_instruct.model.packing import (
    VARLEN_SDPA,
    packed_attention_implementation,
    packed_sequence_logprobs,
    prepare_model_for_packing,
)
from open_instruct.objectives.logprobs import sequence_logprobs
from open_instruct.training.perf import (
    PEAK_BF16_FLOPS,
    FlopCounter,
    matmul_parameters,
    mfu,
    peak_flops,
    training_flops,
)
from tests.conftest import read_metrics, run_cli, small_run_args


def pair_record(index: int, prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
    """A tokenized pair: the prompt (ignored labels) then each reply (its own labels)."""
    record: dict = {"index": index}
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        record[f"{side}_input_ids"] = prompt + reply
        record[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + reply
    return record


def random_records(n: int, vocab: int, seed: int) -> list[dict]:
    """Pairs of uneven lengths with a prompt (ignored labels) of 2-6 tokens."""
    rng = random.Random(seed)

    def tokens(low: int, high: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(rng.randint(low, high))]

    return [pair_record(i, tokens(2, 6), tokens(1, 25), tokens(1, 25)) for i in range(n)]


@pytest.fixture(scope="module")
def records(tiny_model_dir):
    from transformers import AutoConfig

    return random_records(5, AutoConfig.from_pretrained(tiny_model_dir).vocab_size, seed=3)


def load(tiny_model_dir, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32)


def test_packed_layout(records):
    batch = PackedPairCollator()(records)
    sequences = [r["chosen_input_ids"] for r in records] + [r["rejected_input_ids"] for r in records]
    lengths = [len(s) for s in sequences]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["cu_seq_lens"].tolist() == [0] + list(torch.tensor(lengths).cumsum(0).tolist())
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert int(batch["max_length"]) == max(lengths)
    for k, (start, length) in enumerate(zip(batch["cu_seq_lens"][:-1].tolist(), lengths)):
        assert batch["input_ids"][0, start : start + length].tolist() == sequences[k]
        assert batch["position_ids"][0, start : start + length].tolist() == list(range(length))
        assert batch["sequence_ids"][0, start : start + length].eq(k).all()
        assert batch["labels"][0, start] == IGNORE_INDEX  # no target crosses into this sequence
    assert batch["attention_mask"].sum() == sum(lengths)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("impl", ["chunked", "full"])
def test_packed_logprobs_equal_padded(tiny_model_dir, records, attn, impl):
    """Per-sequence sums, counts and gradients of the packed path equal the padded path's (fp32, 1e-5)."""
    model = load(tiny_model_dir, attn)
    padded = PaddedPairCollator(pad_token_id=0)(records)
    expected = sequence_logprobs(model, padded["input_ids"], padded["attention_mask"], padded["labels"], impl="full")
    expected.sums.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    assert prepare_model_for_packing(model) == VARLEN_SDPA
    packed = packed_sequence_logprobs(model, PackedPairCollator()(records), impl=impl, chunk_size=7)
    torch.testing.assert_close(packed.sums, expected.sums, atol=1e-5, rtol=1e-5)
    assert packed.counts.tolist() == expected.counts.tolist()
    packed.sums.sum().backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_position_ids_alone_do_not_isolate(tiny_model_dir, records):
    """The check above can fail: a plain sdpa forward of the packed row (restarting positions, 2D mask) mixes sequences."""
    model = load(tiny_model_dir, "sdpa")
    padded = PaddedPairCollator(pad_token_id=0)(records)
    expected = sequence_logprobs(model, padded["input_ids"], padded["attention_mask"], padded["labels"], impl="full")
    batch = PackedPairCollator()(records)
    leaky = sequence_logprobs(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        impl="full",
        position_ids=batch["position_ids"],
    )
    assert abs(float(leaky.sums.sum() - expected.sums.sum())) > 1e-3


def test_attention_choice():
    assert packed_attention_implementation("flash_attention_2") == "flash_attention_2"
    assert packed_attention_implementation("sdpa") == VARLEN_SDPA
    assert packed_attention_implementation("eager") == VARLEN_SDPA


@pytest.mark.slow
def test_cli_packed_run_matches_padded(tiny_model_dir, synthetic_data, tmp_path):
    """The default (packed on CPU) trains the same model as --packing false: same batches, same losses at every step."""
    train, _ = synthetic_data
    runs, stdout = {}, {}
    for name, extra in (("padded", ["--packing", "false"]), ("packed", ["--reference_batch_size", "32"])):
        out = tmp_path / name
        result = run_cli(
            small_run_args(tiny_model_dir, train, out, max_train_steps="4") + extra, tmp_path / f"c{name}"
        )
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name], stdout[name] = read_metrics(out), result.stdout
    assert "batching: packed rows, attention sdpa_varlen (default on cpu: proven equal" in stdout["packed"]
    assert "batching: padded rows, attention sdpa (--packing false)" in stdout["padded"]
    assert len(runs["packed"]) == len(runs["padded"]) == 4
    for a, b in zip(runs["padded"], runs["packed"]):
        for key in ("train_loss", "logps/chosen", "logps/rejected", "rewards/margin"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), (key, a[key], b[key])
        assert a["token_count"] == b["token_count"]  # both count real tokens only
        assert "perf/mfu_step" not in b  # CPU: no peak to divide by


@pytest.mark.slow
def test_cli_token_budget_too_small(tiny_model_dir, synthetic_data, tmp_path):
    train, _ = synthetic_data
    result = run_cli(
        small_run_args(tiny_model_dir, train, tmp_path / "o", max_tokens_per_batch="5") + ["--packing"], tmp_path / "c"
    )
    assert result.returncode == 2
    assert "--max_tokens_per_batch 5 is below" in result.stderr


def test_gradient_checkpointing_alias(tiny_model_dir):
    from open_instruct.config import TrainArguments
    from open_instruct.model.modeling import load_model, load_tokenizer
    from open_instruct.settings import ModelSettings

    for kwargs, expected in (
        ({"activation_memory_budget": 0.5}, True),
        ({"gradient_checkpointing": True}, True),
        ({}, False),
    ):
        args = TrainArguments(model_name_or_path=str(tiny_model_dir), reference_logprobs_cache_path="unused", **kwargs)
        settings = ModelSettings.of(args)
        model = load_model(settings, load_tokenizer(settings))
        assert model.is_gradient_checkpointing is expected, kwargs


def test_training_flops_by_hand(tiny_model_dir, records):
    model = load(tiny_model_dir, "sdpa")
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - c.vocab_size * c.hidden_size  # untied: all but the embedding
    assert matmul_parameters(model) == n
    batch = PackedPairCollator()(records)
    lengths = [len(r["chosen_input_ids"]) for r in records] + [len(r["rejected_input_ids"]) for r in records]
    expected = sum(6 * n * L + 12 * c.num_hidden_layers * c.hidden_size * L * L for L in lengths)
    assert FlopCounter(model)(batch) == pytest.approx(expected)
    padded = PaddedPairCollator(0)(records)
    assert FlopCounter(model)(padded) == pytest.approx(expected)  # padding is not model work
    assert training_flops(10, 1, 2, torch.tensor([3])) == 6 * 10 * 3 + 12 * 2 * 9
    assert mfu(989e12, 2.0, PEAK_BF16_FLOPS["H200"], world_size=1) == pytest.approx(0.5)
    assert peak_flops("cpu") is None
