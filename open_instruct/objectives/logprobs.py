"""Per-sequence log-probabilities of the label tokens, without ever holding full-vocabulary logits by default.

Three implementations with one contract (``sequence_logprobs``):
- ``full``: the model's own logits, fp32 log-softmax, gather. Simple; memory ``[N, L, V]``. For tests and small vocabs.
- ``chunked`` (default): the decoder's hidden states at label positions only, times the output embedding in chunks of
  tokens; each chunk's logits are recomputed in the backward (activation checkpointing), so at most ``[chunk, V]``
  logits exist at once. A plain ``nn.Linear`` head sums its weight gradient over the chunks in one buffer
  (:mod:`open_instruct.objectives.head_projection`). An output layer that an engine partitions (ZeRO-3) is gathered
  once per call on every rank (:mod:`open_instruct.engine.zero3_head`), never once per chunk. Pure PyTorch.
- ``liger``: the same label-position hidden states through Liger's fused linear cross-entropy, run as the output
  layer's own forward, so that ZeRO-3 gathers and FSDP2 unshards it for the kernel
  (:mod:`open_instruct.objectives.fused_head`; when it runs: :mod:`open_instruct.model.liger`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from open_instruct.data.tokenize import IGNORE_INDEX
from open_instruct.engine import head_made_whole, hooks_forward, unwrap_model
from open_instruct.engine.zero3_head import partitioned_head_logps, zero3_partitioned
from open_instruct.objectives.fused_head import as_head_forward, fused_head_logps
from open_instruct.objectives.head_projection import autocast_dtype, linear_head_logps, plain_linear_head

# Config fields that change logits after the output projection; the chunked path does not apply them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class SequenceLogprobs:
    """Log-probs of the label tokens: per sequence ``sums``/``counts`` ``[N]``, per token ``token_logps`` ``[T]``.

    ``token_log_sum_sq`` ``[T]`` (detached, only when asked for): ``log sum_v p_v^2`` at each label position, which
    TRL's WPO weights subtract from the token's log-prob.
    """

    sums: torch.Tensor
    counts: torch.Tensor
    token_logps: torch.Tensor
    token_seq: torch.Tensor
    token_log_sum_sq: torch.Tensor | None = None

    @property
    def means(self) -> torch.Tensor:
        """Average log-prob per label token ``[N]`` (0 for a sequence without labels)."""
        return self.sums / self.counts.clamp(min=1).to(self.sums.dtype)


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


def _log_sum_sq(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z) per row, fp32, detached (a weight, not a gradient path)."""
    with torch.no_grad():
        z = logits.detach().float()
        return torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1)


def _row_of_each(mask: torch.Tensor) -> torch.Tensor:
    """The row ``[T]`` of each ``True`` of a ``[N, L]`` mask, in row-major order."""
    return torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]


def reduce_token_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> SequenceLogprobs:
    """Per-sequence sums and counts ``[N]`` from the label tokens' log-probs ``[T]`` and the label mask ``[N, L-1]``."""
    n, token_seq = mask.shape[0], _row_of_each(mask)
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, token_seq, token_logps)
    return SequenceLogprobs(sums=sums, counts=mask.sum(-1), token_logps=token_logps, token_seq=token_seq)


@dataclass(frozen=True)
class LabelTokens:
    """The label tokens of a batch: ``select(x)`` takes the positions that predict them out of the decoder's output
    (hidden states or logits, ``[N, L, ...]`` -> ``[T, ...]``); ``targets`` ``[T]`` are the tokens, ``token_seq``
    ``[T]`` the sequence of each (in sequence order), ``n`` the number of sequences.

    Rows of labels (:meth:`of`) predict each label from the position before it in the same row; a packed row
    whose sequences share their prompt (:mod:`open_instruct.model.packing`) names the predicting positions itself."""

    select: Callable[[torch.Tensor], torch.Tensor]
    targets: torch.Tensor
    token_seq: torch.Tensor
    n: int

    @classmethod
    def of(cls, labels: torch.Tensor | LabelTokens) -> LabelTokens:
        """``labels`` as label tokens: rows ``[N, L]`` of labels (``IGNORE_INDEX`` where no loss), or already so."""
        if isinstance(labels, LabelTokens):
            return labels
        targets, mask = next_token_targets(labels)
        return cls(lambda x: x[:, :-1][mask], targets[mask], _row_of_each(mask), labels.shape[0])

    @classmethod
    def at_positions(cls, positions: torch.Tensor, targets: torch.Tensor, token_seq: torch.Tensor, n: int):
        """Label tokens predicted by the given ``positions`` ``[T]`` of a single row ``[1, L, ...]``."""
        return cls(lambda x: x[0, positions], targets, token_seq, n)

    def reduce(self, token_logps: torch.Tensor) -> SequenceLogprobs:
        """Per-sequence sums and counts ``[n]`` of the label tokens' log-probs ``[T]``."""
        zeros = torch.zeros(self.n, dtype=token_logps.dtype, device=token_logps.device)
        sums = zeros.index_add(0, self.token_seq, token_logps)
        ones = torch.ones_like(self.token_seq)
        counts = torch.zeros(self.n, dtype=torch.long, device=self.token_seq.device).index_add(0, self.token_seq, ones)
        return SequenceLogprobs(sums=sums, counts=counts, token_logps=token_logps, token_seq=self.token_seq)


