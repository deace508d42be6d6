"""The Liger path (``--use_liger_kernel``): Liger's model kernels (the fused log-probs: ``objectives.logprobs``).

Liger's Triton kernels need CUDA. On any other device the flag says so once and the run uses the chunked log-probs,
which compute the same values in pure PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from open_instruct.engine import unwrap_model

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
    # liger-kernel is optional (CUDA runs with --use_liger_kernel only)
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
