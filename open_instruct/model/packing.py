"""Padding-free (packed) forwards: many sequences end to end in one row, each attending only to itself.

A packed row ``[1, T]`` holds the chosen then the rejected sequences of a micro-batch. Positions restart at 0 for every
sequence, and the boundaries travel as ``cu_seq_lens`` (cumulative lengths ``[S + 1]``, int32) to attention:
- flash-attention (GPU): transformers' own varlen path reads ``cu_seq_lens_q/k`` and ``max_length_q/k``.
- everywhere else: ``sdpa_varlen``, registered here, runs causal SDPA on each sequence's slice. ``position_ids`` alone
  do not isolate the sequences under transformers 5's sdpa/eager paths when a 2D mask is given, and a block-diagonal
  ``[T, T]`` mask would cost ``T^2`` memory and compute; per-slice attention costs ``sum(L_i^2)`` like padding does.

Log-probs come from the same :func:`open_instruct.objectives.logprobs.sequence_logprobs` as the padded path; only the final
per-token values are summed per sequence instead of per row.

A prompt-sharing row (:class:`open_instruct.data.collate.SharedPromptPairCollator`) holds one segment per pair: the
shared prompt, the chosen rest, the rejected rest. ``sdpa_varlen`` runs each segment as one SDPA call under a mask
that is causal except that the rejected rest does not see the chosen rest; every query then sees exactly the keys it
would see in its own sequence, at the same positions, so the hidden states are those of the unshared layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from open_instruct.data.tokenize import IGNORE_INDEX
from open_instruct.engine import unwrap_model
from open_instruct.objectives.logprobs import LabelTokens, SequenceLogprobs, sequence_logprobs

VARLEN_SDPA = "sdpa_varlen"
# Every attention implementation built by :func:`packed_attention`: each honours packed boundaries, so packing keeps it.
PACKED_IMPLEMENTATIONS: set[str] = set()


# A kernel for one packed row: (query [1, H, T, D], key and value [1, Hkv, T, D], cu_seq_lens [S + 1], scaling,
# longest sequence or None, dropout) -> [1, T, H, D], each sequence attending causally to itself alone.
PackedKernel = Callable[..., torch.Tensor]
AttentionFn = Callable[..., tuple[torch.Tensor, None]]


def packed_attention(
    name: str,
    kernel: PackedKernel,
    unpacked: Callable[..., torch.Tensor] | None = None,
    shared: Callable[..., torch.Tensor] | None = None,
) -> AttentionFn:
    """``kernel`` behind transformers' attention-function signature, for ``attn_implementation=name``.

    A packed batch (``cu_seq_lens_q`` given) must be one row; any other batch goes to ``unpacked(query, key, value,
    attention_mask, dropout, scaling)`` (``[B, T, H, D]`` out), or is refused when there is none. A prompt-sharing
    row (``prompt_lens`` given) goes to ``shared(query, key, value, cu_seq_lens, prompt_lens, chosen_lens, scaling,
    dropout)``, or is refused when there is none. Dropout applies in training mode only."""

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        max_length_q: int | None = None,
        prompt_lens: torch.Tensor | None = None,
        chosen_lens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        dropout = dropout if module.training else 0.0
        if prompt_lens is not None:
            if shared is None:
                raise ValueError(f"{name} attention cannot run a prompt-sharing row")
            return shared(query, key, value, cu_seq_lens_q, prompt_lens, chosen_lens, scaling, dropout), None
        if cu_seq_lens_q is None:
            if unpacked is None:
                raise ValueError(f"{name} attention needs a packed batch (cu_seq_lens_q)")
            return unpacked(query, key, value, attention_mask, dropout, scaling), None
        if query.shape[0] != 1:
            raise ValueError(f"packed attention expects one row, got a batch of {query.shape[0]}")
        return kernel(query, key, value, cu_seq_lens_q, scaling, max_length_q, dropout), None

    attention.__name__ = f"{name}_attention"
    PACKED_IMPLEMENTATIONS.add(name)
    return attention


def _repeat_kv(key: torch.Tensor, value: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query key/value heads repeated up to the query's ``heads``."""
    n_rep = heads // key.shape[1]
    if n_rep == 1:
        return key, value
    return key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)


def sdpa_padded(query, key, value, attention_mask, dropout, scaling) -> torch.Tensor:
    """Plain causal SDPA (right padding needs no mask under causal attention), honouring a 4D mask when given."""
    key, value = _repeat_kv(key, value, query.shape[1])
    causal = attention_mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal
    )
    return out.transpose(1, 2).contiguous()


def _sdpa_per_sequence(query, key, value, cu_seq_lens, scaling, longest, dropout) -> torch.Tensor:
    """Causal SDPA on each sequence's slice of the packed row."""
    key, value = _repeat_kv(key, value, query.shape[1])
    # One split (its backward is one concatenation), not per-sequence slicing: each slice's backward would
    # allocate and zero a gradient the size of the whole row.
    lengths = cu_seq_lens.diff().tolist()
    pieces = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return out.transpose(1, 2).contiguous()


