"""TRL's own loss code called directly: ``DPOTrainer._compute_loss`` on a stand-in trainer (tests/objectives/test_losses.py,
tests/objectives/test_losses_trl.py). The trainer is a namespace holding only the attributes that method reads."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch


def fused_head_model(log_probs: torch.Tensor, **outputs: torch.Tensor) -> Callable[..., SimpleNamespace]:
    """A stand-in model under TRL's fused LM head: per-token ``log_probs`` ``[N, L-1]`` (and ``outputs``), zero
    entropy and logit statistics."""
    zeros = torch.zeros_like(log_probs)

    def model(**kwargs: Any) -> SimpleNamespace:
        assert kwargs["fused_lm_head"]
        is_top1 = torch.zeros_like(log_probs, dtype=torch.bool)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=is_top1, **outputs)

    return model


def trl_compute_loss(forward: Any, inputs: dict[str, torch.Tensor], /, **trainer: Any) -> torch.Tensor:
    """``DPOTrainer._compute_loss(trainer, forward, inputs)``: the policy's ``forward`` on ``inputs``, ``trainer``
    holding these attributes plus what every call reads: a CPU accelerator whose gathers are identities, no auxiliary
    loss, empty metrics."""
    from trl import DPOTrainer

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    stand_in = SimpleNamespace(
        accelerator=accelerator,
        aux_loss_enabled=False,
        _total_train_tokens=0,
        _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        **trainer,
    )
    return DPOTrainer._compute_loss(stand_in, forward, inputs, return_outputs=False)
