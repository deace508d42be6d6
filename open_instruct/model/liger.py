"""The Liger path (``--use_liger_kernel``): where it runs, and Liger's model kernels (the fused log-probs:
:mod:`open_instruct.objectives.fused_head`).

Liger's Triton kernels run on CUDA; on CPU, Triton's interpreter (``TRITON_INTERPRET=1``, read once when Triton is
first imported) runs the fused linear cross-entropy but not the RMSNorm kernel, so there only the log-prob kernel is
used. Anywhere else, and with a liger-kernel too old for per-token gradients, one ``note:`` line says why and the run
uses the chunked log-probs, which compute the same values in pure PyTorch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from packaging.version import Version

from open_instruct.engine import unwrap_model

# Before 0.8.2, reduction="none" back-propagated the per-token loss as if summed (objectives/fused_head.py).
MIN_LIGER_VERSION = "0.8.2"


def liger_version_problem() -> str | None:
    """Why the installed liger-kernel cannot serve the fused log-probs (missing, too old), or None when it can."""
    try:
        installed = version("liger-kernel")
    except PackageNotFoundError:
        return f"liger-kernel is not installed (pip install 'liger-kernel>={MIN_LIGER_VERSION}')"
    if Version(installed) < Version(MIN_LIGER_VERSION):
        return (
            f"liger-kernel {installed} computes reduction='none' gradients without the per-token upstream gradient; "
            f"upgrade: pip install 'liger-kernel>={MIN_LIGER_VERSION}'"
        )
    return None


INTERPRETER_NOTE = (
    "note: --use_liger_kernel under Triton's interpreter (TRITON_INTERPRET=1, CPU): only the fused log-prob kernel "
    "runs; RMSNorm, RoPE and SwiGLU stay PyTorch's (Liger's RMSNorm kernel fails under the interpreter)"
)


def interpreted(device: torch.device | str) -> bool:
    """Whether Triton's interpreter runs kernels on ``device`` (a CPU device with ``TRITON_INTERPRET=1``)."""
    return torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def liger_unavailable_reason(device: torch.device | str) -> str | None:
    """Why Liger's fused log-prob kernel cannot run on ``device`` here, or None when it can."""
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if not (on_cuda or interpreted(device)):
        return "Liger's Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU) and this run has none"
    problem = liger_version_problem()
    if problem is not None:
        return problem
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


def liger_available(device: torch.device | str) -> bool:
    """Whether Liger's fused log-prob kernel can run on ``device`` (:func:`liger_unavailable_reason`)."""
    return liger_unavailable_reason(device) is None


def apply_liger_kernels(model: Any) -> None:
    """Patch the model in place with Liger's RMSNorm, RoPE and SwiGLU kernels (where Liger supports its type).

    The fused-linear cross-entropy patch of the model's own forward is left off: our log-probs never call the
    model's head through ``forward(labels=...)``, they call :func:`~open_instruct.objectives.logprobs.liger_logprobs`.
    """
    # liger-kernel is optional (runs with --use_liger_kernel only)
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
    """The log-prob implementation for this run: ``liger`` (model kernels applied to ``model`` on CUDA) or
    ``chunked``; where Liger was asked for and cannot run, or runs only in part, one ``note:`` line says so."""
    if not use_liger_kernel:
        return "chunked"
    reason = liger_unavailable_reason(device)
    if reason is not None:
        print_fn(f"note: --use_liger_kernel: {reason}; log-probs use the chunked path (pure PyTorch, same values)")
        return "chunked"
    if interpreted(device):
        print_fn(INTERPRETER_NOTE)
    else:
        apply_liger_kernels(model)
    return "liger"
