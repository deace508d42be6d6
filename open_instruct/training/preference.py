"""The DPO stage's pieces for the loop: its step function, the log-prob function, and the reference pass.

The loss itself is a pure function from :mod:`open_instruct.objectives.losses`; here it meets the model and a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from open_instruct.data.sampler import pair_dataloader
from open_instruct.model.batch_layout import needs_padding_mask
from open_instruct.model.liger import resolve_logprob_impl
from open_instruct.model.lora import adapters_disabled
from open_instruct.model.modeling import logprob_model_options
from open_instruct.model.moe import capture_router_logits
from open_instruct.model.packing import packed_sequence_logprobs, shares_prompt
from open_instruct.objectives.combination import ld_weighted
from open_instruct.objectives.logprobs import SequenceLogprobs, logprobs_line, sequence_logprobs
from open_instruct.objectives.losses import LossFn, LossOutput, LossSettings, PreferenceLogps
from open_instruct.objectives.pair_logprobs import pair_logprobs, shared_and_tail_sums, wpo_token_means
from open_instruct.settings import BatchSettings, ModelSettings, ReferenceSettings
from open_instruct.training import reference_cache
from open_instruct.training.loop import StepFn
from open_instruct.training.precision import in_run_precision
from open_instruct.training.reference_cache import ReferenceLogps, model_fingerprint

LogprobFn = Callable[[Any, dict[str, torch.Tensor]], SequenceLogprobs]


@dataclass
class PreferenceSettings:
    """How a preference micro-batch becomes a loss."""

    length_normalized: bool
    loss_settings: LossSettings
    separate_forward: bool = False
    load_balancing_weight: float | None = None  # set: add the MoE router load-balancing loss, log it as aux_loss


def policy_logps(lp: SequenceLogprobs, length_normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) ``[B]`` from the concatenated forward's ``[2B]`` log-probs."""
    values = lp.means if length_normalized else lp.sums
    half = values.shape[0] // 2
    return values[:half], values[half:]


def summed_pair_logps(
    lp: SequenceLogprobs, index: torch.Tensor, reference: ReferenceLogps | None, settings: LossSettings
) -> PreferenceLogps:
    """The objective's input from a pair batch's ``[2B]`` log-probs: summed policy and reference log-probs ``[B]``
    (LD-DPO weighted with ``ld_alpha``), token counts, per-token policy averages, and TRL's WPO terms if asked for."""
    half = lp.sums.shape[0] // 2
    sums = lp.sums if settings.ld_alpha is None else ld_weighted(*shared_and_tail_sums(lp), settings.ld_alpha)
    counts, means = lp.counts, lp.means
    if reference is None:
        ref_chosen, ref_rejected = torch.zeros_like(sums[:half]), torch.zeros_like(sums[half:])
    else:
        ref_chosen, ref_rejected, _, _ = reference.pair_sums(index, settings.ld_alpha)
    wpo = wpo_token_means(lp) if settings.use_weighting else None
    return PreferenceLogps(
        sums[:half],
        sums[half:],
        ref_chosen.to(sums.dtype),
        ref_rejected.to(sums.dtype),
        means[:half],
        means[half:],
        counts[:half],
        counts[half:],
        wpo_chosen=None if wpo is None else wpo[:half],
        wpo_rejected=None if wpo is None else wpo[half:],
    )


@dataclass(frozen=True)
class PairObjective:
    """How a pair batch becomes losses, in training and evaluation alike: its log-prob function, the objective
    (:func:`open_instruct.objectives.combination.combined_loss`: summed log-probs in, averaged per component as the
    loss registry says), the cached reference log-probs (None without a reference) and the settings."""

    logprob_fn: Any
    loss_fn: LossFn
    reference: ReferenceLogps | None
    settings: PreferenceSettings

    def pair_losses(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, LossOutput]:
        """Policy (chosen, rejected) log-probs ``[B]`` and the loss output of one micro-batch."""
        settings = self.settings
        lp = pair_logprobs(model, batch, self.logprob_fn, settings.separate_forward)
        chosen, rejected = policy_logps(lp, settings.length_normalized)
        logps = summed_pair_logps(lp, batch["index"], self.reference, settings.loss_settings)
        return chosen, rejected, self.loss_fn(logps, settings.loss_settings)


