"""The training objective: one loss or TRL's weighted combination of several, with its modifiers.

``combined_loss(names, weights)`` takes ``PreferenceLogps`` holding SUMMED log-probs (LD-DPO weighted when ``ld_alpha``
is set) with token counts, gives each component the view its registry entry asks for (sums, or per-token averages),
multiplies each component's per-pair loss by TRL's WPO weights under ``use_weighting``, and returns their weighted sum
(TRL: ``loss = sum_k w_k * mean(loss_k)``, the same as the mean of the per-pair weighted sum), each component by name,
and RPO's NLL term once. ``combination_problems`` lists what is wrong with a combination before any work.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from open_instruct.errors import UserError
from open_instruct.objectives.losses import (
    F_DIVERGENCES,
    LossFn,
    LossOutput,
    LossSettings,
    PreferenceLogps,
    loss_spec,
    trl_wpo_weights,
)


def ld_weighted(shared: torch.Tensor, tail: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """LD-DPO's length-desensitized log-prob (Liu et al. 2024, arXiv:2409.06411) ``[N]``.

    shared + alpha * tail, where ``shared`` sums the reply's first min(n_c, n_r) label tokens (the shorter reply's
    length within its pair) and ``tail`` the rest; alpha = 1 (or None) is the plain sum.
    """
    if alpha is None:
        return shared + tail
    return shared + alpha * tail


def averaged(logps: PreferenceLogps) -> PreferenceLogps:
    """The same pairs with the four main values divided by their token counts (at least 1)."""
    if logps.chosen_counts is None or logps.rejected_counts is None:
        raise ValueError("length-normalized losses need the token counts (chosen_counts/rejected_counts)")
    n_c = logps.chosen_counts.clamp(min=1).to(logps.policy_chosen.dtype)
    n_r = logps.rejected_counts.clamp(min=1).to(logps.policy_rejected.dtype)
    return replace(
        logps,
        policy_chosen=logps.policy_chosen / n_c,
        policy_rejected=logps.policy_rejected / n_r,
        reference_chosen=logps.reference_chosen / n_c,
        reference_rejected=logps.reference_rejected / n_r,
        averaged=True,
    )


def combined_loss(names: list[str], weights: list[float] | None = None) -> LossFn:
    """The per-pair objective ``sum_k w_k * loss_k`` over the named losses (weights default to 1 each)."""
    weights = list(weights) if weights is not None else [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} loss weights for {len(names)} losses")
    specs = [loss_spec(name) for name in names]

    def loss(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
        total, components = None, {}
        rewards: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        for name, spec, weight in zip(names, specs, weights):
            out = spec.fn(averaged(logps) if spec.length_normalized else logps, settings)
            losses = out.losses * trl_wpo_weights(logps) if settings.use_weighting else out.losses
            components[name] = losses.detach()
            total = weight * losses if total is None else total + weight * losses
            if rewards[0] is None and out.chosen_rewards is not None:
                rewards = (out.chosen_rewards, out.rejected_rewards)
        nll = None
        if settings.nll_loss_weight != 0:
            if logps.policy_chosen_mean is None:
                raise ValueError("the NLL term needs the policy's per-token average chosen log-probs")
            nll = -logps.policy_chosen_mean
            total = total + settings.nll_loss_weight * nll
            nll = nll.detach()
        return LossOutput(total, *rewards, nll=nll, components=components)

    loss.__name__ = "+".join(names)
    return loss


# Modifiers, their default (unset) value, and whether every listed loss must read it (TRL's own rule for
# f_divergence_type, over the losses that use the reference, and use_weighting) or at least one.
MODIFIERS: dict[str, tuple[object, bool]] = {
    "label_smoothing": (0.0, False),
    "gamma_beta_ratio": (0.3, False),
    "discopop_tau": (0.05, False),
    "ld_alpha": (None, False),
    "f_divergence_type": ("reverse_kl", True),
    "use_weighting": (False, True),
}


def combination_problems(
    names: list[str], weights: list[float] | None, settings: LossSettings, reference_free: bool = False
) -> list[str]:
    """What is wrong with these losses, weights and modifiers (and a zero reference) together (empty when nothing is)."""
    problems = []
    specs = {}
    for name in names:
        try:
            specs[name] = loss_spec(name)
        except UserError as err:
            problems.append(str(err))
    if len(set(names)) != len(names):
        problems.append(f"--loss_type lists a loss twice: {' '.join(names)}")
    if weights is not None and len(weights) != len(names):
        problems.append(f"--loss_weights has {len(weights)} values for {len(names)} --loss_type entries")
    if not names:
        problems.append("--loss_type needs at least one loss")
    if problems:
        return problems
    if reference_free:  # losses that read no reference are unaffected by a zero one
        ignoring = [n for n, s in specs.items() if s.needs_reference and "reference_free" not in s.hyperparameters]
        if ignoring:
            problems.append(f"--reference_free: {', '.join(ignoring)} needs the reference model's log-probs")
    for modifier, (default, every) in MODIFIERS.items():
        if getattr(settings, modifier) == default:
            continue
        readers = [n for n, s in specs.items() if modifier in s.hyperparameters]
        considered = [n for n, s in specs.items() if s.needs_reference] if modifier == "f_divergence_type" else names
        ignoring = [n for n in considered if n not in readers]
        if not readers or (every and ignoring):
            problems.append(f"--{modifier} has no meaning for --loss_type {' '.join(ignoring or names)}")
    if settings.f_divergence_type not in F_DIVERGENCES:
        problems.append(f"--f_divergence_type must be one of {', '.join(F_DIVERGENCES)}")
    if settings.f_alpha_divergence_coef != 0.5 and settings.f_divergence_type != "alpha_divergence":
        problems.append("--f_alpha_divergence_coef needs --f_divergence_type alpha_divergence")
    if settings.ld_alpha is not None and not 0.0 <= settings.ld_alpha <= 1.0:
        problems.append(f"--ld_alpha must be in [0, 1], got {settings.ld_alpha}")
    if settings.discopop_tau <= 0:
        problems.append(f"--discopop_tau must be > 0, got {settings.discopop_tau}")
    if "exo_pair" in names and settings.label_smoothing <= 0:
        problems.append("--loss_type exo_pair needs --label_smoothing > 0 (the EXO paper suggests 1e-3)")
    return problems
