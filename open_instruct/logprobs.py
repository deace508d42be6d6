"""Per-sequence log-probabilities of the label tokens, without ever holding full-vocabulary logits by default.

Three implementations with one contract (``sequence_logprobs``):
- ``full``: the model's own logits, fp32 log-softmax, gather. Simple; memory ``[N, L, V]``. For tests and small vocabs.
- ``chunked`` (default): the decoder's hidden states at label positions only, times the output embedding in chunks of
  tokens; each chunk's logits are recomputed in the backward (activation checkpointing), so at most ``[chunk, V]``
  logits exist at once. The output layer is called as a module, so ZeRO-3 gathers its (partitioned) weight through its
  own hooks. Pure PyTorch: CPU and GPU.
- ``liger``: the same label-position hidden states through Liger's fused linear cross-entropy (CUDA only), see
  :mod:`open_instruct.logprobs_liger`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from open_instruct.data.tokenize import IGNORE_INDEX

# Config fields that change logits after the output projection; the chunked path does not apply them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class SequenceLogprobs:
    """Log-probs of the label tokens: per sequence ``sums``/``counts`` ``[N]``, per token ``token_logps`` ``[T]``."""

    sums: torch.Tensor
    counts: torch.Tensor
    token_logps: torch.Tensor
    token_seq: torch.Tensor

    @property
    def means(self) -> torch.Tensor:
        """Average log-prob per label token ``[N]`` (0 for a sequence without labels)."""
        return self.sums / self.counts.clamp(min=1).to(self.sums.dtype)


def unwrap_model(model: Any) -> Any:
    """The Hugging Face model inside DDP / DeepSpeed / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def supports_chunked(model: Any) -> bool:
    """Whether the chunked path reproduces this model's logits (no softcapping or scaling after the head)."""
    config = unwrap_model(model).config
    return not any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS)


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets ``[N, L-1]`` and their mask."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def reduce_token_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> SequenceLogprobs:
    """Per-sequence sums and counts ``[N]`` from the label tokens' log-probs ``[T]`` and the label mask ``[N, L-1]``."""
    n = mask.shape[0]
    token_seq = torch.arange(n, device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, token_seq, token_logps)
    return SequenceLogprobs(sums=sums, counts=mask.sum(-1), token_logps=token_logps, token_seq=token_seq)


