"""The Liger path (``--use_liger_kernel``): Liger's model kernels and its fused linear cross-entropy for log-probs.

Liger's Triton kernels need CUDA. On any other device the flag says so once and the run uses the chunked log-probs,
which compute the same values in pure PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from open_instruct.data.tokenize import IGNORE_INDEX
from open_instruct.logprobs import (
    SequenceLogprobs,
    chunked_logprobs,
    decoder_hidden_states,
    next_token_targets,
    reduce_token_logps,
    unwrap_model,
)

CPU_FALLBACK_MESSAGE = (
    "--use_liger_kernel: Liger kernels need a CUDA device and this run has none; "
    "falling back to the chunked log-probs (pure PyTorch, same values)"
)


def liger_available(device: torch.device | str) -> bool:
    """Whether Liger's kernels can run on ``device`` (CUDA with Triton and liger_kernel installed)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def apply_liger_kernels(model: Any) -> None:
    """Patch the model in place with Liger's RMSNorm, RoPE and SwiGLU kernels (where Liger supports its type).

    The fused-linear cross-entropy patch of the model's own forward is left off: our log-probs never call the
    model's head through ``forward(labels=...)``, they call :func:`liger_logprobs`.
    """
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=unwrap_model(model),
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )


def resolve_logprob_impl(
    use_liger_kernel: bool, model: Any, device: torch.device | str, print_fn: Callable[[str], Any] = print
) -> str:
    """The log-prob implementation for this run: ``liger`` (kernels applied to ``model``) or ``chunked``."""
    if not use_liger_kernel:
        return "chunked"
    if not liger_available(device):
        print_fn(CPU_FALLBACK_MESSAGE)
        return "chunked"
    apply_liger_kernels(model)
    return "liger"


def liger_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **forward_kwargs: Any
) -> SequenceLogprobs:
    """Label-token log-probs via Liger's fused linear cross-entropy on the label positions' hidden states ``[T, H]``.

    The kernel never holds more than a chunk of the ``[T, V]`` logits; with ``reduction="none"`` it returns the
    per-token cross-entropy ``-log p`` and back-propagates per-token gradients.
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    head = unwrap_model(model).get_output_embeddings()
    if getattr(head.weight, "ds_id", None) is not None:
        # A ZeRO-3 partitioned head: only the module call gathers it, which the chunked path does.
        return chunked_logprobs(model, input_ids, attention_mask, labels, **forward_kwargs)
    hidden = decoder_hidden_states(model, input_ids, attention_mask, **forward_kwargs)
    targets, mask = next_token_targets(labels)
    selected = hidden[:, :-1][mask]  # [T, H]
    if selected.shape[0] == 0:
        return reduce_token_logps(selected.float().sum(-1), mask)
    nll = liger_fused_linear_cross_entropy(
        selected,
        head.weight,
        targets[mask],
        bias=head.bias,
        ignore_index=IGNORE_INDEX,
        reduction="none",
        accum_dtype=torch.float32,
    )
    return reduce_token_logps(-nll.float(), mask)
