"""The SFT stage's piece for the loop: its step function (pretraining uses it too, on packed text blocks)."""

from __future__ import annotations

from typing import Any

import torch

from open_instruct.data.tokenize import IGNORE_INDEX
from open_instruct.training.loop import StepFn


def label_tokens(batch: dict[str, torch.Tensor], rows: int) -> int:
    """Predicted (label) tokens of the first ``rows`` conversations: the first token of each is never a target."""
    return int((batch["labels"][:rows, 1:] != IGNORE_INDEX).sum())


def sft_step(logprob_fn: Any) -> StepFn:
    """The trainer's step for SFT: summed NLL of the real conversations' label tokens, scaled by the loop (which
    divides by the optimizer step's label tokens on all ranks: a per-token mean over the whole step), and the count."""

    def run(model: Any, batch: dict[str, torch.Tensor], rows: int, scale: float) -> tuple[Any, dict, int]:
        lp = logprob_fn(model, batch)
        nll = -lp.sums[:rows].sum()
        return nll * scale, {"train_loss": nll.detach()}, int(lp.counts[:rows].sum())

    return StepFn(run=run, units=label_tokens)
