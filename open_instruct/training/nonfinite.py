"""The non-finite guard: a NaN or Inf loss stops the run (or, with ``--skip_nonfinite_batches N``, is skipped up to N
times), naming the optimizer step and the dataset indices of the batch.

Tests inject a NaN through one environment variable, read only by :func:`injected_nan_step` (called once by the
recipe): ``OPEN_INSTRUCT_TEST_NAN_AT_STEP=K`` turns the loss of every micro-batch of optimizer step K into NaN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from open_instruct.errors import UserError

NAN_ENV = "OPEN_INSTRUCT_TEST_NAN_AT_STEP"


class NonFiniteLossError(UserError):
    """Too many batches had a NaN/Inf loss; the message names the step and the dataset indices."""


def injected_nan_step() -> int | None:
    """The optimizer step whose losses a test asked to poison, or None (the normal case)."""
    value = os.environ.get(NAN_ENV, "").strip()
    return int(value) if value else None


@dataclass
class NonFiniteGuard:
    """Counts and judges non-finite micro-batch losses; every rank reaches the same verdict."""

    max_skips: int = 0
    inject_at_step: int | None = None
    skipped: int = 0

    def maybe_inject(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Tests only: NaN for the micro-batches of optimizer step ``step`` (1-based) when asked to."""
        if self.inject_at_step is not None and step == self.inject_at_step:
            return loss * float("nan")
        return loss

    def check(self, accelerator: Any, loss: torch.Tensor, index: torch.Tensor, step: int) -> bool:
        """True to train on this micro-batch; False to skip it (counted); raises past the allowance.

        ``index``: ``[B]`` dataset indices of this rank's micro-batch; ``step``: the optimizer step it belongs to.
        """
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=accelerator.device)
        if accelerator.num_processes > 1:  # all ranks must skip together, or a collective in the backward hangs
            bad = accelerator.reduce(bad, reduction="sum")
        if float(bad) == 0:
            return True
        padded = accelerator.pad_across_processes(index.to(accelerator.device), pad_index=-1)
        indices = sorted(i for i in accelerator.gather(padded).cpu().tolist() if i >= 0)
        self.skipped += 1
        where = f"non-finite loss ({float(loss.detach()):g} on this rank) at optimizer step {step}, dataset indices {indices}"
        if self.skipped > self.max_skips:
            raise NonFiniteLossError(
                f"{where}; stopping (skipped {self.skipped - 1} such batches so far, --skip_nonfinite_batches "
                f"{self.max_skips}); no final model was written"
            )
        accelerator.print(f"warning: {where}; batch skipped ({self.skipped} of at most {self.max_skips})")
        return False
