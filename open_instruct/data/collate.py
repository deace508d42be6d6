"""Batches of tokenized pairs for the model.

Padded batches hold chosen and rejected padded to one common length so they can run as one concatenated forward:
``input_ids``/``attention_mask``/``labels`` have shape ``[2B, L]``, rows ``0..B-1`` chosen and ``B..2B-1`` rejected.
Packed batches (``--packing``) hold the same ``2B`` sequences end to end in one row ``[1, T]`` without padding.
Prompt-sharing packed batches (``--share_prompt``) hold each pair once: the tokens its chosen and rejected sequences
begin with in common (the prompt), then the rest of the chosen, then the rest of the rejected.
"""

from __future__ import annotations

from typing import Any

import torch

from open_instruct.data.tokenize import IGNORE_INDEX


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class PaddedPairCollator:
    """Right-pads the chosen and rejected sequences of a batch of pairs to one length."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [r["chosen_input_ids"] for r in records] + [r["rejected_input_ids"] for r in records]
        labels = [r["chosen_labels"] for r in records] + [r["rejected_labels"] for r in records]
        length = max(len(s) for s in sequences)
        multiple = self.pad_to_multiple_of
        length = (length + multiple - 1) // multiple * multiple
        attention = [[1] * len(s) for s in sequences]
        return {
            "input_ids": _pad(sequences, length, self.pad_token_id),
            "attention_mask": _pad(attention, length, 0),
            "labels": _pad(labels, length, IGNORE_INDEX),
            "index": torch.tensor([r["index"] for r in records], dtype=torch.long),
        }


class PackedPairCollator:
    """Lays the chosen then the rejected sequences of a batch of pairs end to end in one row, without padding.

    Returns ``input_ids``/``labels``/``position_ids``/``sequence_ids`` ``[1, T]`` (T = total tokens; positions restart
    per sequence; the first label of each sequence is ignored so no target crosses a boundary), ``cu_seq_lens``
    ``[2B + 1]`` int32 cumulative lengths, ``max_length`` (longest sequence), ``attention_mask`` ones ``[1, T]`` (for
    token counting only: the packed forward passes the boundaries, never this mask) and ``index`` ``[B]``.
    """

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [r["chosen_input_ids"] for r in records] + [r["rejected_input_ids"] for r in records]
        labels = [r["chosen_labels"] for r in records] + [r["rejected_labels"] for r in records]
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
        flat_labels = []
        for row in labels:
            flat_labels.extend([IGNORE_INDEX] + list(row[1:]))
        return {
            "input_ids": torch.tensor([tok for s in sequences for tok in s], dtype=torch.long).unsqueeze(0),
            "labels": torch.tensor(flat_labels, dtype=torch.long).unsqueeze(0),
            "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0),
            "sequence_ids": torch.repeat_interleave(torch.arange(len(sequences)), lengths).unsqueeze(0),
            "cu_seq_lens": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32),
            "max_length": lengths.max(),
            "attention_mask": torch.ones(1, int(lengths.sum()), dtype=torch.long),
            "index": torch.tensor([r["index"] for r in records], dtype=torch.long),
        }


def shared_prefix_length(chosen: list[int], rejected: list[int]) -> int:
    """How many tokens both sequences begin with, leaving each at least one token of its own."""
    limit = min(len(chosen), len(rejected)) - 1
    n = 0
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    return n


def _targets(labels: list[int], start: int, position: Any) -> tuple[list[int], list[int]]:
    """(predicting positions, target tokens) of a sequence's labels: token ``t`` is predicted at ``position(t - 1)``."""
    where = [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
    return [start + position(t - 1) for t in where], [labels[t] for t in where]


class SharedPromptPairCollator:
    """Lays each pair of a batch out once in one row: the prefix its two sequences share (``P`` tokens, the prompt),
    the chosen sequence's remaining ``C - P`` tokens, then the rejected sequence's remaining ``R - P``.

    Under causal attention a token's hidden state depends only on the tokens before it, so the shared prefix's states
    are those of both sequences: computing them once is exact, and it is most of a pair's tokens when prompts are long
    (the rejected rest attends to the prefix and itself, never to the chosen rest; :mod:`open_instruct.model.packing`).

    Returns ``input_ids``/``position_ids`` ``[1, T]`` (each rest's positions continue its prefix's), ``cu_seq_lens``
    ``[B + 1]`` int32 (one segment per pair), ``max_length``, ``prompt_lens`` and ``chosen_lens`` ``[B]`` (``P``, and
    ``C``: where the rejected rest starts in the segment), ``attention_mask`` ones ``[1, T]`` (token counting only),
    ``index`` ``[B]``, and the label tokens: ``targets`` ``[N]``, the row positions that predict them
    ``target_positions`` ``[N]`` and their sequence ``target_seq`` ``[N]`` (chosen ``i`` is ``i``, rejected ``i`` is
    ``B + i``), chosen sequences first, each in order.
    """

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, positions, lengths, prompts, chosen_lens = [], [], [], [], []
        targets: dict[str, tuple[list[int], list[int], list[int]]] = {"chosen": ([], [], []), "rejected": ([], [], [])}
        pairs = len(records)
        for i, r in enumerate(records):
            chosen, rejected = r["chosen_input_ids"], r["rejected_input_ids"]
            start, p, c = len(ids), shared_prefix_length(chosen, rejected), len(chosen)
            ids.extend(chosen)
            ids.extend(rejected[p:])
            positions.extend(range(c))
            positions.extend(range(p, len(rejected)))
            lengths.append(c + len(rejected) - p)
            prompts.append(p)
            chosen_lens.append(c)
            for side, seq, where in (
                ("chosen", i, lambda u: u),
                ("rejected", pairs + i, lambda u, p=p, c=c: u if u < p else c + u - p),
            ):
                at, tokens = _targets(r[f"{side}_labels"], start, where)
                targets[side][0].extend(at)
                targets[side][1].extend(tokens)
                targets[side][2].extend([seq] * len(at))
        segments = torch.tensor(lengths, dtype=torch.long)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long).unsqueeze(0),
            "position_ids": torch.tensor(positions, dtype=torch.long).unsqueeze(0),
            "cu_seq_lens": torch.cat([torch.zeros(1, dtype=torch.long), segments.cumsum(0)]).to(torch.int32),
            "max_length": segments.max(),
            "prompt_lens": torch.tensor(prompts, dtype=torch.long),
            "chosen_lens": torch.tensor(chosen_lens, dtype=torch.long),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "index": torch.tensor([r["index"] for r in records], dtype=torch.long),
            "target_positions": torch.tensor(targets["chosen"][0] + targets["rejected"][0], dtype=torch.long),
            "targets": torch.tensor(targets["chosen"][1] + targets["rejected"][1], dtype=torch.long),
            "target_seq": torch.tensor(targets["chosen"][2] + targets["rejected"][2], dtype=torch.long),
        }