def full_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **forward_kwargs: Any
) -> SequenceLogprobs:
    """Reference implementation: the whole ``[N, L, V]`` logits, fp32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs).logits
    targets, mask = next_token_targets(labels)
    token_logps = _token_logps(logits[:, :-1][mask], targets[mask])
    return reduce_token_logps(token_logps, mask)


def decoder_hidden_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, **forward_kwargs: Any
) -> torch.Tensor:
    """Final hidden states ``[N, L, H]`` from the model's decoder, skipping the output projection.

    A wrapped model (DeepSpeed engine, DDP) is called through the wrapper, never around it: the wrapper's forward does
    per-forward bookkeeping (DeepSpeed >= 0.19 advances ZeRO's gradient-accumulation micro-step there; without it
    each micro-batch's gradients replace the previous ones instead of adding up). The decoder's output is taken with
    a forward hook, and the head runs on one position per row only (``logits_to_keep=1``).
    """
    inner = unwrap_model(model)
    decoder = getattr(inner, inner.base_model_prefix)
    if model is inner:
        return decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs
        ).last_hidden_state
    captured: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda _module, _args, out: captured.append(out.last_hidden_state))
    if "logits_to_keep" in inspect.signature(inner.forward).parameters:
        forward_kwargs = {"logits_to_keep": 1, **forward_kwargs}
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs)
    finally:
        handle.remove()
    return captured[-1]


# Default chunk: as many tokens as keep one chunk's logits at 2^23 values (32 MiB in fp32). The step holds about four
# [chunk, vocab] tensors at once (logits, log-sum-exp work space, their gradients), so a fixed token count would make
# the peak grow with the vocabulary: 1024 tokens x 128,256 x 4 bytes is already 0.5 GiB per tensor.
CHUNK_LOGITS_BUDGET = 1 << 23


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk that keep ``chunk x vocab_size`` at ``CHUNK_LOGITS_BUDGET`` (at least 16 tokens)."""
    return max(16, CHUNK_LOGITS_BUDGET // max(vocab_size, 1))


def chunked_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | None = None,
    **forward_kwargs: Any,
) -> SequenceLogprobs:
    """Memory-lean implementation: output projection only at label positions, ``chunk_size`` tokens at a time
    (``None``: :func:`auto_chunk_size` of the vocabulary)."""
    hidden = decoder_hidden_states(model, input_ids, attention_mask, **forward_kwargs)
    targets, mask = next_token_targets(labels)
    selected = hidden[:, :-1][mask]  # [T, H]
    selected_targets = targets[mask]  # [T]
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    if chunk_size is None:  # out_features stays the full vocabulary even when ZeRO-3 partitions the weight
        chunk_size = auto_chunk_size(getattr(head, "out_features", None) or inner.config.vocab_size)

    def project(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _token_logps(head(h), t)

    pieces = []
    for start in range(0, selected.shape[0], chunk_size):
        h, t = selected[start : start + chunk_size], selected_targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(project, h, t, use_reentrant=False))
        else:
            pieces.append(project(h, t))
    # No label token at all: an empty [0] tensor that stays on the graph, so the backward still runs.
    token_logps = torch.cat(pieces) if pieces else selected.float().sum(-1)
    return reduce_token_logps(token_logps, mask)


IMPLEMENTATIONS = ("full", "chunked", "liger")


def sequence_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    impl: str = "chunked",
    chunk_size: int | None = None,
    **forward_kwargs: Any,
) -> SequenceLogprobs:
    """Log-probs of the label tokens of each row of ``input_ids`` ``[N, L]`` with the chosen implementation.

    ``chunked`` and ``liger`` use the full path for models whose logits are transformed after the head (softcapping).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown log-prob implementation {impl!r}; one of {IMPLEMENTATIONS}")
    if impl == "full" or not supports_chunked(model):
        return full_logprobs(model, input_ids, attention_mask, labels, **forward_kwargs)
    if impl == "liger":
        from open_instruct.logprobs_liger import liger_logprobs

        return liger_logprobs(model, input_ids, attention_mask, labels, **forward_kwargs)
    return chunked_logprobs(model, input_ids, attention_mask, labels, chunk_size, **forward_kwargs)


def concat_logprobs(first: SequenceLogprobs, second: SequenceLogprobs) -> SequenceLogprobs:
    """Rows of ``first`` then rows of ``second`` as one ``SequenceLogprobs``."""
    return SequenceLogprobs(
        sums=torch.cat([first.sums, second.sums]),
        counts=torch.cat([first.counts, second.counts]),
        token_logps=torch.cat([first.token_logps, second.token_logps]),
        token_seq=torch.cat([first.token_seq, second.token_seq + first.sums.shape[0]]),
    )


def _half_batch(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of the ``[2B, L]`` tensors, trimmed to their own longest sequence (right padding)."""
    mask = batch["attention_mask"][rows]
    length = max(1, int(mask.sum(-1).max())) if mask.numel() else 1
    return {key: batch[key][rows, :length] for key in ("input_ids", "attention_mask", "labels")}


def pair_logprobs(
    model: Any,
    batch: dict[str, torch.Tensor],
    logprob_fn: Any,
    separate_forward: bool = False,
) -> SequenceLogprobs:
    """Log-probs ``[2B]`` (chosen rows, then rejected) of a padded pair batch: one concatenated forward, or two.

    ``separate_forward`` runs the chosen half, then the rejected half, each padded only to its own longest
    sequence: the transient peak of each forward (attention, MLP, logit chunks) halves and no row is padded to the
    other half's length; the graphs of both halves are still kept for the one backward.
    """
    if not separate_forward:
        return logprob_fn(model, batch)
    half = batch["input_ids"].shape[0] // 2
    chosen = logprob_fn(model, _half_batch(batch, slice(0, half)))
    rejected = logprob_fn(model, _half_batch(batch, slice(half, None)))
    return concat_logprobs(chosen, rejected)
