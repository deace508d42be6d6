"""Forward passes within a micro-batch: a micro-batch above a token budget runs as several forward and backward passes
over contiguous groups of its pairs, their gradients added before the optimizer step.

The optimizer step is the same: each pass's loss is its pairs' per-pair losses times the step's one scale (the loop's
normalization), so the gradients add up to the micro-batch's, in another order of floating-point sums. What changes is
the activation memory: autograd keeps one pass's activations at a time, and on CPU a token costs the same compute in
a smaller matrix product, so the passes take no longer (BENCHMARKS.md, "Real model vs TRL").

The default budget (``--max_tokens_per_forward`` unset): off CUDA, the tokens whose activations the planner
(:func:`open_instruct.plan.memory.default_pass_tokens`) puts at 512 MiB; on CUDA none, since a GPU runs large batches
faster. Losses that look at the whole micro-batch (``LossSpec.batch_level``, the MoE load-balancing loss) are never
split: their value would change.

Every rank must run the same number of passes (a pass's collectives, ZeRO-3's gathers among them, pair up across
ranks), so the ranks agree on it: the most any rank needs, at most the fewest pairs any rank holds.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from open_instruct.engine import unwrap_model
from open_instruct.errors import UserError
from open_instruct.model.batch_layout import computes_in_half
from open_instruct.model.packing import shares_prompt
from open_instruct.objectives.pair_logprobs import padded_rows
from open_instruct.plan.memory import DEFAULT_ACTIVATION_BYTES, activation_bytes_per_token, default_pass_tokens
from open_instruct.plan.model_config import shape_of

Piece = tuple[dict[str, torch.Tensor], int]


def pair_costs(batch: dict[str, torch.Tensor]) -> list[int]:
    """Tokens each pair of a micro-batch puts through the forward (padded: twice its longer side)."""
    b = batch["index"].shape[0]
    if shares_prompt(batch):
        return batch["cu_seq_lens"].diff().tolist()
    if "cu_seq_lens" in batch:
        lengths = batch["cu_seq_lens"].diff().tolist()
        return [lengths[i] + lengths[b + i] for i in range(b)]
    lengths = batch["attention_mask"].sum(-1).tolist()
    return [2 * max(lengths[i], lengths[b + i]) for i in range(b)]


def partition(costs: list[int], groups: int) -> list[tuple[int, int]]:
    """``groups`` contiguous ``[start, end)`` ranges of ``costs``, none empty, cut where the running total passes each
    equal share of the whole (``groups`` at most ``len(costs)``)."""
    total, bounds, running = sum(costs), [0], 0
    for i, cost in enumerate(costs[:-1]):
        running += cost
        cuts_left = groups - len(bounds)  # cuts still to make after this one
        if cuts_left <= 0:
            break
        pairs_after = len(costs) - (i + 1)
        due = running * groups >= total * len(bounds)
        if (due and pairs_after >= cuts_left) or pairs_after == cuts_left:
            bounds.append(i + 1)
    bounds.append(len(costs))
    return list(zip(bounds[:-1], bounds[1:]))


def _take_padded(batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    b, device = batch["index"].shape[0], batch["input_ids"].device
    rows = torch.cat([torch.arange(lo, hi, device=device), torch.arange(b + lo, b + hi, device=device)])
    return {**padded_rows(batch, rows), "index": batch["index"][lo:hi]}


def _take_packed(batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    b, cu = batch["index"].shape[0], batch["cu_seq_lens"].tolist()
    spans = [(cu[lo], cu[hi]), (cu[b + lo], cu[b + hi])]  # the chosen sequences, then the rejected ones
    keys = ("input_ids", "labels", "position_ids", "attention_mask")
    out = {key: torch.cat([batch[key][:, s:e] for s, e in spans], dim=1) for key in keys}
    device = batch["input_ids"].device
    lengths = torch.tensor([cu[i + 1] - cu[i] for i in [*range(lo, hi), *range(b + lo, b + hi)]], device=device)
    out["sequence_ids"] = torch.repeat_interleave(torch.arange(lengths.shape[0], device=device), lengths)[None]
    out["cu_seq_lens"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return {**out, "max_length": lengths.max(), "index": batch["index"][lo:hi]}


def _take_shared(batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    b, cu = batch["index"].shape[0], batch["cu_seq_lens"]
    start, end = int(cu[lo]), int(cu[hi])
    out = {key: batch[key][:, start:end] for key in ("input_ids", "position_ids", "attention_mask")}
    out["cu_seq_lens"] = (cu[lo : hi + 1] - cu[lo]).to(torch.int32)
    seq = batch["target_seq"]
    keep = ((seq >= lo) & (seq < hi)) | ((seq >= b + lo) & (seq < b + hi))
    kept = seq[keep]
    return {
        **out,
        "max_length": out["cu_seq_lens"].diff().max(),
        "prompt_lens": batch["prompt_lens"][lo:hi],
        "chosen_lens": batch["chosen_lens"][lo:hi],
        "target_positions": batch["target_positions"][keep] - start,
        "targets": batch["targets"][keep],
        "target_seq": torch.where(kept < b, kept - lo, kept - b - lo + (hi - lo)),
        "index": batch["index"][lo:hi],
    }


def take_pairs(batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Pairs ``lo..hi-1`` of a micro-batch as a micro-batch of their own, in the same layout."""
    if shares_prompt(batch):
        return _take_shared(batch, lo, hi)
    if "cu_seq_lens" in batch:
        return _take_packed(batch, lo, hi)
    return _take_padded(batch, lo, hi)