def _sdpa_shared_prompt(query, key, value, cu_seq_lens, prompt_lens, chosen_lens, scaling, dropout) -> torch.Tensor:
    """SDPA on each pair's segment of a prompt-sharing row: causal, except that the rejected rest (from
    ``chosen_lens``) does not see the chosen rest (from ``prompt_lens``). A boolean mask keeps PyTorch's fused
    kernel on CPU; the mask is a segment's ``L^2`` booleans, rebuilt per layer (microseconds)."""
    key, value = _repeat_kv(key, value, query.shape[1])
    lengths = cu_seq_lens.diff().tolist()
    pieces = []
    splits = (query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    for q, k, v, n, p, c in zip(*splits, lengths, prompt_lens.tolist(), chosen_lens.tolist()):
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril_()
        mask[c:, p:c] = False
        pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling))
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return out.transpose(1, 2).contiguous()


# Causal attention per packed sequence, like transformers' attention functions: ``query`` ``[1, H, T, D]``,
# ``key``/``value`` ``[1, Hkv, T, D]`` in, ``[1, T, H, D]`` out; an unpacked batch runs plain causal SDPA.
varlen_sdpa_attention = packed_attention(VARLEN_SDPA, _sdpa_per_sequence, sdpa_padded, _sdpa_shared_prompt)


def register_varlen_attention() -> None:
    """Make ``sdpa_varlen`` a valid ``attn_implementation`` for transformers models (idempotent)."""
    # transformers takes seconds to import: --help, validation and the planner never need it
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)


def packed_attention_implementation(current: str | None) -> str:
    """The attention implementation a packed run needs: flash-attention (it reads the varlen kwargs natively) and our
    packed kernels (``torch_varlen``, ``flex_packed``) stay; sdpa, eager and anything else become ``sdpa_varlen``."""
    if current and (current.startswith("flash_attention") or current in PACKED_IMPLEMENTATIONS):
        return current
    return VARLEN_SDPA


def prepare_model_for_packing(model: Any) -> str:
    """Switch the model to an attention implementation that honours packed boundaries; returns its name."""
    inner = unwrap_model(model)
    target = packed_attention_implementation(inner.config._attn_implementation)
    if target == VARLEN_SDPA:
        register_varlen_attention()
    if inner.config._attn_implementation != target:
        inner.set_attn_implementation(target)
    return target


def packed_forward_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model keyword arguments that carry a packed batch's boundaries (positions and cumulative lengths)."""
    cu = batch["cu_seq_lens"]
    max_length = int(batch["max_length"]) if "max_length" in batch else int(cu.diff().max())
    kwargs = {
        "position_ids": batch["position_ids"],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }
    if shares_prompt(batch):
        kwargs.update(prompt_lens=batch["prompt_lens"], chosen_lens=batch["chosen_lens"])
    return kwargs


def shares_prompt(batch: dict[str, torch.Tensor]) -> bool:
    """Whether ``batch`` is a prompt-sharing packed row (one segment per pair)."""
    return "prompt_lens" in batch


def packed_sequence_logprobs(
    model: Any,
    batch: dict[str, torch.Tensor],
    impl: str = "chunked",
    chunk_size: int | None = None,
    with_sum_sq: bool = False,
) -> SequenceLogprobs:
    """Per-sequence log-probs ``[S]`` of a packed batch, in the collator's sequence order (chosen, then rejected).

    The row's labels already hide the first token of every sequence, so no target crosses a boundary. A
    prompt-sharing row names the positions that predict each label token itself."""
    if shares_prompt(batch):
        tokens = LabelTokens.at_positions(
            batch["target_positions"], batch["targets"], batch["target_seq"], 2 * batch["index"].shape[0]
        )
        kwargs = packed_forward_kwargs(batch)
        return sequence_logprobs(model, batch["input_ids"], None, tokens, impl, chunk_size, with_sum_sq, **kwargs)
    row = sequence_logprobs(
        model,
        batch["input_ids"],
        None,
        batch["labels"],
        impl=impl,
        chunk_size=chunk_size,
        with_sum_sq=with_sum_sq,
        **packed_forward_kwargs(batch),
    )
    labels = batch["labels"]
    seq_ids = batch["sequence_ids"][:, :-1][
        labels[:, 1:] != IGNORE_INDEX
    ]  # [T_labels], the sequence of each target token
    n = batch["cu_seq_lens"].shape[0] - 1
    sums = torch.zeros(n, dtype=row.token_logps.dtype, device=row.token_logps.device).index_add(
        0, seq_ids, row.token_logps
    )
    counts = torch.zeros(n, dtype=torch.long, device=labels.device).index_add(0, seq_ids, torch.ones_like(seq_ids))
    return SequenceLogprobs(
        sums=sums, counts=counts, token_logps=row.token_logps, token_seq=seq_ids, token_log_sum_sq=row.token_log_sum_sq
    )
