"""Which pairs form each micro-batch, and in which order: length-grouped and token-budget batching.

Every order here is a pure function of ``(seed, epoch)``: a resumed run that skips the batches it already did sees
exactly the batches the uninterrupted run would have seen.
- ``group_by_length``: fixed-size batches of similar length. Pairs are shuffled, cut into mega-batches of
  ``batch_size * mega_batches`` pairs, sorted by length inside each, cut into batches; the batches are shuffled again,
  so batch order is random while each batch is tight.
- token budget: batches filled greedily, in length order, up to ``max_tokens`` (packed: total tokens; padded: rows x
  the longest sequence). Their composition depends on the seed only (so their number is fixed for every epoch); their
  order is reshuffled per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from open_instruct.data.collate import PackedPairCollator, PaddedPairCollator, SharedPromptPairCollator
from open_instruct.errors import UserError


def pair_lengths(records: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(chosen lengths, rejected lengths) in tokens, one per record (from the offsets of an Arrow-backed table)."""
    if hasattr(records, "lengths"):
        return records.lengths("chosen_input_ids").tolist(), records.lengths("rejected_input_ids").tolist()
    return [len(r["chosen_input_ids"]) for r in records], [len(r["rejected_input_ids"]) for r in records]


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def _permutation(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, mega_batches: int = 50
) -> list[list[int]]:
    """Batches of ``batch_size`` indices of similar ``lengths``, in a shuffled order (pure function of seed, epoch)."""
    generator = _generator(seed, epoch)
    order = _permutation(len(lengths), generator)
    span = batch_size * mega_batches
    batches = []
    for start in range(0, len(order), span):
        mega = sorted(order[start : start + span], key=lambda i: -lengths[i])  # stable: ties keep the random order
        batches.extend(mega[i : i + batch_size] for i in range(0, len(mega), batch_size))
    return [batches[i] for i in _permutation(len(batches), generator)]


def batch_cost(chosen: list[int], rejected: list[int], batch: list[int], packed: bool) -> int:
    """Tokens a batch occupies: real tokens when packed, ``2B x`` the longest sequence when padded."""
    if packed:
        return sum(chosen[i] + rejected[i] for i in batch)
    return 2 * len(batch) * max(max(chosen[i], rejected[i]) for i in batch)


def token_budget_batches(
    chosen: list[int], rejected: list[int], max_tokens: int, seed: int, packed: bool, max_pairs: int | None = None
) -> list[list[int]]:
    """Batches whose :func:`batch_cost` stays within ``max_tokens`` (fixed for a seed); order not yet shuffled."""
    single = [batch_cost(chosen, rejected, [i], packed) for i in range(len(chosen))]
    too_long = [i for i, cost in enumerate(single) if cost > max_tokens]
    if too_long:
        i = too_long[0]
        raise UserError(
            f"--max_tokens_per_batch {max_tokens} is below the {single[i]} tokens of pair {i} "
            f"({len(too_long)} pairs exceed it); raise it or lower --max_seq_length"
        )
    shuffled = _permutation(len(chosen), _generator(seed, -1))
    order = sorted(shuffled, key=lambda i: -single[i])
    batches, current = [], []
    for i in order:
        full = max_pairs is not None and len(current) >= max_pairs
        if current and (full or batch_cost(chosen, rejected, current + [i], packed) > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class PairBatchSampler:
    """A batch sampler (lists of record positions) for ``DataLoader(batch_sampler=...)``; call ``set_epoch`` per epoch."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        seed: int,
        batch_size: int,
        max_tokens: int | None = None,
        group_by_length: bool = False,
        packed: bool = False,
        shuffle: bool = True,
    ) -> None:
        self.chosen, self.rejected = pair_lengths(records)
        # What a pair costs: its real tokens when packed, its longer side when padded (rows pad to the longest).
        self.lengths = [c + r if packed else max(c, r) for c, r in zip(self.chosen, self.rejected)]
        # Not named batch_size: accelerate's sharding then treats batches as variable-length lists, which they are.
        self.seed, self.pairs_per_batch, self.max_tokens = seed, batch_size, max_tokens
        self.group_by_length, self.shuffle, self.epoch = group_by_length, shuffle, 0
        self.budget_batches = (
            token_budget_batches(self.chosen, self.rejected, max_tokens, seed, packed)
            if max_tokens is not None
            else None
        )
        self.sampler = self  # accelerate forwards set_epoch to `<batch sampler>.sampler` when it shards batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`batches` returns."""
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch``, in order."""
        n = len(self.lengths)
        if self.budget_batches is not None:
            if not self.shuffle:
                return self.budget_batches
            return [
                self.budget_batches[i] for i in _permutation(len(self.budget_batches), _generator(self.seed, epoch))
            ]
        if self.group_by_length and self.shuffle:
            return length_grouped_batches(self.lengths, self.pairs_per_batch, self.seed, epoch)
        order = _permutation(n, _generator(self.seed, epoch)) if self.shuffle else list(range(n))
        return [order[i : i + self.pairs_per_batch] for i in range(0, n, self.pairs_per_batch)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        if self.budget_batches is not None:
            return len(self.budget_batches)
        return (len(self.lengths) + self.pairs_per_batch - 1) // self.pairs_per_batch


def pair_dataloader(
    records: list[dict[str, Any]],
    pad_token_id: int,
    batch_size: int,
    seed: int,
    packing: bool = False,
    max_tokens: int | None = None,
    group_by_length: bool = False,
    shuffle: bool = True,
    share_prompt: bool = False,
) -> Any:
    """The DataLoader for ``records``: padded or packed batches (``share_prompt``: each pair's common prefix once),
    plain, length-grouped or token-budget order."""
    collate = PaddedPairCollator(pad_token_id)
    if packing:
        collate = SharedPromptPairCollator() if share_prompt else PackedPairCollator()
    if max_tokens is None and not group_by_length:
        # The plain order stays accelerate's seedable shuffle, identical to runs without these flags.
        return DataLoader(records, batch_size=batch_size, shuffle=shuffle, collate_fn=collate)
    sampler = PairBatchSampler(records, seed, batch_size, max_tokens, group_by_length, packing, shuffle)
    return DataLoader(records, batch_sampler=sampler, collate_fn=collate)


def real_rows_fn(loader: Any, num_processes: int, process_index: int) -> Any:
    """``(epoch, position of a micro-batch on this rank) -> how many of its leading rows are real examples``.

    ``loader`` is the DataLoader before the engine shards it. Several processes get even numbers of equal micro-batches
    from accelerate: global batch ``j`` goes to rank ``j % W`` as its ``j // W``-th; the last short batch is filled up
    to size with examples from the epoch's start, and missing batches are copies of its first batches (variable-size
    batches are never filled, only copied). Those repeats come last, so the count is a pure function of the sampler:
    no pair is counted twice or dropped, and a resumed run (which skips micro-batches) counts as the original did.
    """
    sampler = loader.batch_sampler
    fixed = getattr(sampler, "batch_size", None)
    if fixed is None and not hasattr(sampler, "batches"):
        raise TypeError(f"cannot tell the padded rows of batches from {type(sampler).__name__}")
    total, sizes_of = len(loader.dataset), {}

    def real_rows(epoch: int, position: int) -> int:
        j = position * num_processes + process_index
        if fixed is not None:
            return max(0, min(fixed, total - j * fixed))
        if epoch not in sizes_of:  # one epoch's batch sizes, computed once
            sizes_of.clear()
            sizes_of[epoch] = [len(batch) for batch in sampler.batches(epoch)]
        sizes = sizes_of[epoch]
        return sizes[j] if j < len(sizes) else 0

    return real_rows
