"""dpo and dpo_norm against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from open_instruct.objectives.logprobs import SequenceLogprobs
from open_instruct.objectives.losses import LossSettings, PreferenceLogps, get_loss
from open_instruct.training.preference import policy_logps


def test_dpo_by_hand():
    # h = 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2; loss = log(1 + e^-0.2) = 0.598138869...
    fn, normalized = get_loss("dpo")
    assert normalized is False
    logps = PreferenceLogps(*(torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0)))
    out = fn(logps, LossSettings(beta=0.1))
    assert out.losses.item() == pytest.approx(0.598138869, abs=1e-7)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.1)
    # Conservative DPO, eps = 0.1: 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.618138869...
    smoothed = fn(logps, LossSettings(beta=0.1, label_smoothing=0.1))
    assert smoothed.losses.item() == pytest.approx(0.618138869, abs=1e-7)


def test_dpo_norm_uses_per_token_averages():
    # Policy: chosen -10 over 5 tokens (-2.0/token), rejected -12 over 4 (-3.0/token).
    lp = SequenceLogprobs(
        sums=torch.tensor([-10.0, -12.0]),
        counts=torch.tensor([5, 4]),
        token_logps=torch.zeros(0),
        token_seq=torch.zeros(0, dtype=torch.long),
    )
    chosen, rejected = policy_logps(lp, length_normalized=True)
    assert (chosen.item(), rejected.item()) == (-2.0, -3.0)
    fn, normalized = get_loss("dpo_norm")
    assert normalized is True
    # Reference averages -2.5 and -2.5: h = 5 * ((-2 + 2.5) - (-3 + 2.5)) = 5.
    out = fn(PreferenceLogps(chosen, rejected, torch.tensor([-2.5]), torch.tensor([-2.5])), LossSettings(beta=5))
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-5.0)), abs=1e-7)
