"""The frozen-head chunked log-probs (used for LoRA under ZeRO-3) equal the plain computation, values and gradients."""

from __future__ import annotations

import torch

from open_instruct.engine import is_partitioned
from open_instruct.engine.zero3_head import _FrozenHeadLogps
from open_instruct.objectives.logprobs import _token_logps


def test_frozen_head_logps_match_full_logits_and_their_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 11, bias=False).requires_grad_(False)
    hidden = torch.randn(7, 16, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    upstream = torch.randn(7)

    expected = _token_logps(head(hidden), targets)
    (expected_grad,) = torch.autograd.grad(expected, hidden, upstream)
    got = _FrozenHeadLogps.apply(hidden, targets, head, 3, _token_logps)  # chunks of 3, 3, 1
    (got_grad,) = torch.autograd.grad(got, hidden, upstream)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-6)

    empty = _FrozenHeadLogps.apply(hidden[:0], targets[:0], head, 3, _token_logps)  # a rank without label tokens
    assert empty.shape == (0,) and empty.requires_grad
    assert not is_partitioned(head.weight)  # not partitioned: the ordinary checkpointed path
