"""Which batch layout a run uses, chosen once after the model is loaded, and why.

``--packing`` is a tri-state: ``true`` (bare ``--packing``, open-instruct's spelling) packs, ``false`` pads, and the
default (unset, ``None``) takes the fastest layout proven equal to padded batches on this device:
- CPU (and any non-CUDA device): packed rows with per-sequence attention (``sdpa_varlen``), proven equal to padded
  batches by tests/model/test_packing.py; it skips the padding's compute and activations.
- CUDA in bf16/fp16: packed rows under ``torch_varlen`` (PyTorch's flash varlen kernel, one call per row), proven
  equal to padded batches on an H200 by the GPU suite's tests (tests/model/test_gpu_paths.py) and 1.5x padded batches'
  tokens/s there, where ``sdpa_varlen``'s per-sequence calls ran at 0.24x ``torch_varlen`` (BENCHMARKS.md, GPU suite). Packing on CUDA
  (default or ``--packing``) takes ``torch_varlen`` in place of ``sdpa_varlen`` whenever the precision allows.
- CUDA otherwise (fp32, no ``torch.nn.attention.varlen``, or flash-attention, whose packed path the suite has not
  measured): padded batches grouped by length. ``--packing`` opts in.
- padded wherever packing cannot apply: ``--separate_forward`` (it splits padded rows) or a model whose attention does
  not go through transformers' attention interface (its attention would ignore the packed boundaries).
``--group_by_length`` is a tri-state too: unset, it is on exactly when the default chose padded batches.
``--share_prompt`` as well: unset, packed rows under ``sdpa_varlen`` off CUDA hold each pair's common prefix once
(proven equal to padded batches, gradients included, by tests/model/test_prompt_sharing.py); on CUDA it is opt-in
until the GPU suite has measured it. It needs packed rows under ``sdpa_varlen`` (the kernel with the pair mask) and
is refused with the MoE load-balancing loss, which would count each prompt's router choices once instead of twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from open_instruct.engine import unwrap_model
from open_instruct.errors import UserError
from open_instruct.model.packed_kernels import (
    HALF_PRECISIONS,
    TORCH_VARLEN,
    register_packed_kernels,
    torch_varlen_available,
)
from open_instruct.model.packing import VARLEN_SDPA, packed_attention_implementation, prepare_model_for_packing

EQUALITY_PROOF = "tests/model/test_packing.py"
SHARING_PROOF = "tests/model/test_prompt_sharing.py"
GPU_PROOF = "proven equal to padded batches on an H200 (tests/model/test_gpu_paths.py; BENCHMARKS.md, GPU suite)"


@dataclass(frozen=True)
class BatchLayout:
    """The chosen layout: ``packing``, ``group_by_length`` (padded only), the attention it runs and why, and whether
    packed rows hold each pair's common prefix once (``share_prompt``)."""

    packing: bool
    group_by_length: bool
    attention: str
    reason: str
    share_prompt: bool = False
    sharing_reason: str = ""

    def describe(self) -> str:
        """The one line the run prints."""
        if self.packing:
            shared = f"; each pair's prompt once ({self.sharing_reason})" if self.share_prompt else ""
            return f"batching: packed rows, attention {self.attention} ({self.reason}){shared}"
        grouped = ", grouped by length" if self.group_by_length else ""
        return f"batching: padded rows{grouped}, attention {self.attention} ({self.reason})"