def full_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | LabelTokens,
    with_sum_sq: bool = False,
    **forward_kwargs: Any,
) -> SequenceLogprobs:
    """Reference implementation: the whole ``[N, L, V]`` logits, fp32."""
    tokens = LabelTokens.of(labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs).logits
    selected = tokens.select(logits)
    out = tokens.reduce(_token_logps(selected, tokens.targets))
    if with_sum_sq:
        out.token_log_sum_sq = _log_sum_sq(selected)
    return out


def decoder_hidden_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, **forward_kwargs: Any
) -> torch.Tensor:
    """Final hidden states ``[N, L, H]`` from the model's decoder, skipping the output projection.

    A wrapped model (an engine's wrapper, DDP) is called through the wrapper, never around it: the wrapper's forward
    does per-forward bookkeeping (an engine may advance its gradient-accumulation micro-step there; without it each
    micro-batch's gradients replace the previous ones instead of adding up), and an engine that hooks the model
    itself (FSDP2) gathers its shards there. The decoder's output is taken with
    a forward hook, and the head runs on one position per row only (``logits_to_keep=1``).
    """
    inner = unwrap_model(model)
    decoder = getattr(inner, inner.base_model_prefix)
    if model is inner and not hooks_forward(model):
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


# Default chunk: as many tokens as keep one chunk's logits at 2^21 values (8 MiB in fp32), but at least 32 tokens. The
# step holds about four [chunk, vocab] tensors at once (logits, log-sum-exp work space, their gradients), so a fixed
# token count would make the peak grow with the vocabulary (1024 tokens x 128,256 x 4 bytes is 0.5 GiB per tensor).
# 8 MiB rather than 32: on the TRL comparison's 8k run the smaller chunks stay in cache (step 0.61 s against
# 0.65-0.76 s) and lower the peak by about 50 MB. The floor: each chunk reads the head's whole [vocab, hidden]
# weight, so fewer tokens per chunk read it more often; at 128k 32 tokens (16 MiB of logits) against 64 cost
# 4.55 s instead of 4.3 s a step and saved 50 MB of peak.
CHUNK_LOGITS_BUDGET = 1 << 21
MIN_CHUNK_TOKENS = 32


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk that keep ``chunk x vocab_size`` at ``CHUNK_LOGITS_BUDGET``, at least ``MIN_CHUNK_TOKENS``."""
    return max(MIN_CHUNK_TOKENS, CHUNK_LOGITS_BUDGET // max(vocab_size, 1))


def _project_in_chunks(
    head: Any, selected: torch.Tensor, targets: torch.Tensor, chunk_size: int, with_sum_sq: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Label-token log-probs ``[T]`` (and WPO's ``log sum p^2`` ``[T]`` if asked for) of hidden states ``[T, H]``,
    ``chunk_size`` tokens of logits at a time, each chunk recomputed in the backward."""
    if zero3_partitioned(head):
        # One gather per call on every rank whatever its number of label tokens (see engine/zero3_head.py);
        # WPO's sum of squares takes one call on all label tokens ([T, V] logits at once).
        if with_sum_sq:
            logits = head(selected)
            return _token_logps(logits, targets), _log_sum_sq(logits)
        return partitioned_head_logps(selected, targets, head, chunk_size, _token_logps), None

    if plain_linear_head(head) and selected.shape[0] > 0:  # the weight's gradient in one buffer
        return linear_head_logps(head, selected, targets, chunk_size, with_sum_sq, autocast_dtype(selected.device))

    def project(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _token_logps(head(h), t)

    def project_with_sum_sq(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h)
        return _token_logps(logits, t), _log_sum_sq(logits)

    fn = project_with_sum_sq if with_sum_sq else project
    pieces = []
    for start in range(0, selected.shape[0], chunk_size):
        h, t = selected[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(fn, h, t, use_reentrant=False))
        else:
            pieces.append(fn(h, t))
    # No label token at all: an empty [0] tensor that stays on the graph, so the backward still runs.
    empty = selected.float().sum(-1)
    if not with_sum_sq:
        return (torch.cat(pieces) if pieces else empty), None
    logps = torch.cat([p[0] for p in pieces]) if pieces else empty
    return logps, torch.cat([p[1] for p in pieces]) if pieces else empty.detach()


def _projected_inside_forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokens: LabelTokens,
    chunk_size: int,
    with_sum_sq: bool,
    **forward_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked projection run as the output layer's own forward, inside the model's forward.

    For an engine that hooks the model itself (FSDP2): its output layer is gathered, and its gradients reduced, by
    hooks around that layer's call inside the model's forward; a second call after the forward would free the
    gathered weights under the first call's backward (:func:`~open_instruct.objectives.fused_head.as_head_forward`).
    """
    extra: dict[str, torch.Tensor] = {}

    def label_logps(forward: Any, hidden: torch.Tensor) -> torch.Tensor:
        logps, sum_sq = _project_in_chunks(forward, tokens.select(hidden), tokens.targets, chunk_size, with_sum_sq)
        if sum_sq is not None:
            extra["sum_sq"] = sum_sq
        return logps

    logps = as_head_forward(model, input_ids, attention_mask, label_logps, **forward_kwargs)
    return logps, extra.get("sum_sq")


def chunked_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | LabelTokens,
    chunk_size: int | None = None,
    with_sum_sq: bool = False,
    **forward_kwargs: Any,
) -> SequenceLogprobs:
    """Memory-lean implementation: output projection only at label positions, ``chunk_size`` tokens at a time
    (``None``: :func:`auto_chunk_size` of the vocabulary); ``with_sum_sq`` also returns WPO's per-token
    ``log sum_v p_v^2`` from the same chunk's logits."""
    tokens = LabelTokens.of(labels)
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    if chunk_size is None:  # out_features stays the full vocabulary even when an engine partitions the weight
        chunk_size = auto_chunk_size(getattr(head, "out_features", None) or inner.config.vocab_size)
    if hooks_forward(model):
        logps, sum_sq = _projected_inside_forward(
            model, input_ids, attention_mask, tokens, chunk_size, with_sum_sq, **forward_kwargs
        )
    else:
        hidden = decoder_hidden_states(model, input_ids, attention_mask, **forward_kwargs)
        logps, sum_sq = _project_in_chunks(head, tokens.select(hidden), tokens.targets, chunk_size, with_sum_sq)
    out = tokens.reduce(logps)
    out.token_log_sum_sq = sum_sq
    return out


IMPLEMENTATIONS = ("full", "chunked", "liger")


def sequence_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | LabelTokens,
    impl: str = "chunked",
    chunk_size: int | None = None,
    with_sum_sq: bool = False,
    **forward_kwargs: Any,
) -> SequenceLogprobs:
    """Log-probs of the label tokens of each row of ``input_ids`` ``[N, L]`` with the chosen implementation
    (``labels``: rows of labels, or the :class:`LabelTokens` of a prompt-sharing packed row).

    ``chunked`` and ``liger`` use the full path for models whose logits are transformed after the head (softcapping).
    ``with_sum_sq`` (TRL's WPO weights) needs the logits, so it is served by the chunked or full path, never Liger's.
    Without autograd (reference pass, evaluation) ``liger`` takes the chunked path: Liger's fused kernel computes the
    gradient inside its forward, which a no-grad pass would pay for and throw away, while the chunked path is then a
    plain chunk-by-chunk matmul and log-sum-exp.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown log-prob implementation {impl!r}; one of {IMPLEMENTATIONS}")
    if impl == "full" or not supports_chunked(model):
        return full_logprobs(model, input_ids, attention_mask, labels, with_sum_sq, **forward_kwargs)
    if with_sum_sq:
        return chunked_logprobs(model, input_ids, attention_mask, labels, chunk_size, True, **forward_kwargs)
    if impl == "liger" and torch.is_grad_enabled():
        return liger_logprobs(model, input_ids, attention_mask, labels, **forward_kwargs)
    return chunked_logprobs(model, input_ids, attention_mask, labels, chunk_size, **forward_kwargs)


def logprobs_line(model: Any, impl: str, with_sum_sq: bool = False) -> str:
    """``logprobs: ...``: the kernel :func:`sequence_logprobs` runs for no-grad and for training passes of ``model``
    (as prepared by its engine)."""
    if impl == "full" or not supports_chunked(model):
        return "logprobs: full logits on every pass (" + (
            "asked for)" if impl == "full" else "this model transforms its logits after the output layer)"
        )
    chunked = "chunked projection of the label positions"
    if impl == "liger" and with_sum_sq:
        training = chunked + " (WPO weights need the logits, which Liger's kernel never holds)"
    elif impl == "liger":
        training = (
            f"liger fused linear cross-entropy, run as the output layer's own forward ({head_made_whole(model)})"
        )
    else:
        training = chunked
    return f"logprobs: no-grad passes (reference, evaluation) {chunked}; training passes {training}"


def liger_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | LabelTokens,
    **forward_kwargs: Any,
) -> SequenceLogprobs:
    """Label-token log-probs via Liger's fused linear cross-entropy, run as the output layer's own forward so that
    an engine that shards the layer (ZeRO-3, FSDP2) makes it whole for the kernel
    (:mod:`open_instruct.objectives.fused_head`)."""
    tokens = LabelTokens.of(labels)
    logps = fused_head_logps(model, input_ids, attention_mask, tokens.select, tokens.targets, **forward_kwargs)
    return tokens.reduce(logps)
