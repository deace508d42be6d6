"""The preference-loss family as pure functions of per-sequence log-probs (registered in ``losses.LOSSES``).

Every loss takes ``PreferenceLogps`` (policy and reference log-probs of the chosen and rejected replies, ``[B]`` each,
already summed or length-averaged as its ``LossSpec.length_normalized`` says) and returns ``LossOutput`` with per-pair
losses ``[B]`` and the implicit rewards where the loss defines them. Notation in the docstrings: ``pi_c, pi_r`` policy
log-probs of the chosen and rejected reply, ``ref_c, ref_r`` the reference's, ``c = pi_c - ref_c`` and
``r = pi_r - ref_r`` the log-ratios, ``m = c - r`` the margin, ``eps`` the label smoothing, ``sigma`` the logistic
function. ``d`` is TRL's "delta score": ``m`` by default, ``f'(exp c) - f'(exp r)`` under ``f_divergence_type``.

TRL names (``DPOConfig.loss_type``, TRL 1.16 ``DPOTrainer._compute_loss``) and open-instruct names share the registry:
``sigmoid`` is ``dpo`` and ``sigmoid_norm`` is ``dpo_norm`` without label smoothing (TRL ignores it there; ours apply
conservative-DPO smoothing), the other shared names are the same function.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from open_instruct.objectives.loss_interface import F_DIVERGENCES, LossFn, LossOutput, LossSettings, PreferenceLogps


def _margin(logps: PreferenceLogps) -> torch.Tensor:
    """m = (pi_c - ref_c) - (pi_r - ref_r), ``[B]``."""
    return (logps.policy_chosen - logps.reference_chosen) - (logps.policy_rejected - logps.reference_rejected)


def _log_ratios(logps: PreferenceLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, r) = (pi_c - ref_c, pi_r - ref_r), ``[B]`` each."""
    return logps.policy_chosen - logps.reference_chosen, logps.policy_rejected - logps.reference_rejected


