"""The DPO loss family as pure functions of per-sequence log-probs.

Every loss takes ``PreferenceLogps`` (policy and reference log-probs of the chosen and rejected replies, ``[B]`` each,
already summed or length-averaged as the loss requires) and returns ``LossOutput`` with per-pair losses ``[B]`` and the
implicit rewards where the loss defines them. Notation in the docstrings: ``pi_c, pi_r`` policy log-probs of the chosen
and rejected reply, ``ref_c, ref_r`` the reference's, ``m = (pi_c - ref_c) - (pi_r - ref_r)`` the log-ratio margin,
``eps`` the label smoothing, ``sigma`` the logistic function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from open_instruct.config import UserError


@dataclass
class PreferenceLogps:
    """Per-pair log-probs ``[B]``: policy and reference, chosen and rejected (summed or averaged as the loss needs).

    ``policy_chosen_mean``/``policy_rejected_mean`` ``[B]`` are the policy's average log-prob per label token whatever
    the loss's reduction: WPO's weights and the RPO NLL term read them.
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor
    policy_chosen_mean: torch.Tensor | None = None
    policy_rejected_mean: torch.Tensor | None = None


@dataclass
class LossOutput:
    """Per-pair loss ``[B]``, implicit rewards ``[B]`` (``None`` where undefined), and the RPO NLL term ``[B]`` if any."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor | None
    rejected_rewards: torch.Tensor | None
    nll: torch.Tensor | None = None


@dataclass(frozen=True)
class LossSettings:
    """The hyperparameters the losses read."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma_beta_ratio: float = 0.3
    nll_loss_weight: float = 0.0


def _margin(logps: PreferenceLogps) -> torch.Tensor:
    """m = (pi_c - ref_c) - (pi_r - ref_r), ``[B]``."""
    return (logps.policy_chosen - logps.reference_chosen) - (logps.policy_rejected - logps.reference_rejected)


def _rewards(logps: PreferenceLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = beta * (logps.policy_chosen - logps.reference_chosen).detach()
    rejected = beta * (logps.policy_rejected - logps.reference_rejected).detach()
    return chosen, rejected


def _smoothed_sigmoid_loss(h: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigma(h) - eps log sigma(-h)."""
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def sigmoid_dpo(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """DPO (Rafailov et al. 2023), conservative with label smoothing eps (Mitchell 2023).

    h = beta * m;  loss = -(1 - eps) log sigma(h) - eps log sigma(-h).
    With summed log-probs this is ``dpo``; with length-averaged log-probs it is Tulu 3's ``dpo_norm``.
    """
    h = settings.beta * _margin(logps)
    return LossOutput(_smoothed_sigmoid_loss(h, settings.label_smoothing), *_rewards(logps, settings.beta))


def robust_dpo(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """Noise-robust DPO (Chowdhury et al. 2024), an unbiased loss under label flips with rate eps in [0, 0.5).

    h = beta * m;  loss = ((1 - eps) * -log sigma(h) - eps * -log sigma(-h)) / (1 - 2 eps).
    """
    eps = settings.label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {eps}")
    h = settings.beta * _margin(logps)
    losses = ((1 - eps) * -F.logsigmoid(h) - eps * -F.logsigmoid(-h)) / (1 - 2 * eps)
    return LossOutput(losses, *_rewards(logps, settings.beta))


def ipo(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17) on length-averaged log-probs, beta playing tau.

    loss = (m - 1 / (2 beta))^2.
    """
    losses = (_margin(logps) - 1 / (2 * settings.beta)) ** 2
    return LossOutput(losses, *_rewards(logps, settings.beta))


def hinge(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """Hinge loss on the DPO margin (SLiC-HF, Zhao et al. 2023, as in TRL).

    loss = max(0, 1 - beta * m).
    """
    losses = torch.relu(1 - settings.beta * _margin(logps))
    return LossOutput(losses, *_rewards(logps, settings.beta))


def simpo(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """SimPO (Meng et al. 2024): reference-free, on length-averaged log-probs, target margin gamma = ratio * beta.

    h = beta * (pi_c - pi_r) - gamma;  loss = -(1 - eps) log sigma(h) - eps log sigma(-h).
    Rewards are SimPO's implicit reward beta * pi (the reference is ignored).
    """
    h = settings.beta * (logps.policy_chosen - logps.policy_rejected - settings.gamma_beta_ratio)
    losses = _smoothed_sigmoid_loss(h, settings.label_smoothing)
    return LossOutput(
        losses, settings.beta * logps.policy_chosen.detach(), settings.beta * logps.policy_rejected.detach()
    )


def wpo_weights(logps: PreferenceLogps) -> torch.Tensor:
    """WPO pair weights ``[B]``, detached: w = exp(mean_t log pi(y_c,t) + mean_t log pi(y_r,t)).

    Each reply's average log-prob per label token is a per-pair ``[B]`` value, so any batch size works.
    """
    if logps.policy_chosen_mean is None or logps.policy_rejected_mean is None:
        raise ValueError("wpo needs the policy's per-token average log-probs (policy_*_mean)")
    return torch.exp(logps.policy_chosen_mean + logps.policy_rejected_mean).detach()


def wpo(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """Weighted preference optimisation (Zhou et al. 2024) on the (conservative) DPO loss with summed log-probs.

    loss = w * (-(1 - eps) log sigma(beta m) - eps log sigma(-beta m)),  w = exp(avg log pi(y_c) + avg log pi(y_r)),
    with ``w`` detached (a weight, not a gradient path).
    """
    base = sigmoid_dpo(logps, settings)
    return replace(base, losses=wpo_weights(logps) * base.losses)


LossFn = Callable[[PreferenceLogps, LossSettings], LossOutput]


def with_nll(base: LossFn) -> LossFn:
    """``base`` plus RPO's term (Pang et al. 2024): loss + nll_loss_weight * (-avg log pi(y_c)), per pair."""

    def loss(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
        out = base(logps, settings)
        if settings.nll_loss_weight == 0:
            return out
        if logps.policy_chosen_mean is None:
            raise ValueError("the NLL term needs the policy's per-token average chosen log-probs (policy_chosen_mean)")
        nll = -logps.policy_chosen_mean
        return replace(out, losses=out.losses + settings.nll_loss_weight * nll, nll=nll.detach())

    loss.__name__ = f"{base.__name__}_with_nll"
    loss.__doc__ = base.__doc__
    return loss


# name -> (function, whether it compares per-token averages rather than sums)
LOSSES: dict[str, tuple[LossFn, bool]] = {
    "dpo": (sigmoid_dpo, False),
    "dpo_norm": (sigmoid_dpo, True),
    "robust": (robust_dpo, False),
    "ipo": (ipo, True),
    "hinge": (hinge, False),
    "simpo": (simpo, True),
    "wpo": (wpo, False),
}


def get_loss(name: str) -> tuple[LossFn, bool]:
    """(loss function with the optional RPO NLL term, length-normalized?) for a ``--loss_type``."""
    if name not in LOSSES:
        raise UserError(f"--loss_type {name!r} is not available; choose one of {', '.join(LOSSES)}")
    fn, length_normalized = LOSSES[name]
    return with_nll(fn), length_normalized
