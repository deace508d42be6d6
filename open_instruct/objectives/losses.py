"""The preference-loss registry ``LOSSES``: for every ``--loss_type`` its function and what it needs.

Each ``LossSpec`` says whether the loss needs the reference, averages its log-probs per token, reads which
``LossSettings`` fields and modifiers, and depends on the whole batch; the CLI choices, flag checks, API config and
reference-cache needs derive from it. The functions are in :mod:`open_instruct.objectives.loss_functions`, the values
they exchange in :mod:`open_instruct.objectives.loss_interface`; both are re-exported here, the import path callers use.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from open_instruct.errors import UserError
from open_instruct.objectives.loss_functions import (
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_pair,
    delta_score,
    discopop,
    exo_pair,
    f_divergence_score,
    hinge,
    ipo,
    nca_pair,
    robust_dpo,
    sft,
    sigmoid,
    sigmoid_dpo,
    simpo,
    sppo_hard,
    trl_wpo_weights,
    with_nll,
    wpo,
    wpo_weights,
)
from open_instruct.objectives.loss_interface import F_DIVERGENCES, LossFn, LossOutput, LossSettings, PreferenceLogps

__all__ = [
    "F_DIVERGENCES",
    "LOSSES",
    "LossFn",
    "LossOutput",
    "LossSettings",
    "LossSpec",
    "PreferenceLogps",
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "delta_score",
    "discopop",
    "exo_pair",
    "f_divergence_score",
    "get_loss",
    "hinge",
    "hyperparameter_names",
    "ipo",
    "loss_names",
    "loss_spec",
    "nca_pair",
    "robust_dpo",
    "sft",
    "sigmoid",
    "sigmoid_dpo",
    "simpo",
    "sppo_hard",
    "trl_wpo_weights",
    "with_nll",
    "wpo",
    "wpo_weights",
]


@dataclass(frozen=True)
class LossSpec:
    """What a loss is and needs: the registry entry every flag check and the trainer read."""

    fn: LossFn  # (PreferenceLogps, LossSettings) -> LossOutput
    needs_reference: bool
    length_normalized: bool  # log-probs averaged per label token
    hyperparameters: tuple[str, ...]  # LossSettings fields it reads
    batch_level: bool = False  # depends on the whole batch (sft, aot, aot_unpaired)
    aliases: tuple[str, ...] = ()
    paper: str = ""


# Modifiers of TRL's margin losses: TRL accepts f_divergence_type for these, ld_alpha and use_weighting for all but
# the noted ones; reference_free (a zero reference) only where the reference enters through the margin alone.
_MARGIN = ("beta", "f_divergence_type", "f_alpha_divergence_coef", "ld_alpha", "use_weighting", "reference_free")
# ("reference_free" is not a LossSettings field: a recipe flag whose zero reference these losses accept)
_PER_REPLY = ("beta", "ld_alpha", "use_weighting")

LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(sigmoid_dpo, True, False, (*_MARGIN, "label_smoothing"), paper="arXiv:2305.18290"),
    "dpo_norm": LossSpec(sigmoid_dpo, True, True, (*_MARGIN, "label_smoothing"), paper="arXiv:2305.18290, Tulu 3"),
    "sigmoid": LossSpec(sigmoid, True, False, _MARGIN, paper="arXiv:2305.18290"),
    "sigmoid_norm": LossSpec(sigmoid, True, True, _MARGIN, paper="arXiv:2305.18290, Tulu 3"),
    "robust": LossSpec(robust_dpo, True, False, (*_MARGIN, "label_smoothing"), paper="arXiv:2403.00409"),
    "ipo": LossSpec(ipo, True, True, _MARGIN, paper="arXiv:2310.12036"),
    "hinge": LossSpec(hinge, True, False, _MARGIN, paper="arXiv:2305.10425"),
    "exo_pair": LossSpec(exo_pair, True, False, (*_MARGIN, "label_smoothing"), paper="arXiv:2402.00856"),
    "discopop": LossSpec(discopop, True, False, (*_MARGIN, "discopop_tau"), paper="arXiv:2406.08414"),
    "nca_pair": LossSpec(nca_pair, True, False, _PER_REPLY, paper="arXiv:2402.05369"),
    "bco_pair": LossSpec(bco_pair, True, False, _PER_REPLY, paper="arXiv:2404.04656"),
    "sppo_hard": LossSpec(sppo_hard, True, False, _PER_REPLY, paper="arXiv:2405.00675"),
    "apo_zero": LossSpec(apo_zero, True, False, _PER_REPLY, paper="arXiv:2408.06266"),
    "apo_down": LossSpec(apo_down, True, False, _PER_REPLY, paper="arXiv:2408.06266"),
    "aot": LossSpec(aot, True, False, ("beta", "label_smoothing", "ld_alpha"), True, paper="arXiv:2406.05882"),
    "aot_unpaired": LossSpec(
        aot_unpaired, True, False, ("beta", "label_smoothing", "ld_alpha"), True, paper="arXiv:2406.05882"
    ),
    "sft": LossSpec(sft, False, False, ("use_weighting",), True, paper="MPO, arXiv:2411.10442"),
    "simpo": LossSpec(
        simpo, False, True, ("beta", "label_smoothing", "gamma_beta_ratio", "ld_alpha"), paper="arXiv:2405.14734"
    ),
    "wpo": LossSpec(wpo, True, False, ("beta", "label_smoothing", "reference_free"), paper="arXiv:2406.11827"),
}


def loss_names() -> tuple[str, ...]:
    """Every accepted ``--loss_type`` name: registry keys and aliases."""
    return tuple(LOSSES) + tuple(a for spec in LOSSES.values() for a in spec.aliases)


def hyperparameter_names() -> tuple[str, ...]:
    """The ``LossSettings`` fields, in order (each is a recipe flag and an API ``DPOConfig`` field)."""
    return tuple(f.name for f in fields(LossSettings))


def loss_spec(name: str) -> LossSpec:
    """The registry entry for a ``--loss_type`` name (or one of its aliases)."""
    if name in LOSSES:
        return LOSSES[name]
    for spec in LOSSES.values():
        if name in spec.aliases:
            return spec
    raise UserError(f"--loss_type {name!r} is not available; choose one of {', '.join(loss_names())}")


def get_loss(name: str) -> tuple[LossFn, bool]:
    """(loss function with the optional RPO NLL term, length-normalized?) for one ``--loss_type``."""
    spec = loss_spec(name)
    return with_nll(spec.fn), spec.length_normalized


def whole_batch_loss(loss_types: list[str], load_balancing: bool) -> str | None:
    """Why the objective must see whole micro-batches (never split into forward passes), or None."""
    batch_level = [name for name in loss_types if loss_spec(name).batch_level]
    if batch_level:
        return f"--loss_type {batch_level[0]} looks at the whole micro-batch"
    return "--load_balancing_loss looks at the whole micro-batch" if load_balancing else None