class ForwardSplitter:
    """``(micro-batch, real rows) -> [(pass, its real rows), ...]``: as many passes as the budget needs on the rank that
    needs most, each a contiguous group of pairs of about equal tokens."""

    def __init__(self, max_tokens: int, accelerator: Any) -> None:
        self.max_tokens, self.accelerator = max_tokens, accelerator

    def passes(self, costs: list[int]) -> int:
        """The number of passes every rank runs for this micro-batch (``costs``: this rank's pairs)."""
        wanted = min(len(costs), math.ceil(sum(costs) / self.max_tokens))
        if self.accelerator.num_processes == 1:
            return wanted
        agreed = torch.tensor([wanted, -len(costs)], device=self.accelerator.device)
        most, fewest_pairs = self.accelerator.reduce(agreed, reduction="max").tolist()
        return min(int(most), -int(fewest_pairs))

    def __call__(self, batch: dict[str, torch.Tensor], rows: int) -> list[Piece]:
        costs = pair_costs(batch)
        groups = self.passes(costs)
        if groups <= 1:
            return [(batch, rows)]
        return [(take_pairs(batch, lo, hi), max(0, min(rows - lo, hi - lo))) for lo, hi in partition(costs, groups)]


def forward_budget(
    max_tokens: int | None, model: Any, device: torch.device, compute_bytes: int, whole_batch_loss: str | None
) -> tuple[int | None, str]:
    """``--max_tokens_per_forward`` resolved: (tokens per pass or None for whole micro-batches, the line to print).
    ``whole_batch_loss``: why the loss must see whole micro-batches, if it must."""
    if max_tokens is not None and whole_batch_loss:
        raise UserError(f"--max_tokens_per_forward: {whole_batch_loss}; leave it unset")
    if max_tokens is not None:
        return max_tokens, f"forward passes: at most {max_tokens} tokens each (--max_tokens_per_forward)"
    if whole_batch_loss or device.type == "cuda":
        why = whole_batch_loss or "default on CUDA"
        return None, f"forward passes: one per micro-batch ({why})"
    shape = shape_of(unwrap_model(model).config.to_dict())
    per_token = activation_bytes_per_token(shape, compute_bytes)
    tokens = default_pass_tokens(shape, compute_bytes)
    return tokens, (
        f"forward passes: at most {tokens} tokens each (default on {device.type}: "
        f"{DEFAULT_ACTIVATION_BYTES / 2**30:g} GiB of activations at {per_token / 2**20:.2f} MiB per token)"
    )


def forward_splitter(
    max_tokens: int | None, model: Any, accelerator: Any, whole_batch_loss: str | None
) -> ForwardSplitter | None:
    """The run's splitter (None: one pass per micro-batch), its choice printed."""
    compute_bytes = 2 if computes_in_half(model, accelerator.mixed_precision) else 4
    budget, line = forward_budget(max_tokens, model, accelerator.device, compute_bytes, whole_batch_loss)
    accelerator.print(line)
    return ForwardSplitter(budget, accelerator) if budget is not None else None
