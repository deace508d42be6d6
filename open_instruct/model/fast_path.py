"""Which batch layout a run uses, chosen once after the model is loaded, and why.

``--packing`` is a tri-state: ``true`` (bare ``--packing``, open-instruct's spelling) packs, ``false`` pads, and the
default (unset, ``None``) takes the fastest layout proven equal to padded batches on this device:
- CPU (and any non-CUDA device): packed rows with per-sequence attention (``sdpa_varlen``), proven equal to padded
  batches by tests/test_packing.py; it skips the padding's compute and activations.
- CUDA: padded batches grouped by length, until the GPU suite (scripts/bench/gpu_suite.py) has proven a packed kernel
  (flash-attention varlen, ``torch_varlen``, ``sdpa_varlen``) equal to padded batches on a real GPU. ``--packing`` opts in.
- padded wherever packing cannot apply: ``--separate_forward`` (it splits padded rows) or a model whose attention does
  not go through transformers' attention interface (its attention would ignore the packed boundaries).
``--group_by_length`` is a tri-state too: unset, it is on exactly when the default chose padded batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from open_instruct.engine import unwrap_model
from open_instruct.model.packing import prepare_model_for_packing

EQUALITY_PROOF = "tests/test_packing.py"


@dataclass(frozen=True)
class BatchLayout:
    """The chosen layout: ``packing``, ``group_by_length`` (padded only), the attention it runs and why."""

    packing: bool
    group_by_length: bool
    attention: str
    reason: str

    def describe(self) -> str:
        """The one line the run prints."""
        if self.packing:
            return f"batching: packed rows, attention {self.attention} ({self.reason})"
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


def choose_batch_layout(
    model: Any,
    device: torch.device,
    packing: bool | None,
    group_by_length: bool | None,
    separate_forward: bool,
    resumed: dict[str, Any] | None = None,
) -> BatchLayout:
    """Resolve ``--packing``/``--group_by_length`` for this model and device; switches the model's attention to a
    packed implementation when packing is chosen. ``resumed``: the signature of the checkpoint this run resumes
    (its layout wins over the default, so a run started by an older version or on other hardware resumes exactly)."""
    current = unwrap_model(model).config._attn_implementation
    if packing is None and resumed is not None and isinstance(resumed.get("packing"), bool):
        packing = resumed["packing"]
        if group_by_length is None:
            group_by_length = bool(resumed.get("group_by_length"))
        layout = choose_batch_layout(model, device, packing, group_by_length, separate_forward)
        return dataclasses.replace(layout, reason="default: the layout of the checkpoint being resumed")
    if packing is False:
        return BatchLayout(False, bool(group_by_length), current, "--packing false")
    if packing:
        return BatchLayout(True, bool(group_by_length), prepare_model_for_packing(model), "--packing")
    blocker = packing_blocker(model, separate_forward)
    grouped = group_by_length is not False
    if blocker is not None:
        return BatchLayout(False, grouped, current, f"default; cannot pack: {blocker}")
    if device.type == "cuda":
        return BatchLayout(
            False,
            grouped,
            current,
            "default on CUDA until the GPU suite proves a packed kernel equal to padded batches on a GPU; "
            "--packing opts in",
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
