"""The values the preference losses exchange: their input ``PreferenceLogps``, their output ``LossOutput``, and the
hyperparameters they read, ``LossSettings`` (each field's metadata makes it a recipe flag and an API field).

The losses themselves are in :mod:`open_instruct.objectives.loss_functions`, their registry in
:mod:`open_instruct.objectives.losses`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from open_instruct.ranges import Range

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass
class PreferenceLogps:
    """Per-pair log-probs ``[B]``: policy and reference, chosen and rejected (summed or averaged as the loss needs).

    ``policy_chosen_mean``/``policy_rejected_mean`` ``[B]`` are the policy's average log-prob per label token whatever
    the loss's reduction (open-instruct's WPO weights, RPO's NLL and TRL's ``sft`` read them). ``chosen_counts`` /
    ``rejected_counts`` ``[B]`` are the label-token counts; ``averaged`` says the four main values are per-token
    averages (the f-divergences then apply to the summed log-ratio, as TRL does). ``wpo_chosen``/``wpo_rejected`` ``[B]``
    are TRL's WPO terms: the policy's per-token ``log p - log sum_v p_v^2`` averaged over each reply (detached).
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor
    policy_chosen_mean: torch.Tensor | None = None
    policy_rejected_mean: torch.Tensor | None = None
    chosen_counts: torch.Tensor | None = None
    rejected_counts: torch.Tensor | None = None
    averaged: bool = False
    wpo_chosen: torch.Tensor | None = None
    wpo_rejected: torch.Tensor | None = None


@dataclass
class LossOutput:
    """Per-pair loss ``[B]``, implicit rewards ``[B]`` (``None`` where undefined), the RPO NLL term ``[B]`` if any,
    and for a combination each component's per-pair loss ``[B]`` (detached) by name."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor | None
    rejected_rewards: torch.Tensor | None
    nll: torch.Tensor | None = None
    components: dict[str, torch.Tensor] = field(default_factory=dict)


def _hyperparameter(default: Any, help: str, flag_default: Any = None, **meta: object) -> Any:
    """A loss hyperparameter: its API default (TRL's), and for the command line its help, aliases and default."""
    flag = default if flag_default is None else flag_default
    return field(default=default, metadata={"help": help, "flag_default": flag, **meta})


@dataclass(frozen=True)
class LossSettings:
    """The hyperparameters the losses read (TRL's names for TRL's modifiers). Each field is also a flag of the DPO
    recipe and a field of the API's ``DPOConfig`` (both derived from here); metadata: ``help``, ``aliases``,
    ``flag_default`` (the recipe's default), ``choices``, ``valid`` (the :class:`~open_instruct.ranges.Range`)."""

    beta: float = _hyperparameter(
        0.1, "DPO beta (inverse temperature).", 5.0, aliases=("dpo_beta",), valid=Range(0, low_open=True)
    )
    label_smoothing: float = _hyperparameter(
        0.0,
        "Conservative DPO / robust / exo_pair / aot: assumed label noise.",
        aliases=("dpo_label_smoothing",),
        valid=Range(0, 0.5, high_open=True),
    )
    gamma_beta_ratio: float = _hyperparameter(
        0.3, "SimPO target margin divided by beta.", aliases=("dpo_gamma_beta_ratio",), valid=Range(0)
    )
    nll_loss_weight: float = _hyperparameter(
        0.0, "RPO: weight of the chosen reply's NLL added to the loss.", valid=Range(0)
    )
    f_divergence_type: str = _hyperparameter(
        "reverse_kl", "f-DPO divergence of the margin losses.", choices=F_DIVERGENCES
    )
    f_alpha_divergence_coef: float = _hyperparameter(
        0.5, "alpha of --f_divergence_type alpha_divergence.", valid=Range()
    )
    discopop_tau: float = _hyperparameter(0.05, "Temperature of the discopop loss.", valid=Range(0, low_open=True))
    # applied to the log-probs before the loss (open_instruct.objectives.combination)
    ld_alpha: float | None = _hyperparameter(
        None,
        "LD-DPO: weight in [0, 1] of the log-probs past the shorter reply's length (None: plain sums).",
        valid=Range(0, 1),
    )
    # applied to each component's per-pair loss (open_instruct.objectives.combination)
    use_weighting: bool = _hyperparameter(False, "WPO weights (TRL's aligned form) on every listed loss.")


LossFn = Callable[[PreferenceLogps, LossSettings], LossOutput]
