"""The DPO loss family as pure functions of per-sequence log-probs.

Every loss takes ``PreferenceLogps`` (policy and reference log-probs of the chosen and rejected replies, ``[B]`` each,
already summed or length-averaged as the loss requires) and returns ``LossOutput`` with per-pair losses ``[B]`` and the
implicit rewards where the loss defines them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from open_instruct.config import UserError


@dataclass
class PreferenceLogps:
    """Per-pair log-probs ``[B]``: policy and reference, chosen and rejected."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor


@dataclass
class LossOutput:
    """Per-pair loss ``[B]`` and implicit rewards ``[B]`` (``None`` where the loss defines none)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor | None
    rejected_rewards: torch.Tensor | None


@dataclass(frozen=True)
class LossSettings:
    """The hyperparameters the losses read."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma_beta_ratio: float = 0.3


def _rewards(logps: PreferenceLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = beta * (logps.policy_chosen - logps.reference_chosen).detach()
    rejected = beta * (logps.policy_rejected - logps.reference_rejected).detach()
    return chosen, rejected


def sigmoid_dpo(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """DPO (Rafailov et al. 2023), conservative with label smoothing eps (Mitchell 2023).

    h = beta * ((pi_c - ref_c) - (pi_r - ref_r));  loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h).
    With summed log-probs this is ``dpo``; with length-averaged log-probs it is Tulu 3's ``dpo_norm``.
    """
    h = settings.beta * (
        (logps.policy_chosen - logps.reference_chosen) - (logps.policy_rejected - logps.reference_rejected)
    )
    eps = settings.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    return LossOutput(losses, *_rewards(logps, settings.beta))


LossFn = Callable[[PreferenceLogps, LossSettings], LossOutput]

# name -> (function, whether it compares per-token averages rather than sums)
LOSSES: dict[str, tuple[LossFn, bool]] = {
    "dpo": (sigmoid_dpo, False),
    "dpo_norm": (sigmoid_dpo, True),
}


def get_loss(name: str) -> tuple[LossFn, bool]:
    """(loss function, length-normalized?) for a ``--loss_type``; an unknown or unbuilt name is a UserError."""
    if name not in LOSSES:
        raise UserError(f"--loss_type {name!r} is not available; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
