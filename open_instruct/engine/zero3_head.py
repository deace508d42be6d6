"""Chunked log-probs through an output layer that DeepSpeed ZeRO-3 partitions (LoRA / QLoRA and full weights).

Why not ``torch.utils.checkpoint`` around each chunk, as for a trainable head: the non-reentrant checkpoint keeps a
recomputed tensor that does not require grad by reference instead of as a detached alias. The frozen head weight is
such a tensor, and ZeRO-3's post-forward hook frees it in place (``param.data`` becomes an empty ``[0]`` tensor) as
soon as the head's forward inside the recomputation ends, so the backward finds ``[0]`` where it saved ``[V, H]``
(``CheckpointError: Recomputed values ... have different metadata``). A trainable weight is saved as a detached alias
that keeps the gathered storage, which is why full-weight ZeRO-3 trains.

Here the weight is gathered once for all chunks of the forward and once for all chunks of the backward: the same
number of collectives on every rank whatever its number of label tokens, and at most ``[chunk, V]`` logits at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def zero3_partitioned(head: torch.nn.Module) -> bool:
    """Whether ``head`` is a linear layer whose weight ZeRO-3 partitions."""
    return hasattr(getattr(head, "weight", None), "ds_id")


def partitioned_head_logps(
    selected: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk_size: int, token_logps: Callable
) -> torch.Tensor:
    """Log-probs ``[T]`` of ``targets`` under a ZeRO-3-partitioned ``head``; every rank calls it, also with ``T == 0``.

    Calling the head module once per chunk would all-gather its weight once per chunk: ranks with different numbers of
    label tokens would issue different numbers of collectives and hang or crash (gloo: "Received data size doesn't
    match expected size"). So: a frozen head, or no gradient, gathers once and runs the chunks (backward: recomputed);
    a trainable head is called once on all label tokens, so that ZeRO-3's hooks gather it and reduce its gradient
    (``[T, V]`` logits at once, the price of a trainable head under ZeRO-3).
    """
    if torch.is_grad_enabled() and head.weight.requires_grad:
        return token_logps(head(selected), targets)
    return _FrozenHeadLogps.apply(selected, targets, head, chunk_size, token_logps)


def _gathered(head: torch.nn.Module) -> Any:
    import deepspeed  # optional: installed for ZeRO runs only

    return deepspeed.zero.GatheredParameters(list(head.parameters(recurse=False)), modifier_rank=None)


def _chunks(
    selected: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk_size: int, token_logps: Callable
):
    for start in range(0, selected.shape[0], chunk_size):
        logits = F.linear(selected[start : start + chunk_size], head.weight, head.bias)
        yield token_logps(logits, targets[start : start + chunk_size])


class _FrozenHeadLogps(torch.autograd.Function):
    """Label-token log-probs ``[T]`` of hidden states ``[T, H]``; the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx: Any, selected, targets, head, chunk_size, token_logps):  # type: ignore[override]
        ctx.save_for_backward(selected, targets)
        ctx.head, ctx.chunk_size, ctx.token_logps = head, chunk_size, token_logps
        with torch.no_grad(), _gathered(head):
            pieces = list(_chunks(selected, targets, head, chunk_size, token_logps))
        return torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        selected, targets = ctx.saved_tensors
        grads = []
        with _gathered(ctx.head), torch.enable_grad():
            for start in range(0, selected.shape[0], ctx.chunk_size):
                h = selected[start : start + ctx.chunk_size].detach().requires_grad_()
                (logps,) = _chunks(
                    h, targets[start : start + ctx.chunk_size], ctx.head, h.shape[0] or 1, ctx.token_logps
                )
                grads.append(torch.autograd.grad(logps, h, grad[start : start + ctx.chunk_size])[0])
        grad_selected = torch.cat(grads) if grads else torch.zeros_like(selected)
        return grad_selected, None, None, None, None
