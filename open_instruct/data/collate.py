"""Batches of tokenized pairs for the model.

Padded batches hold chosen and rejected padded to one common length so they can run as one concatenated forward:
``input_ids``/``attention_mask``/``labels`` have shape ``[2B, L]``, rows ``0..B-1`` chosen and ``B..2B-1`` rejected.
Packed batches (``--packing``) hold the same ``2B`` sequences end to end in one row ``[1, T]`` without padding.
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
