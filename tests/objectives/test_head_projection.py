"""objectives/head_projection.py: the chunked output layer's log-probs and gradients against plain autograd."""

from __future__ import annotations

import pytest
import torch

from open_instruct.objectives.head_projection import autocast_dtype, plain_linear_head
from open_instruct.objectives.head_projection import linear_head_logps as _linear_head_logps


def linear_head_logps(head, hidden, targets, chunk_size, with_sum_sq):
    """As the chunked path calls it: with the autocast dtype in force at the call."""
    return _linear_head_logps(head, hidden, targets, chunk_size, with_sum_sq, autocast_dtype(hidden.device))


def _case(bias: bool, dtype=torch.float64, tokens=37, vocab=50, hidden=12):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g))
    h = torch.randn(tokens, hidden, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    upstream = torch.randn(tokens, generator=g, dtype=torch.float32)
    return head, h, targets, upstream


def _autograd(head, h, targets, upstream):
    """The plain computation: all logits at once, log-softmax, gather, the same upstream gradient."""
    logits = head(h).float()
    logps = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    sum_sq = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
    (logps * upstream).sum().backward()
    return logps.detach(), sum_sq.detach(), [t.grad.clone() for t in (h, head.weight, head.bias) if t is not None]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 100])
def test_values_and_gradients_match_autograd(bias, chunk):
    head, h, targets, upstream = _case(bias)
    want, want_sq, want_grads = _autograd(head, h, targets, upstream)
    for t in (h, head.weight, head.bias):
        if t is not None:
            t.grad = None
    logps, sum_sq = linear_head_logps(head, h, targets, chunk, with_sum_sq=True)
    (logps * upstream).sum().backward()
    torch.testing.assert_close(logps.detach(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sum_sq, want_sq, rtol=1e-6, atol=1e-6)
    assert not sum_sq.requires_grad  # WPO's weight is never differentiated
    got = [t.grad for t in (h, head.weight, head.bias) if t is not None]
    for a, b in zip(got, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_head_gives_no_weight_gradient_and_the_same_input_gradient():
    head, h, targets, upstream = _case(bias=False)
    *_, (want_h, _) = _autograd(head, h, targets, upstream)
    h.grad = head.weight.grad = None
    head.weight.requires_grad_(False)  # a LoRA run: the output layer is frozen
    logps, sum_sq = linear_head_logps(head, h, targets, 5, with_sum_sq=False)
    (logps * upstream).sum().backward()
    assert sum_sq is None and head.weight.grad is None
    torch.testing.assert_close(h.grad, want_h, rtol=1e-5, atol=1e-6)


def test_autocast_runs_the_matmul_in_its_dtype_like_the_module_call():
    head, h, targets, upstream = _case(bias=True, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(h).float()
        want = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        got, _ = linear_head_logps(head, h, targets, 8, with_sum_sq=False)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-5)  # the same bf16 logits
    fp32, _ = linear_head_logps(head, h, targets, 8, with_sum_sq=False)
    assert (got - fp32).abs().max() > 1e-4  # and not the fp32 ones
    (got * upstream).sum().backward()
    ours = [t.grad.clone() for t in (h, head.weight, head.bias)]
    for t in (h, head.weight, head.bias):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(h).float()
    (logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * upstream).sum().backward()
    for a, b in zip(ours, (h.grad, head.weight.grad, head.bias.grad), strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # bf16 products; ours sums the chunks in fp32


def test_bf16_weights_without_autocast_match_autograd_to_bf16_precision():
    head, h, targets, upstream = _case(bias=False, dtype=torch.bfloat16)
    *_, want = _autograd(head, h, targets, upstream)
    h.grad = head.weight.grad = None
    logps, _ = linear_head_logps(head, h, targets, 8, with_sum_sq=False)
    (logps * upstream).sum().backward()
    for a, b in zip((h.grad, head.weight.grad), want, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=5e-2)


def test_only_a_plain_linear_layer_takes_this_path():
    class Adapter(torch.nn.Linear):
        pass

    assert plain_linear_head(torch.nn.Linear(2, 3))
    assert not plain_linear_head(Adapter(2, 3)) and not plain_linear_head(torch.nn.Embedding(3, 2))
