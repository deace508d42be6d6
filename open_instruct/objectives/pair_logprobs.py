"""Pair-level views of per-sequence log-probs: a padded pair batch's ``[2B]`` log-probs (one concatenated forward or
two), and the per-token splits some objectives need (LD-DPO's shared and tail sums, TRL's WPO terms).

Rows are chosen then rejected; the log-probs themselves come from :mod:`open_instruct.objectives.logprobs`.
"""

from __future__ import annotations

from typing import Any

import torch

from open_instruct.objectives.logprobs import SequenceLogprobs


def concat_logprobs(first: SequenceLogprobs, second: SequenceLogprobs) -> SequenceLogprobs:
    """Rows of ``first`` then rows of ``second`` as one ``SequenceLogprobs``."""
    sum_sq = None
    if first.token_log_sum_sq is not None and second.token_log_sum_sq is not None:
        sum_sq = torch.cat([first.token_log_sum_sq, second.token_log_sum_sq])
    return SequenceLogprobs(
        sums=torch.cat([first.sums, second.sums]),
        counts=torch.cat([first.counts, second.counts]),
        token_logps=torch.cat([first.token_logps, second.token_logps]),
        token_seq=torch.cat([first.token_seq, second.token_seq + first.sums.shape[0]]),
        token_log_sum_sq=sum_sq,
    )


def token_positions(lp: SequenceLogprobs) -> torch.Tensor:
    """0-based position ``[T]`` of each label token within its own sequence (tokens of a sequence in order)."""
    order = torch.argsort(lp.token_seq, stable=True)
    starts = lp.counts.cumsum(0) - lp.counts
    positions = torch.empty_like(lp.token_seq)
    positions[order] = torch.arange(order.shape[0], device=order.device) - starts[lp.token_seq[order]]
    return positions


def shared_and_tail_sums(lp: SequenceLogprobs) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's split ``[2B]`` each of a pair batch (rows: chosen then rejected): the sum over each reply's first
    min(n_c, n_r) label tokens, and over the rest."""
    half = lp.counts.shape[0] // 2
    shared_len = torch.minimum(lp.counts[:half], lp.counts[half:]).repeat(2)
    in_shared = token_positions(lp) < shared_len[lp.token_seq]
    zeros = torch.zeros_like(lp.sums)
    shared = zeros.index_add(0, lp.token_seq, lp.token_logps * in_shared)
    tail = zeros.index_add(0, lp.token_seq, lp.token_logps * ~in_shared)
    return shared, tail


def wpo_token_means(lp: SequenceLogprobs) -> torch.Tensor:
    """TRL's WPO term ``[N]``, detached: per sequence, the average over label tokens of log p - log sum_v p_v^2."""
    if lp.token_log_sum_sq is None:
        raise ValueError("WPO weights need log sum p^2 per token: compute the log-probs with with_sum_sq=True")
    aligned = (lp.token_logps.detach() - lp.token_log_sum_sq).to(lp.sums.dtype)
    sums = torch.zeros_like(lp.sums).index_add(0, lp.token_seq, aligned)
    return (sums / lp.counts.clamp(min=1).to(sums.dtype)).detach()


def padded_rows(batch: dict[str, torch.Tensor], rows: slice | torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of a padded batch's ``[2B, L]`` tensors, trimmed to their own longest sequence (right padding)."""
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
    chosen = logprob_fn(model, padded_rows(batch, slice(0, half)))
    rejected = logprob_fn(model, padded_rows(batch, slice(half, None)))
    return concat_logprobs(chosen, rejected)
