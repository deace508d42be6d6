"""Two more packed-attention kernels from PyTorch itself, as transformers attention implementations.

``sdpa_varlen`` (open_instruct/model/packing.py) loops over the sequences of a packed row; these run the row in one call:
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash-attention's varlen kernel shipped in PyTorch;
  CUDA only, bf16/fp16), reading ``cu_seq_lens_q`` like flash-attention does.
- ``flex_packed``: FlexAttention with a causal document mask built from ``cu_seq_lens_q``. Called uncompiled it runs
  PyTorch's reference implementation (``T^2`` memory; forward on any device, backward on CUDA only): right for
  checks, not for speed.

Both are registered on demand (:func:`register_packed_kernels`) and measured by the GPU suite. ``torch_varlen`` is also a
user's choice, ``--attn_implementation torch_varlen`` (CUDA, bf16/fp16): packing keeps it, and padded batches (the
evaluation's, ``--packing false``) run plain causal SDPA.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import torch

from open_instruct.model.packing import packed_attention, sdpa_padded

TORCH_VARLEN = "torch_varlen"
FLEX_PACKED = "flex_packed"
HALF_PRECISIONS = ("bf16", "fp16")  # the only ones torch_varlen's kernel takes


def torch_varlen_available() -> bool:
    """Whether this PyTorch ships ``torch.nn.attention.varlen`` (2.10 and later)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def _torch_varlen(query, key, value, cu_seq_lens, scaling, longest, dropout) -> torch.Tensor:
    """Causal varlen attention over a packed row: ``query`` ``[1, H, T, D]``, ``key``/``value`` ``[1, Hkv, T, D]``;
    returns ``[1, T, H, D]``. (No dropout: these kernels serve measurements.)"""
    # newer torch only: callers check torch_varlen_available() first
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    if q.dtype == torch.float32 and torch.is_autocast_enabled(q.device.type):
        # Under autocast, RoPE's fp32 cos/sin promote q and k back to fp32; the kernel takes bf16/fp16 only.
        half = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(half), k.to(half), v.to(half)
    params = inspect.signature(varlen_attn).parameters
    options: dict[str, Any] = {"scale": scaling}
    options.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    cu = cu_seq_lens.to(torch.int32)
    longest = int(longest) if longest is not None else int(cu.diff().max())
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **options)
    return out.unsqueeze(0)


def document_ids(cu_seq_lens: torch.Tensor, total: int) -> torch.Tensor:
    """The sequence index of every position ``[T]`` of a packed row with these cumulative lengths ``[S + 1]``."""
    starts = torch.zeros(total, dtype=torch.long, device=cu_seq_lens.device)
    starts[cu_seq_lens[1:-1].long()] = 1
    return starts.cumsum(0)


def _flex_packed(query, key, value, cu_seq_lens, scaling, longest, dropout) -> torch.Tensor:
    """FlexAttention with a causal same-sequence mask over a packed row; shapes as :func:`_torch_varlen`."""
    # only the flex_packed kernel needs it
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = query.shape[2]
    doc = document_ids(cu_seq_lens, total)

    def same_sequence_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block = create_block_mask(same_sequence_causal, None, None, total, total, device=query.device)
    gqa = key.shape[1] != query.shape[1]
    out = flex_attention(query, key, value, block_mask=block, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


torch_varlen_attention = packed_attention(TORCH_VARLEN, _torch_varlen, sdpa_padded)
flex_packed_attention = packed_attention(FLEX_PACKED, _flex_packed)


def register_packed_kernels() -> None:
    """Make ``torch_varlen`` and ``flex_packed`` valid ``attn_implementation`` names (idempotent)."""
    # transformers takes seconds to import: --help, validation and the planner never need it
    from transformers import AttentionInterface

    AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention)
    AttentionInterface.register(FLEX_PACKED, flex_packed_attention)