def _rewards(logps: PreferenceLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = beta * (logps.policy_chosen - logps.reference_chosen).detach()
    rejected = beta * (logps.policy_rejected - logps.reference_rejected).detach()
    return chosen, rejected


def _smoothed_sigmoid_loss(h: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigma(h) - eps log sigma(-h)."""
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def f_divergence_score(log_ratio: torch.Tensor, kind: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(t) at t = exp(log_ratio) for the f-DPO divergences (Wang et al. 2023, arXiv:2309.16240), ``[B]``.

    reverse_kl: log t;  forward_kl: 1 - 1/t;  js_divergence: log 2 + log sigma(log t);
    alpha_divergence: (t^(alpha-1) - 1) / (alpha - 1), log t when |alpha - 1| < 1e-6. As in TRL, the exponent
    (alpha - 1) log t is clamped at 80 (11 in fp16) before exp so it stays finite.
    """
    if kind == "reverse_kl":
        return log_ratio
    if kind == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return log_ratio
        t = (alpha - 1.0) * log_ratio
        clamp_max = 11.0 if t.dtype == torch.float16 else 80.0
        wide = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t  # fp64 stays fp64
        return (torch.exp(torch.clamp(wide, max=clamp_max)) - 1.0).to(t.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {kind!r}; one of {F_DIVERGENCES}")


def delta_score(logps: PreferenceLogps, settings: LossSettings) -> torch.Tensor:
    """TRL's d = f'(exp c) - f'(exp r) ``[B]`` (d = m for reverse KL).

    On averaged log-probs the divergence applies to the summed log-ratio and is divided by the token count after, as
    TRL's ``ipo``/``sigmoid_norm`` do: d = f'(exp(n_c c)) / n_c - f'(exp(n_r r)) / n_r.
    """
    if settings.f_divergence_type == "reverse_kl":
        return _margin(logps)
    c, r = _log_ratios(logps)
    kind, alpha = settings.f_divergence_type, settings.f_alpha_divergence_coef
    if not logps.averaged:
        return f_divergence_score(c, kind, alpha) - f_divergence_score(r, kind, alpha)
    if logps.chosen_counts is None or logps.rejected_counts is None:
        raise ValueError("an f-divergence on averaged log-probs needs the token counts (chosen/rejected_counts)")
    n_c, n_r = logps.chosen_counts.clamp(min=1).to(c.dtype), logps.rejected_counts.clamp(min=1).to(r.dtype)
    return f_divergence_score(c * n_c, kind, alpha) / n_c - f_divergence_score(r * n_r, kind, alpha) / n_r


# ---- losses on the margin (d): DPO, its smoothed and robust forms, IPO, hinge, EXO, DiscoPOP ----


def sigmoid_dpo(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290), conservative with label smoothing eps (Mitchell 2023).

    h = beta * d;  loss = -(1 - eps) log sigma(h) - eps log sigma(-h).
    With summed log-probs this is ``dpo``; with length-averaged log-probs it is Tulu 3's ``dpo_norm``.
    """
    h = settings.beta * delta_score(logps, settings)
    return LossOutput(_smoothed_sigmoid_loss(h, settings.label_smoothing), *_rewards(logps, settings.beta))


def sigmoid(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """TRL's ``sigmoid``/``sigmoid_norm``: DPO without smoothing (TRL ignores label_smoothing there).

    loss = -log sigma(beta * d).
    """
    h = settings.beta * delta_score(logps, settings)
    return LossOutput(-F.logsigmoid(h), *_rewards(logps, settings.beta))


def robust_dpo(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """Noise-robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under label flips with rate eps < 0.5.

    h = beta * d;  loss = ((1 - eps) * -log sigma(h) - eps * -log sigma(-h)) / (1 - 2 eps).
    """
    eps = settings.label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {eps}")
    h = settings.beta * delta_score(logps, settings)
    losses = ((1 - eps) * -F.logsigmoid(h) - eps * -F.logsigmoid(-h)) / (1 - 2 * eps)
    return LossOutput(losses, *_rewards(logps, settings.beta))


def ipo(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17) on length-averaged log-probs, beta playing tau.

    loss = (d - 1 / (2 beta))^2. The per-token average is TRL's (confirmed with the authors), not in the paper.
    """
    losses = (delta_score(logps, settings) - 1 / (2 * settings.beta)) ** 2
    return LossOutput(losses, *_rewards(logps, settings.beta))


def hinge(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """Hinge loss on the DPO margin (SLiC-HF, Zhao et al. 2023, arXiv:2305.10425, as in TRL).

    loss = max(0, 1 - beta * d).
    """
    losses = torch.relu(1 - settings.beta * delta_score(logps, settings))
    return LossOutput(losses, *_rewards(logps, settings.beta))


def exo_pair(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, eq. 16): KL(q || p) over the pair, q = softmax of the rewards.

    h = beta * d, q_w = sigma(h), q_l = sigma(-h), p = (1 - eps, eps);
    loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps). Needs eps > 0 (the paper suggests 1e-3).
    """
    eps = settings.label_smoothing
    if not 0.0 < eps < 1.0:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 1), got {eps}")
    h = settings.beta * delta_score(logps, settings)
    chosen = torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-eps))
    rejected = torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(eps))
    return LossOutput(chosen + rejected, *_rewards(logps, settings.beta))


def discopop(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """DiscoPOP's log-ratio modulated loss (Chan Lu et al. 2024, arXiv:2406.08414, eq. 5), temperature tau.

    h = beta * d, w = sigma(h / tau);  loss = (1 - w) * -log sigma(h) + w * exp(-h).
    """
    h = settings.beta * delta_score(logps, settings)
    w = torch.sigmoid(h / settings.discopop_tau)
    return LossOutput(-F.logsigmoid(h) * (1 - w) + torch.exp(-h) * w, *_rewards(logps, settings.beta))


# ---- losses on each reply's log-ratio: NCA, BCO, SPPO, APO ----


def nca_pair(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """NCA (Chen et al. 2024, arXiv:2402.05369), pairwise form.

    loss = -log sigma(beta c) - 0.5 log sigma(-beta c) - 0.5 log sigma(-beta r).
    """
    c, r = _log_ratios(logps)
    b = settings.beta
    losses = -F.logsigmoid(b * c) - 0.5 * F.logsigmoid(-b * c) - 0.5 * F.logsigmoid(-b * r)
    return LossOutput(losses, *_rewards(logps, b))


def bco_pair(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """BCO (Jung et al. 2024, arXiv:2404.04656) on pairs, without the paper's running reward shift delta.

    loss = -log sigma(beta c) - log sigma(-beta r). TRL 1.16 keeps no running mean: delta = 0, stateless.
    """
    c, r = _log_ratios(logps)
    b = settings.beta
    return LossOutput(-F.logsigmoid(b * c) - F.logsigmoid(-b * r), *_rewards(logps, b))


def sppo_hard(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """SPPO (Wu et al. 2024, arXiv:2405.00675, eq. 4.7) with hard win probabilities P = 1 (chosen), 0 (rejected).

    loss = (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2.
    """
    c, r = _log_ratios(logps)
    half = 0.5 / settings.beta
    return LossOutput((c - half) ** 2 + (r + half) ** 2, *_rewards(logps, settings.beta))


def apo_zero(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7): chosen up, rejected down.

    loss = (1 - sigma(beta c)) + sigma(beta r).
    """
    c, r = _log_ratios(logps)
    b = settings.beta
    return LossOutput(1 - torch.sigmoid(b * c) + torch.sigmoid(b * r), *_rewards(logps, b))


def apo_down(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 8): chosen down, rejected down more.

    loss = sigma(beta c) + (1 - sigma(beta (c - r))).
    """
    c, r = _log_ratios(logps)
    b = settings.beta
    return LossOutput(torch.sigmoid(b * c) + 1 - torch.sigmoid(b * (c - r)), *_rewards(logps, b))


# ---- batch-level losses: their value for a pair depends on the other pairs of the (micro-)batch ----


def aot(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): DPO on sorted margins (first-order dominance).

    u = sort(pi_c - pi_r), v = sort(ref_c - ref_r) over the batch, delta = u - v;
    loss_i = -(1 - eps) log sigma(beta delta_i) - eps log sigma(-beta delta_i) (the i-th order statistic).
    """
    u, _ = torch.sort(logps.policy_chosen - logps.policy_rejected, dim=0)
    v, _ = torch.sort(logps.reference_chosen - logps.reference_rejected, dim=0)
    losses = _smoothed_sigmoid_loss(settings.beta * (u - v), settings.label_smoothing)
    return LossOutput(losses, *_rewards(logps, settings.beta))


def aot_unpaired(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882): chosen and rejected log-ratios sorted separately.

    delta = sort(c) - sort(r) over the batch;  loss_i = -(1 - eps) log sigma(beta delta_i) - eps log sigma(-beta delta_i).
    """
    c, r = _log_ratios(logps)
    delta = torch.sort(c, dim=0)[0] - torch.sort(r, dim=0)[0]
    losses = _smoothed_sigmoid_loss(settings.beta * delta, settings.label_smoothing)
    return LossOutput(losses, *_rewards(logps, settings.beta))


def sft(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """Negative log-likelihood of the chosen replies, a token mean over the whole batch (TRL's ``sft``, MPO recipe).

    loss_i = -(sum_j n_j avg pi_c,j) / (sum_j n_j) for every pair i (the batch's value, repeated). No rewards.
    """
    if logps.policy_chosen_mean is None or logps.chosen_counts is None:
        raise ValueError("sft needs the policy's per-token average chosen log-probs and the chosen token counts")
    counts = logps.chosen_counts.to(logps.policy_chosen_mean.dtype)
    value = -(logps.policy_chosen_mean * counts).sum() / counts.sum().clamp(min=1)
    return LossOutput(value.expand(counts.shape[0]), None, None)


# ---- open-instruct's reference-free and weighted losses ----


def simpo(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv:2405.14734): reference-free, length-averaged, target margin gamma = ratio * beta.

    h = beta * (pi_c - pi_r) - gamma;  loss = -(1 - eps) log sigma(h) - eps log sigma(-h).
    Rewards are SimPO's implicit reward beta * pi (the reference is ignored).
    """
    h = settings.beta * (logps.policy_chosen - logps.policy_rejected - settings.gamma_beta_ratio)
    losses = _smoothed_sigmoid_loss(h, settings.label_smoothing)
    return LossOutput(
        losses, settings.beta * logps.policy_chosen.detach(), settings.beta * logps.policy_rejected.detach()
    )


def wpo_weights(logps: PreferenceLogps) -> torch.Tensor:
    """open-instruct's WPO pair weights ``[B]``, detached: w = exp(mean_t log pi(y_c,t) + mean_t log pi(y_r,t))."""
    if logps.policy_chosen_mean is None or logps.policy_rejected_mean is None:
        raise ValueError("wpo needs the policy's per-token average log-probs (policy_*_mean)")
    return torch.exp(logps.policy_chosen_mean + logps.policy_rejected_mean).detach()


def wpo(logps: PreferenceLogps, settings: LossSettings) -> LossOutput:
    """Weighted preference optimisation (Zhou et al. 2024, arXiv:2406.11827) as open-instruct has it.

    loss = w * (-(1 - eps) log sigma(beta m) - eps log sigma(-beta m)),  w = exp(avg log pi(y_c) + avg log pi(y_r)),
    ``w`` detached. TRL's ``use_weighting`` is the paper's aligned form instead (see ``trl_wpo_weights``).
    """
    base = sigmoid_dpo(logps, settings)
    return replace(base, losses=wpo_weights(logps) * base.losses)


def trl_wpo_weights(logps: PreferenceLogps) -> torch.Tensor:
    """WPO weights of TRL's ``use_weighting`` (WPO eq. 2, aligned) ``[B]``, detached.

    w = exp(a_c) * exp(a_r), a = average over the reply's tokens of log p(y_t) - log sum_v p(v)^2.
    """
    if logps.wpo_chosen is None or logps.wpo_rejected is None:
        raise ValueError("use_weighting needs the policy's per-token log p - log sum p^2 averages (wpo_*)")
    return (torch.exp(logps.wpo_chosen) * torch.exp(logps.wpo_rejected)).detach()


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