def preference_step(
    model: Any,
    batch: dict[str, torch.Tensor],
    logprob_fn: Any,
    loss_fn: LossFn,
    reference: ReferenceLogps | None,
    settings: PreferenceSettings,
    rows: int | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch and the per-pair metric sums of its first ``rows`` pairs (the real ones; default all).

    The loss is ``scale`` x the sum of those pairs' losses (default ``1 / rows``: their mean); the other rows (repeats
    that even out the ranks) still run, so every rank issues the same collectives, but weigh nothing."""
    with capture_router_logits(model, enabled=settings.load_balancing_weight is not None) as router:
        chosen, rejected, out = PairObjective(logprob_fn, loss_fn, reference, settings).pair_losses(model, batch)
    rows = chosen.shape[0] if rows is None else rows
    scale = 1.0 / max(rows, 1) if scale is None else scale
    loss = out.losses[:rows].sum() * scale  # still a function of every row's forward: the backward runs as on others
    chosen, rejected = chosen[:rows], rejected[:rows]
    metrics = {
        "train_loss": out.losses[:rows].detach().sum(),
        "logps/chosen": chosen.detach().sum(),
        "logps/rejected": rejected.detach().sum(),
    }
    if out.nll is not None:
        metrics["nll_loss"] = out.nll[:rows].sum()
    if out.components:  # each component's per-pair loss (before its --loss_weights weight)
        metrics.update({f"loss/{name}": value[:rows].sum() for name, value in out.components.items()})
    if out.chosen_rewards is not None:
        c, r = out.chosen_rewards[:rows], out.rejected_rewards[:rows]
        metrics.update(
            {
                "rewards/chosen": c.sum(),
                "rewards/rejected": r.sum(),
                "rewards/average": ((c + r) / 2).sum(),
                "rewards/accuracy": (c > r).float().sum(),
                "rewards/margin": (c - r).sum(),
            }
        )
    aux_loss = router.aux_loss()
    if aux_loss is not None:  # the micro-batch's router loss, weighted by its real pairs like a per-pair loss
        loss = loss + settings.load_balancing_weight * aux_loss * rows * scale
        metrics["aux_loss"] = aux_loss.detach() * rows  # a per-pair sum, like the other metrics
    return loss, metrics


def pair_tokens(batch: dict[str, torch.Tensor], rows: int) -> int:
    """Input tokens of a pair batch's first ``rows`` pairs (chosen and rejected), padded or packed."""
    half = batch["index"].shape[0]
    if shares_prompt(batch):  # one segment per pair, its shared prompt counted for both sequences (as unshared)
        return int(batch["cu_seq_lens"].diff()[:rows].sum() + batch["prompt_lens"][:rows].sum())
    if "cu_seq_lens" in batch:
        lengths = batch["cu_seq_lens"].diff()
        return int(lengths[:rows].sum() + lengths[half : half + rows].sum())
    mask = batch["attention_mask"]
    return int(mask[:rows].sum() + mask[half : half + rows].sum())


def preference_step_fn(
    logprob_fn: LogprobFn,
    loss_fn: LossFn,
    reference: ReferenceLogps | None,
    settings: PreferenceSettings,
    split: Any = None,
) -> StepFn:
    """The loop's step for DPO: per-pair losses of the real pairs summed and scaled (the loop divides by the optimizer
    step's pairs on all ranks), per-pair metric sums, pair count. Batch-level losses (``LossSpec.batch_level``) see
    the micro-batch, so they alone depend on how pairs are split over ranks and micro-batches."""

    def run(model: Any, batch: dict[str, torch.Tensor], rows: int, scale: float) -> tuple[Any, dict, int]:
        loss, metrics = preference_step(model, batch, logprob_fn, loss_fn, reference, settings, rows, scale)
        return loss, metrics, rows

    return StepFn(run=run, units=lambda batch, rows: rows, tokens=pair_tokens, split=split)


def make_logprob_fn(
    packing: bool, impl: str, chunk_size: int | None, with_sum_sq: bool = False, padding_mask: bool = True
) -> LogprobFn:
    """``(model, batch) -> SequenceLogprobs`` for padded or packed pair batches (``with_sum_sq``: TRL's WPO terms).

    ``padding_mask=False`` leaves the mask out of padded forwards: rows are right-padded, so causal attention alone
    keeps every real token off the padding, and sdpa runs its causal kernel instead of building and keeping an
    ``[rows, 1, L, L]`` mask per layer (see :func:`open_instruct.model.batch_layout.needs_padding_mask`)."""

    def logprob_fn(model: Any, batch: dict[str, torch.Tensor]) -> SequenceLogprobs:
        if packing:
            return packed_sequence_logprobs(model, batch, impl, chunk_size, with_sum_sq)
        return sequence_logprobs(
            model,
            batch["input_ids"],
            batch["attention_mask"] if padding_mask else None,
            batch["labels"],
            impl=impl,
            chunk_size=chunk_size,
            with_sum_sq=with_sum_sq,
        )

    return logprob_fn


