"""The training loop: micro-batches, accumulation, optimizer steps, metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from open_instruct.checkpointing import CheckpointPolicy, TrainerState, restore_rng, save_checkpoint
from open_instruct.logprobs import SequenceLogprobs, pair_logprobs
from open_instruct.losses import LossFn, LossOutput, LossSettings, PreferenceLogps
from open_instruct.moe import capture_router_logits
from open_instruct.nonfinite import NonFiniteGuard
from open_instruct.perf import mfu
from open_instruct.reference_cache import ReferenceLogps
from open_instruct.tracking import MetricsLogger

# Metrics averaged over the pairs of an optimizer step (summed here, divided by the pair count when logged).
PAIR_METRICS = (
    "train_loss",
    "logps/chosen",
    "logps/rejected",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/average",
    "rewards/accuracy",
    "rewards/margin",
)


StepFn = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor], int]]


@dataclass
class LoopSettings:
    """What the loop needs to know beyond its components."""

    num_epochs: int
    max_train_steps: int
    gradient_accumulation_steps: int
    max_grad_norm: float
    logging_steps: int
    length_normalized: bool
    loss_settings: LossSettings
    separate_forward: bool = False
    load_balancing_weight: float | None = None  # set: add the MoE router load-balancing loss, log it as aux_loss
    eval_steps: int | None = None
    flops_fn: Any = None  # batch -> training FLOPs (open_instruct.perf.FlopCounter); with peak_flops, logs MFU
    peak_flops: float | None = None  # the device's peak FLOP/s; None (CPU, unknown GPU): no perf/mfu_step


@dataclass
class StepMetrics:
    """Sums over the micro-batches of one logging interval."""

    sums: dict[str, float] = field(default_factory=dict)
    pairs: int = 0
    tokens: int = 0
    flops: float = 0.0

    def add(self, values: dict[str, torch.Tensor], pairs: int, tokens: int) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.pairs += pairs
        self.tokens += tokens


def policy_logps(lp: SequenceLogprobs, length_normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) ``[B]`` from the concatenated forward's ``[2B]`` log-probs."""
    values = lp.means if length_normalized else lp.sums
    half = values.shape[0] // 2
    return values[:half], values[half:]


def pair_losses(
    model: Any,
    batch: dict[str, torch.Tensor],
    logprob_fn: Any,
    loss_fn: LossFn,
    reference: ReferenceLogps | None,
    settings: LoopSettings,
) -> tuple[torch.Tensor, torch.Tensor, LossOutput]:
    """Policy (chosen, rejected) log-probs ``[B]`` and the loss output of one micro-batch (training and evaluation)."""
    lp = pair_logprobs(model, batch, logprob_fn, settings.separate_forward)
    chosen, rejected = policy_logps(lp, settings.length_normalized)
    chosen_mean, rejected_mean = policy_logps(lp, length_normalized=True)
    if reference is None:
        ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
    else:
        ref_chosen, ref_rejected = reference.lookup(batch["index"], settings.length_normalized)
    out = loss_fn(
        PreferenceLogps(
            chosen, rejected, ref_chosen.to(chosen.dtype), ref_rejected.to(chosen.dtype), chosen_mean, rejected_mean
        ),
        settings.loss_settings,
    )
    return chosen, rejected, out


