"""Prompt-sharing packed rows: each pair's common prefix computed once. Log-probs and every gradient equal the padded
path's, for prompts of every shape (none shared, replies that begin alike, a reply that is a prefix of the other)."""

from __future__ import annotations

import random

import pytest
import torch

from open_instruct.data.collate import PaddedPairCollator, SharedPromptPairCollator, shared_prefix_length
from open_instruct.data.tokenize import IGNORE_INDEX
from open_instruct.model.packing import packed_sequence_logprobs, prepare_model_for_packing
from open_instruct.objectives.logprobs import sequence_logprobs
from tests.model.test_packing import load, pair_record


def awkward_records(vocab: int, seed: int) -> list[dict]:
    """Pairs that stress the layout: a long shared prompt, replies that begin with the same tokens (shared beyond the
    prompt), no common token at all, a reply that is the other's prefix, and one-token replies."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    prompt, common = tokens(9), tokens(3)
    shapes = [
        (prompt, tokens(7), tokens(12)),
        (prompt[:4], common + tokens(5), common + tokens(2)),  # replies begin alike: their labels are shared too
        ([], [1] + tokens(6), [2] + tokens(4)),  # nothing in common
        (prompt[:2], common, common + tokens(4)),  # the chosen reply is a prefix of the rejected one
        (prompt, tokens(1), tokens(1)),
    ]
    return [pair_record(i, *shape) for i, shape in enumerate(shapes)]


@pytest.fixture(scope="module")
def records(tiny_model_dir):
    from transformers import AutoConfig

    return awkward_records(AutoConfig.from_pretrained(tiny_model_dir).vocab_size, seed=5)


def test_shared_prefix_length():
    assert shared_prefix_length([1, 2, 3, 4], [1, 2, 5]) == 2
    assert shared_prefix_length([1, 2], [1, 2, 3]) == 1  # each side keeps a token of its own
    assert shared_prefix_length([7, 1], [8, 1]) == 0


def test_layout(records):
    """Each pair appears once: prefix, chosen rest, rejected rest, with positions continuing the prefix's."""
    batch = SharedPromptPairCollator()(records)
    starts = batch["cu_seq_lens"].tolist()
    for i, r in enumerate(records):
        chosen, rejected = r["chosen_input_ids"], r["rejected_input_ids"]
        p = shared_prefix_length(chosen, rejected)
        segment = batch["input_ids"][0, starts[i] : starts[i + 1]].tolist()
        assert segment == chosen + rejected[p:]
        positions = batch["position_ids"][0, starts[i] : starts[i + 1]].tolist()
        assert positions == list(range(len(chosen))) + list(range(p, len(rejected)))
        assert (int(batch["prompt_lens"][i]), int(batch["chosen_lens"][i])) == (p, len(chosen))
    real = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in records)
    assert batch["input_ids"].shape[1] == real - int(batch["prompt_lens"].sum())
    # every label token appears once per sequence, predicted by a position inside its own pair's segment
    labels = [sum(t != IGNORE_INDEX for t in r[f"{s}_labels"][1:]) for s in ("chosen", "rejected") for r in records]
    assert torch.bincount(batch["target_seq"], minlength=2 * len(records)).tolist() == labels


@pytest.mark.parametrize("impl", ["chunked", "full"])
def test_logprobs_and_gradients_equal_padded(tiny_model_dir, records, impl):
    """Per-sequence sums, counts and every parameter's gradient equal the padded path's (fp32)."""
    model = load(tiny_model_dir, "sdpa")
    padded = PaddedPairCollator(pad_token_id=0)(records)
    expected = sequence_logprobs(model, padded["input_ids"], padded["attention_mask"], padded["labels"], impl="full")
    weights = torch.linspace(0.5, 1.5, expected.sums.shape[0])  # a different weight per sequence: no cancelling
    (expected.sums * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    prepare_model_for_packing(model)
    shared = packed_sequence_logprobs(model, SharedPromptPairCollator()(records), impl=impl, chunk_size=5)
    torch.testing.assert_close(shared.sums, expected.sums, atol=1e-5, rtol=1e-5)
    assert shared.counts.tolist() == expected.counts.tolist()
    (shared.sums * weights).sum().backward()
    assert grads
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_mask_matters(tiny_model_dir, records):
    """The check above can fail: if the rejected rest also saw the chosen rest, its log-probs would change."""
    import open_instruct.model.packing as packing

    model = load(tiny_model_dir, "sdpa")
    prepare_model_for_packing(model)
    batch = SharedPromptPairCollator()(records)
    honest = packed_sequence_logprobs(model, batch).sums
    leaky = dict(batch, chosen_lens=batch["prompt_lens"])  # nothing masked: plain causal attention over the segment
    leaked = packed_sequence_logprobs(model, leaky).sums
    half = len(records)
    torch.testing.assert_close(leaked[:half], honest[:half])  # the chosen side sees the same keys either way
    assert (leaked[half:] - honest[half:]).abs().max() > 1e-3
    assert packing.shares_prompt(batch)
