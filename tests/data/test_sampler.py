"""Length-grouped and token-budget batching: coverage, tightness, shuffling, determinism and resume exactness."""

from __future__ import annotations

import random

import pytest

from open_instruct.data.sampler import (
    PairBatchSampler,
    batch_cost,
    length_grouped_batches,
    pair_dataloader,
    token_budget_batches,
)
from open_instruct.errors import UserError


def fake_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c, r = rng.randint(5, 300), rng.randint(5, 300)
        out.append(
            {
                "index": i,
                "chosen_input_ids": [1] * c,
                "chosen_labels": [-100] + [1] * (c - 1),
                "rejected_input_ids": [2] * r,
                "rejected_labels": [-100] + [2] * (r - 1),
            }
        )
    return out


def padded_tokens(records, batches) -> int:
    chosen = [len(r["chosen_input_ids"]) for r in records]
    rejected = [len(r["rejected_input_ids"]) for r in records]
    return sum(batch_cost(chosen, rejected, b, packed=False) for b in batches)


def test_group_by_length_covers_tightens_and_shuffles():
    records = fake_records(1000)
    grouped = PairBatchSampler(records, seed=7, batch_size=8, group_by_length=True)
    plain = PairBatchSampler(records, seed=7, batch_size=8)
    batches = grouped.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert len(batches) == len(grouped) == 125
    # far less padding than random batches of the same size
    assert padded_tokens(records, batches) < 0.8 * padded_tokens(records, plain.batches(0))
    # batches are not in length order: the longest-first order of the groups is shuffled away
    longest = [max(grouped.lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)


def test_order_is_a_pure_function_of_seed_and_epoch():
    records = fake_records(300)
    a = PairBatchSampler(records, seed=3, batch_size=4, group_by_length=True)
    b = PairBatchSampler(records, seed=3, batch_size=4, group_by_length=True)
    assert a.batches(0) == b.batches(0) and a.batches(5) == b.batches(5)
    assert a.batches(0) != a.batches(1)
    assert a.batches(0) != PairBatchSampler(records, seed=4, batch_size=4, group_by_length=True).batches(0)
    # resume: a fresh sampler at epoch 1 yields exactly what the uninterrupted one yields after epoch 0
    a.set_epoch(0)
    list(a)
    a.set_epoch(1)
    resumed = PairBatchSampler(records, seed=3, batch_size=4, group_by_length=True)
    resumed.set_epoch(1)
    assert list(a) == list(resumed)
    assert length_grouped_batches(a.lengths, 4, 3, 1) == list(resumed)


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget(packed):
    records = fake_records(500, seed=1)
    sampler = PairBatchSampler(records, seed=2, batch_size=1, max_tokens=2400, packed=packed)
    batches = sampler.batches(0)
    chosen, rejected = sampler.chosen, sampler.rejected
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(batch_cost(chosen, rejected, b, packed) <= 2400 for b in batches)
    if packed:  # greedy filling in length order wastes little of the budget
        assert len(batches) <= 1.1 * sum(chosen[i] + rejected[i] for i in range(500)) / 2400 + 1
    assert sorted(map(sorted, batches)) == sorted(map(sorted, sampler.batches(3)))  # fixed composition
    assert batches != sampler.batches(3)  # reshuffled order
    assert len(sampler) == len(batches)


def test_token_budget_rejects_a_pair_over_budget():
    records = fake_records(20)
    with pytest.raises(UserError, match="--max_tokens_per_batch 50 is below"):
        token_budget_batches(
            [len(r["chosen_input_ids"]) for r in records],
            [len(r["rejected_input_ids"]) for r in records],
            50,
            seed=0,
            packed=True,
        )


def test_dataloader_packed_budget_batches():
    records = fake_records(64)
    loader = pair_dataloader(records, 0, batch_size=8, seed=0, packing=True, max_tokens=1500)
    seen = []
    for batch in loader:
        assert batch["input_ids"].shape[1] == int(batch["cu_seq_lens"][-1]) <= 1500
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(64))