def preference_step(
    model: Any,
    batch: dict[str, torch.Tensor],
    logprob_fn: Any,
    loss_fn: LossFn,
    reference: ReferenceLogps | None,
    settings: LoopSettings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch (mean over its pairs) and the per-pair metric sums."""
    with capture_router_logits(model, enabled=settings.load_balancing_weight is not None) as router:
        chosen, rejected, out = pair_losses(model, batch, logprob_fn, loss_fn, reference, settings)
    loss = out.losses.mean()
    metrics = {
        "train_loss": out.losses.detach().sum(),
        "logps/chosen": chosen.detach().sum(),
        "logps/rejected": rejected.detach().sum(),
    }
    if out.nll is not None:
        metrics["nll_loss"] = out.nll.sum()
    if out.chosen_rewards is not None:
        c, r = out.chosen_rewards, out.rejected_rewards
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
    if aux_loss is not None:
        loss = loss + settings.load_balancing_weight * aux_loss
        metrics["aux_loss"] = aux_loss.detach() * chosen.shape[0]  # a per-pair sum, like the other metrics
    return loss, metrics


def _reduce_across_ranks(accelerator: Any, interval: StepMetrics) -> tuple[dict[str, float], int, int, float]:
    names = sorted(interval.sums)
    local = torch.tensor(
        [interval.sums[n] for n in names] + [interval.pairs, interval.tokens, interval.flops],
        dtype=torch.float64,
        device=accelerator.device,
    )
    total = accelerator.reduce(local, reduction="sum").cpu().tolist()
    pairs, tokens = int(total[-3]), int(total[-2])
    return {n: total[i] / max(pairs, 1) for i, n in enumerate(names)}, pairs, tokens, total[-1]


@dataclass
class FaultTolerance:
    """Checkpointing, resume and the non-finite guard (all optional): see :mod:`open_instruct.checkpointing`."""

    policy: CheckpointPolicy | None = None
    resume_state: TrainerState | None = None
    resume_rng: Any = None
    guard: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    signature: dict[str, Any] = field(default_factory=dict)


def _epoch_loader(accelerator: Any, dataloader: Any, epoch: int, skip: int) -> Any:
    """The dataloader for ``epoch`` (same seeded order as ever), without its first ``skip`` micro-batches."""
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    return accelerator.skip_first_batches(dataloader, skip) if skip else dataloader


def train_loop(
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    dataloader: Any,
    reference: ReferenceLogps | None,
    logprob_fn: Any,
    loss_fn: LossFn,
    settings: LoopSettings,
    logger: MetricsLogger,
    evaluate: Callable[[int], Any] | None = None,
    step_fn: StepFn | None = None,
    faults: FaultTolerance | None = None,
) -> dict[str, Any]:
    """Train until ``max_train_steps`` optimizer steps; returns the last logged metrics.

    ``evaluate(step)`` runs every ``settings.eval_steps`` steps and after the last one. ``step_fn`` replaces the
    preference loss (SFT uses it): ``(model, batch) -> (loss, metric sums, count)``, the sums divided by the summed
    counts when logged. ``faults``: checkpoints, resume state and the non-finite guard.
    """
    faults = faults or FaultTolerance()
    state = faults.resume_state or TrainerState()
    state.signature = faults.signature
    faults.guard.skipped = state.nonfinite_skipped
    pending_rng = faults.resume_rng
    if step_fn is None:

        def step_fn(m: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
            loss, metrics = preference_step(m, batch, logprob_fn, loss_fn, reference, settings)
            return loss, metrics, batch["index"].shape[0]

    evaluated_at = -1

    def maybe_evaluate(step: int, last_step: bool) -> None:
        nonlocal evaluated_at
        if evaluate is not None and (last_step or (settings.eval_steps and step % settings.eval_steps == 0)):
            evaluate(step)
            evaluated_at = step

    model.train()
    steps_per_epoch = max(1, math.ceil(len(dataloader) / settings.gradient_accumulation_steps))
    step, tokens_total, last = state.step, state.tokens_total, {}
    interval = StepMetrics()
    start = interval_start = time.perf_counter()
    bar = tqdm(
        total=settings.max_train_steps,
        initial=step,
        desc="training",
        unit="step",
        disable=None if accelerator.is_local_main_process else True,
    )
    for epoch in range(state.epoch, settings.num_epochs):
        if step >= settings.max_train_steps:
            break
        seen = state.batches_in_epoch if epoch == state.epoch else 0
        if pending_rng is not None and seen == 0:  # saved at an epoch's end: before this epoch's iterator, as then
            restore_rng(pending_rng)
            pending_rng = None
        for batch in _epoch_loader(accelerator, dataloader, epoch, seen):
            if pending_rng is not None:  # saved mid-epoch: after the iterator drew its seed, as the original's had
                restore_rng(pending_rng)
                pending_rng = None
            seen += 1
            with accelerator.accumulate(model):
                loss, metrics, count = step_fn(model, batch)
                loss = faults.guard.maybe_inject(loss, step + 1)
                finite = faults.guard.check(accelerator, loss, batch["index"], step + 1)
                if finite:
                    accelerator.backward(loss)
                if accelerator.sync_gradients and settings.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if finite:
                interval.add(metrics, pairs=count, tokens=int(batch["attention_mask"].sum()))
                if settings.peak_flops and settings.flops_fn is not None:
                    interval.flops += settings.flops_fn(batch)
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % settings.logging_steps == 0 or step == settings.max_train_steps:
                averages, _, tokens, flops = _reduce_across_ranks(accelerator, interval)
                now = time.perf_counter()
                tokens_total += tokens
                last = {
                    "training_step": step,
                    "learning_rate": scheduler.get_last_lr()[0],
                    "epoch": step / steps_per_epoch,
                    **averages,
                    "token_count": tokens_total,
                    "nonfinite_skipped": faults.guard.skipped,
                    "perf/tokens_per_second_step": tokens / max(now - interval_start, 1e-9),
                    "perf/tokens_per_second_avg": tokens_total / max(now - start, 1e-9),
                }
                if settings.peak_flops:  # FLOPs summed over ranks, over every rank's peak for the interval
                    last["perf/mfu_step"] = mfu(
                        flops, now - interval_start, settings.peak_flops, accelerator.num_processes
                    )
                logger.log(last)
                interval, interval_start = StepMetrics(), now
            maybe_evaluate(step, last_step=step >= settings.max_train_steps)
            end_of_epoch = seen >= len(dataloader)
            if faults.policy is not None and faults.policy.due(step, end_of_epoch):
                # Logging above always ran at a checkpoint step when logging_steps divides it; otherwise the
                # interval's sums since the last log are lost on resume, which only affects one logged average.
                position = (epoch + 1, 0) if end_of_epoch else (epoch, seen)
                state = TrainerState(step, *position, tokens_total, faults.guard.skipped, faults.signature)
                path = save_checkpoint(accelerator, model, faults.policy, state)
                accelerator.print(f"saved checkpoint {path}")
            if step >= settings.max_train_steps:
                bar.close()
                return last
    bar.close()
    if evaluated_at != step:  # the data ran out before max_train_steps: evaluate the end state too
        maybe_evaluate(step, last_step=True)
    return last