def reference_logprobs(
    model: Any,
    loader: Any,
    accelerator: Any,
    logprob_fn: LogprobFn,
    rows: int,
    cache_dir: str,
    identity: dict[str, Any],
) -> ReferenceLogps:
    """The reference log-probs of ``rows`` pairs: from the cache keyed by ``identity`` (model, options, data, ...),
    else one no-grad pass of the untouched policy (LoRA: adapters off, so the base model) saved to it."""
    key = reference_cache.fingerprint(identity)
    with adapters_disabled(model):
        return reference_cache.get_reference(model, loader, accelerator, logprob_fn, rows, cache_dir, key)


def reference_identity(model: dict[str, Any], model_options: dict[str, Any], mixed_precision: str) -> dict[str, Any]:
    """What the reference log-probs depend on besides the data (the cache key; the data hash is added per set)."""
    return {"model": model, "model_options": model_options, "mixed_precision": mixed_precision, "logprobs": "v1"}


def reference_logprobs_of(
    model: Any,
    accelerator: Any,
    logprob_fn: LogprobFn,
    sets: list[tuple[Sequence, str]],
    loaders: list[Any],
    cache_dir: str,
    identity: dict[str, Any],
) -> list[ReferenceLogps | None]:
    """The reference log-probs of each (records, data hash) set, in order, then None (no further set)."""
    tables: list[ReferenceLogps | None] = [
        reference_logprobs(model, loader, accelerator, logprob_fn, len(records), cache_dir, {**identity, "data": h})
        for (records, h), loader in zip(sets, loaders)
    ]
    return tables + [None]


def run_logprob_fn(batch: BatchSettings, model: Any, accelerator: Any) -> LogprobFn:
    """The run's log-prob function: the implementation this device and model allow (Liger, chunked or full), padded
    or packed as the batch layout says, the decoder in the run's precision on every pass (log-probs stay fp32)."""
    impl = resolve_logprob_impl(batch.use_liger_kernel, model, accelerator.device, accelerator.print)
    padding_mask = needs_padding_mask(model, batch.load_balancing_loss)
    fn = make_logprob_fn(batch.packing, impl, batch.logprob_chunk_size, batch.use_weighting, padding_mask=padding_mask)
    pending = [accelerator.print]

    def reported(model: Any, rows: dict[str, torch.Tensor]) -> SequenceLogprobs:
        if pending:  # the first call: the model is prepared by now, so the line names the engine's part
            pending.pop()(logprobs_line(model, impl, batch.use_weighting))
        return fn(model, rows)

    return in_run_precision(accelerator, reported, report=accelerator.print)


def reference_pass(
    reference: ReferenceSettings,
    batch: BatchSettings,
    model_settings: ModelSettings,
    accelerator: Any,
    model: Any,
    logprob_fn: LogprobFn,
    pad_id: int,
    record_sets: list[tuple[Sequence, str]],
) -> tuple[list[ReferenceLogps | None], list[Any]]:
    """Each (records, data hash) set's reference log-probs (None each without a reference) and its in-order loader.

    One no-grad pass of the untouched policy per set, cached on disk by content hash; it must run before any training
    step changes the weights (the evaluation set's too)."""
    rows = reference.reference_batch_size or 2 * batch.per_device_train_batch_size
    loaders = [
        accelerator.prepare_data_loader(
            pair_dataloader(r, pad_id, rows, batch.seed, batch.packing, shuffle=False, share_prompt=batch.share_prompt)
        )
        for r, _ in record_sets
    ]
    if not reference.needs_reference:
        return [None] * (len(record_sets) + 1), loaders
    identity = reference_identity(
        model_fingerprint(model_settings.model_name_or_path, model_settings.model_revision),
        logprob_model_options(model_settings, model),
        accelerator.mixed_precision,
    )
    cache = reference.reference_logprobs_cache_path
    return reference_logprobs_of(model, accelerator, logprob_fn, record_sets, loaders, cache, identity), loaders