def packing_blocker(model: Any, separate_forward: bool) -> str | None:
    """Why this run cannot pack, or None."""
    if separate_forward:
        return "--separate_forward splits padded rows"
    inner = unwrap_model(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if not getattr(base, "_supports_attention_backend", False):
        return f"{type(base).__name__} does not route attention through transformers' attention interface"
    return None


def varlen_kernel_fits(model: Any, device: torch.device, half_precision: bool) -> bool:
    """Whether packing here should take ``torch_varlen``: CUDA, bf16/fp16 compute, PyTorch with the kernel, and a
    model that would otherwise get ``sdpa_varlen`` (flash-attention and our other packed kernels are kept)."""
    current = unwrap_model(model).config._attn_implementation
    return (
        device.type == "cuda"
        and half_precision
        and packed_attention_implementation(current) == VARLEN_SDPA
        and torch_varlen_available()
    )


def computes_in_half(model: Any, mixed_precision: str | None) -> bool:
    """Whether the decoder runs in bf16/fp16: mixed precision asks for it, or the weights were loaded that way."""
    return mixed_precision in HALF_PRECISIONS or unwrap_model(model).dtype in (torch.bfloat16, torch.float16)


def _use_torch_varlen(model: Any) -> str:
    register_packed_kernels()
    unwrap_model(model).set_attn_implementation(TORCH_VARLEN)
    return TORCH_VARLEN


def _pack(model: Any, device: torch.device, half_precision: bool) -> str:
    """Switch the model to the packed attention this device runs best; returns its name."""
    if varlen_kernel_fits(model, device, half_precision):
        return _use_torch_varlen(model)
    return prepare_model_for_packing(model)


def share_prompt_blocker(layout: BatchLayout, load_balancing: bool) -> str | None:
    """Why this layout cannot hold each pair's prompt once, or None."""
    if not layout.packing:
        return "it needs packed rows (--packing)"
    if layout.attention != VARLEN_SDPA:
        return f"attention {layout.attention} has no prompt-sharing path ({VARLEN_SDPA} has)"
    if load_balancing:
        return "the MoE load-balancing loss would count each prompt's router choices once instead of twice"
    return None


def with_prompt_sharing(
    layout: BatchLayout, device: torch.device, share_prompt: bool | None, load_balancing: bool = False
) -> BatchLayout:
    """``layout`` with ``--share_prompt`` resolved: given, it is kept or refused; unset, on where proven (off CUDA)."""
    if share_prompt is False:
        return layout
    blocker = share_prompt_blocker(layout, load_balancing)
    if share_prompt and blocker:
        raise UserError(f"--share_prompt: {blocker}")
    if blocker or (share_prompt is None and device.type == "cuda"):
        return layout
    why = "--share_prompt" if share_prompt else f"default off CUDA: proven equal to padded batches ({SHARING_PROOF})"
    return dataclasses.replace(layout, share_prompt=True, sharing_reason=why)


def choose_batch_layout(
    model: Any,
    device: torch.device,
    packing: bool | None,
    group_by_length: bool | None,
    separate_forward: bool,
    resumed: dict[str, Any] | None = None,
    half_precision: bool = False,
) -> BatchLayout:
    """Resolve ``--packing``/``--group_by_length`` for this model and device; switches the model's attention to a
    packed implementation when packing is chosen. ``resumed``: the signature of the checkpoint this run resumes
    (its layout wins over the default, so a run started by an older version or on other hardware resumes exactly).
    ``half_precision``: the decoder computes in bf16/fp16 (the kernel ``torch_varlen`` needs)."""
    current = unwrap_model(model).config._attn_implementation
    if packing is None and resumed is not None and isinstance(resumed.get("packing"), bool):
        packing = resumed["packing"]
        if group_by_length is None:
            group_by_length = bool(resumed.get("group_by_length"))
        layout = choose_batch_layout(model, device, packing, group_by_length, separate_forward, None, half_precision)
        return dataclasses.replace(layout, reason="default: the layout of the checkpoint being resumed")
    if packing is False:
        return BatchLayout(False, bool(group_by_length), current, "--packing false")
    if packing:
        return BatchLayout(True, bool(group_by_length), _pack(model, device, half_precision), "--packing")
    blocker = packing_blocker(model, separate_forward)
    grouped = group_by_length is not False
    if blocker is not None:
        return BatchLayout(False, grouped, current, f"default; cannot pack: {blocker}")
    if varlen_kernel_fits(model, device, half_precision):  # CUDA only
        return BatchLayout(True, bool(group_by_length), _use_torch_varlen(model), f"default on cuda: {GPU_PROOF}")
    if device.type == "cuda":
        return BatchLayout(
            False,
            grouped,
            current,
            "default on CUDA without torch_varlen (needs bf16/fp16 and torch.nn.attention.varlen; flash-attention's "
            "packed path is not yet measured by the GPU suite); --packing opts in",
        )
    attention = prepare_model_for_packing(model)
    return BatchLayout(
        True,
        bool(group_by_length),
        attention,
        f"default on {device.type}: proven equal to padded batches ({EQUALITY_PROOF})",
    )


def needs_padding_mask(model: Any, load_balancing: bool) -> bool:
    """Whether padded forwards must pass the padding mask. Our collator pads on the right, so under causal attention
    no real token sees a pad and the mask changes nothing the loss reads; without it sdpa takes its causal
    (flash) kernel instead of building an ``[rows, 1, L, L]`` mask for every layer. Kept for flash-attention (it uses
    the mask to skip the padding) and for the MoE load-balancing loss (it leaves padded tokens out by the mask)."""
    attention = unwrap_model(model).config._attn_implementation or ""
    return load_balancing or attention.startswith("flash_attention")
