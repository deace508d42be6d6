"""Label-token log-probs computed as the output layer's own forward: Liger's fused kernel, or any projection.

Why inside the head's forward: an engine makes a sharded output layer whole only around a call of that module.
DeepSpeed ZeRO-3 all-gathers its weight in the module's pre-forward hook (and frees it in the post-forward hook);
FSDP2 unshards the root group, which holds the output layer, in the model's pre-forward hook and reduces its gradient
after the backward. A computation that reads ``head.weight`` outside that call sees ZeRO-3's empty ``[0]`` partition
or FSDP2's local shard. So for one forward the output layer's ``forward`` is replaced: called by the model with all
positions' hidden states ``[N, L, H]`` (``logits_to_keep=0``), it returns the label tokens' log-probs ``[T]`` as the
model's "logits", reading the weight while the engine holds it whole. On an unsharded model the same call costs
nothing extra (the decoder runs once either way).

Liger's fused linear cross-entropy never holds more than a chunk of the ``[T, V]`` logits. With ``reduction="none"``
it keeps ``-log p`` per token and recomputes the gradient in the backward from the saved input and weight (a detached
alias of the gathered storage, which the engine's later free does not clear); liger-kernel before 0.8.2 computed
that gradient in the forward without the per-token upstream gradient, which is wrong for any loss but a plain sum,
hence the version check in :mod:`open_instruct.model.liger`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from open_instruct.data.tokenize import IGNORE_INDEX
from open_instruct.engine import unwrap_model
from open_instruct.objectives.head_projection import autocast_dtype


def as_head_forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    project: Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor],
    **forward_kwargs: Any,
) -> torch.Tensor:
    """``project(forward, hidden)`` run as the output layer's forward inside one call of ``model``; returns its result.

    ``hidden`` is the decoder's output at every position ``[N, L, H]``; ``forward`` the layer's own forward, which
    ``project`` may call; the layer's parameters are whole for the duration of the call (see the module docstring). The model is called through any wrapper, so
    an engine's per-forward bookkeeping runs as for any forward.
    """
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    if "logits_to_keep" in inspect.signature(inner.forward).parameters:
        forward_kwargs = {**forward_kwargs, "logits_to_keep": 0}
    own = head.__dict__.get("forward")  # an instance-level forward (a hook library's) to put back afterwards
    original = head.forward
    head.forward = lambda hidden: project(original, hidden)
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs).logits
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def fused_label_logps(head: torch.nn.Module, selected: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probs ``[T]`` of ``targets`` ``[T]`` under ``head(selected)`` (``selected`` ``[T, H]``), by Liger's fused
    linear cross-entropy on the head's weight and bias as they are now (call it where they are whole)."""
    # liger-kernel is optional (runs with --use_liger_kernel only); looked up per call so a test can count the calls
    from liger_kernel.transformers import functional

    if selected.shape[0] == 0:  # no label token: an empty [0] tensor that stays on the graph
        return selected.float().sum(-1)
    weight, bias = head.weight, head.bias
    dtype = autocast_dtype(selected.device)
    if dtype is not None:  # Triton kernels ignore autocast: cast as autocast would for the head's matmul
        selected, weight = selected.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    nll = functional.liger_fused_linear_cross_entropy(
        selected,
        weight,
        targets,
        bias=bias,
        ignore_index=IGNORE_INDEX,
        reduction="none",
        accum_dtype=torch.float32,
    )
    return -nll.float()


def fused_head_logps(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    select: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    **forward_kwargs: Any,
) -> torch.Tensor:
    """Label-token log-probs ``[T]`` by Liger's fused kernel, run as the output layer's own forward.

    ``select`` takes the label-predicting positions ``[T, H]`` out of the decoder's output ``[N, L, H]``; ``targets``
    ``[T]`` are the label tokens (``LabelTokens.select`` / ``.targets``)."""

    head = unwrap_model(model).get_output_embeddings()

    def project(_forward: Any, hidden: torch.Tensor) -> torch.Tensor:
        return fused_label_logps(head, select(hidden), targets)

    return as_head_forward(model, input_ids, attention_mask, project, **forward_kwargs)
