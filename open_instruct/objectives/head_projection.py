"""Label-token log-probs through a plain linear output layer, chunk by chunk, with its gradient summed in one buffer.

The generic chunked path (``logprobs._project_in_chunks``) recomputes each chunk under activation checkpointing, and
autograd then gives the output layer's weight one ``[vocab, hidden]`` gradient per chunk, each added to the last:
at a 128k vocabulary and a 256-wide model that is a fresh 131 MB tensor per chunk of 32 tokens, allocated (and, being
large, mapped and zeroed by the kernel) dozens of times a step, and 131 MB more at the backward's peak. Here the
backward recomputes each chunk's logits and adds its share straight into one weight-gradient buffer (``addmm_``)
when the head's matmul runs in fp32; a half-precision matmul (autocast, bf16 weights) keeps autograd's per-chunk
product, summed in fp32. Either way the weight is cast once per pass, not once per chunk.

The same function serves the no-grad passes (reference log-probs, evaluation): its forward is the chunked projection.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype autocast casts matmul inputs to on ``device`` right now, or None when autocast is off."""
    device_type = torch.device(device).type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def plain_linear_head(head: Any) -> bool:
    """Whether ``head`` is exactly ``torch.nn.Linear`` (not an adapter, quantized or partitioned subclass), whose
    output this module may compute from its weight and bias directly."""
    return type(head) is torch.nn.Linear


def _in_dtype(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None):
    """The head's weight and bias in autocast's ``dtype`` (unchanged without one): cast once per pass, as autocast
    caches the cast of a weight for the whole forward, never once per chunk."""
    if dtype is None:
        return weight, bias
    return weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None):
    """fp32 logits of one chunk; ``weight`` and ``bias`` already in ``dtype`` (:func:`_in_dtype`)."""
    return F.linear(hidden.to(dtype) if dtype is not None else hidden, weight, bias).float()


class _ChunkedHeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, targets, chunk_size: int, dtype, with_sum_sq: bool):  # noqa: ANN001
        logps, sums_sq = [], []
        w, b = _in_dtype(weight, bias, dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            z = _logits(hidden[start : start + chunk_size], w, b, dtype)
            lse = torch.logsumexp(z, dim=-1)
            logps.append(z.gather(-1, targets[start : start + chunk_size].unsqueeze(-1)).squeeze(-1) - lse)
            if with_sum_sq:  # WPO's log sum_v p_v^2: a weight, never differentiated
                sums_sq.append(torch.logsumexp(2 * z, dim=-1) - 2 * lse)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        logps = torch.cat(logps)
        sum_sq = torch.cat(sums_sq) if with_sum_sq else logps.new_empty(0)
        ctx.mark_non_differentiable(sum_sq)
        return logps, sum_sq

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor, _grad_sum_sq: Any):  # noqa: ANN205
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = ctx.dtype
        w, b = _in_dtype(weight, bias, dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # sums over chunks in fp32 (or wider)
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[start : start + ctx.chunk_size]
            g = grad_logps[start : start + ctx.chunk_size].float()
            # d logp_t / d z = onehot(t) - softmax(z), times the incoming gradient of each token
            z = _logits(h, w, b, dtype)
            dz = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True)).exp_().mul_(-g.unsqueeze(-1))  # in place: one buffer
            dz.scatter_add_(-1, targets[start : start + ctx.chunk_size].unsqueeze(-1), g.unsqueeze(-1))
            dz_mm = dz.to(w.dtype)
            if grad_h is not None:
                grad_h[start : start + ctx.chunk_size] = (dz_mm @ w).to(hidden.dtype)
            if grad_w is not None and w.dtype == acc:
                grad_w.addmm_(dz.t().to(acc), h.to(acc))  # in place: no [vocab, hidden] temporary per chunk
            elif grad_w is not None:  # a half-precision matmul (as autograd runs it), summed in fp32
                grad_w.add_(dz_mm.t() @ h.to(w.dtype))
            if grad_b is not None:
                grad_b.add_(dz.sum(0).to(acc))
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_head_logps(
    head: torch.nn.Linear,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    with_sum_sq: bool,
    dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[T]`` of ``targets`` under ``head(hidden)`` (``hidden`` ``[T, H]``, at least one token), and WPO's
    ``log sum_v p_v^2`` ``[T]`` when asked for. ``dtype``: the dtype autocast runs the head's matmul in right now
    (:func:`autocast_dtype`), or None."""
    logps, sum_sq = _ChunkedHeadLogps.apply(hidden, head.weight, head.bias, targets, chunk_size, dtype, with_sum_sq)
    return logps, (sum_sq if with_sum_sq else None)
