"""Batches of tokenized pairs for the model.

Padded batches hold chosen and rejected padded to one common length so they can run as one concatenated forward:
``input_ids``/``attention_mask``/``labels`` have shape ``[2B, L]``, rows ``0..B-1`` chosen and ``B..2B-1`` rejected.
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
