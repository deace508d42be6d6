"""The training loop: micro-batches, accumulation, optimizer steps, metrics.

The loop knows nothing of the stage: a :class:`StepFn` maps ``(model, micro-batch, real rows, scale)`` to
``(loss, metric sums, count)`` (the sums are divided by the summed counts when logged). DPO's is
:func:`open_instruct.training.preference.preference_step_fn`, SFT's :func:`open_instruct.training.sft.sft_step`.

One normalization for every batching mode and world size: the loop reads an optimizer step's micro-batches ahead, asks
the stage how many units (pairs, label tokens) the real rows of each hold (rows accelerate repeats to even out the
ranks at an epoch's end are not real), sums them over the micro-batches and ranks in one all-reduce, and each
micro-batch's loss is its per-unit loss sum over that total. Engines average gradients over ranks and accumulation
divides by the accumulation steps, so ``scale`` carries both factors back: the step's gradient is that of the mean
over all its real units, the same on 1, 2 or N processes at the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from open_instruct.engine.loss_scaling import LossScaler, scale_metrics
from open_instruct.report.tracking import MetricsLogger
from open_instruct.training.checkpointing import CheckpointPolicy, TrainerState, restore_rng, save_checkpoint
from open_instruct.training.nonfinite import NonFiniteGuard
from open_instruct.training.pair_record import record_pairs
from open_instruct.training.perf import mfu
from open_instruct.training.preemption import (
    PREEMPTED_EXIT_CODE,
    EvaluationStopped,
    Preempted,
    signal_name,
    stop_agreed,
)

StepOutput = tuple[torch.Tensor, dict[str, torch.Tensor], int]


def _all_rows_tokens(batch: dict[str, torch.Tensor], rows: int) -> int:
    return int(batch["attention_mask"][:rows].sum())


@dataclass(frozen=True)
class StepFn:
    """A stage's step. ``run(model, batch, rows, scale)``: the loss to back-propagate (sum over the first ``rows``
    (real) examples of their per-unit losses, times ``scale``), per-unit metric sums and the unit count of those rows.
    ``units(batch, rows)``: that unit count, read from the batch before the forward (pairs, label tokens).
    ``tokens(batch, rows)``: the real rows' input tokens (throughput). ``split(batch, rows)``: the forward passes
    a micro-batch runs as, each ``(pass, its real rows)`` (:mod:`open_instruct.training.forward_passes`); None: one."""

    run: Callable[[Any, dict[str, torch.Tensor], int, float], StepOutput]
    units: Callable[[dict[str, torch.Tensor], int], int]
    tokens: Callable[[dict[str, torch.Tensor], int], int] = _all_rows_tokens
    split: Callable[[dict[str, torch.Tensor], int], list[tuple[dict[str, torch.Tensor], int]]] | None = None

    def passes(self, batch: dict[str, torch.Tensor], rows: int) -> list[tuple[dict[str, torch.Tensor], int]]:
        """The forward passes of one micro-batch with their real rows."""
        return [(batch, rows)] if self.split is None else self.split(batch, rows)


@dataclass
class LoopSettings:
    """What the loop needs to know beyond its components."""

    num_epochs: int
    max_train_steps: int
    gradient_accumulation_steps: int
    max_grad_norm: float
    logging_steps: int
    eval_steps: int | None = None
    flops_fn: Any = None  # batch -> training FLOPs (open_instruct.training.perf.FlopCounter); with peak_flops, MFU
    peak_flops: float | None = None  # the device's peak FLOP/s; None (CPU, unknown GPU): no perf/mfu_step
    # (epoch, micro-batch position on this rank) -> its real rows (open_instruct.data.sampler.real_rows_fn); None: all
    real_rows: Callable[[int, int], int] | None = None
    sync_each_batch: bool = False  # all-reduce gradients after every micro-batch, not only the step's last
    log_grad_norm: bool = False  # log the gradient norm before clipping as grad_norm
    step_hook: Callable[[int], None] | None = None  # called after each optimizer step (the profiler's step)
    loss_scaler: LossScaler | None = None  # fp16 without DeepSpeed: scales the loss, skips steps that overflow


@dataclass
class StepMetrics:
    """Sums over the micro-batches of one logging interval."""

    sums: dict[str, float] = field(default_factory=dict)
    pairs: int = 0
    tokens: int = 0
    flops: float = 0.0
    grad_norm: float | None = None  # of the interval's last optimizer step

    def add(self, values: dict[str, torch.Tensor], pairs: int, tokens: int) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.pairs += pairs
        self.tokens += tokens


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
    """Checkpointing, resume and the non-finite guard (all optional): see :mod:`open_instruct.training.checkpointing`."""

    policy: CheckpointPolicy | None = None
    resume_state: TrainerState | None = None
    resume_rng: Any = None
    guard: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    signature: dict[str, Any] = field(default_factory=dict)
    # Where a stop signal's checkpoint goes (None: the stage cannot resume, signals keep their default action).
    preemption: CheckpointPolicy | None = None


def _epoch_loader(accelerator: Any, dataloader: Any, epoch: int, skip: int) -> Any:
    """The dataloader for ``epoch`` (same seeded order as ever), without its first ``skip`` micro-batches."""
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    return accelerator.skip_first_batches(dataloader, skip) if skip else dataloader


def _start_clock(tokens_before: int) -> dict[str, float]:
    """The loop's clock: when this attempt started, when the current logging interval started, the run's token count
    so far (a resumed run's starts at its checkpoint's) and the count this attempt started from."""
    now = time.perf_counter()
    return {"start": now, "interval": now, "tokens": tokens_before, "start_tokens": tokens_before}


def _interval_row(
    accelerator: Any, interval: StepMetrics, settings: LoopSettings, clock: dict[str, float], lr: float, epoch: float
) -> tuple[dict[str, Any], dict[str, float]]:
    """One interval's averages (reduced over ranks, with learning rate and epoch) and its throughput and MFU."""
    averages, _, tokens, flops = _reduce_across_ranks(accelerator, interval)
    now = time.perf_counter()
    row = {"learning_rate": lr, "epoch": epoch, **averages}
    perf = {
        "perf/tokens_per_second_step": tokens / max(now - clock["interval"], 1e-9),
        # this attempt's tokens over this attempt's time (a resumed run's clock starts at its checkpoint's count)
        "perf/tokens_per_second_avg": (clock["tokens"] + tokens - clock["start_tokens"])
        / max(now - clock["start"], 1e-9),
    }
    if settings.peak_flops:  # FLOPs summed over ranks, over every rank's peak for the interval
        perf["perf/mfu_step"] = mfu(flops, now - clock["interval"], settings.peak_flops, accelerator.num_processes)
    clock["interval"], clock["tokens"] = now, clock["tokens"] + tokens
    return row, perf


def _windows(batches: Any, size: int) -> Any:
    """The micro-batches of each optimizer step, as lists (the last one of an epoch may be shorter)."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _window_rows(
    accelerator: Any, window: list[dict], step_fn: StepFn, settings: LoopSettings, where: tuple[int, int, int]
) -> tuple[list[int], float]:
    """Each micro-batch's real rows, and the loss scale: accumulation steps x ranks / the step's units on all ranks.
    ``where``: (epoch, this rank's position of the window's first micro-batch, the optimizer step it makes)."""
    epoch, first, step = where
    rows = [
        batch["index"].shape[0] if settings.real_rows is None else settings.real_rows(epoch, first + i)
        for i, batch in enumerate(window)
    ]
    record_pairs(step, accelerator.process_index, window, rows)  # a test hook; nothing when unset
    units = torch.tensor(
        [float(sum(step_fn.units(b, r) for b, r in zip(window, rows)))], dtype=torch.float64, device=accelerator.device
    )
    if accelerator.num_processes > 1:
        units = accelerator.reduce(units, reduction="sum")
    scale = settings.gradient_accumulation_steps * accelerator.num_processes / max(float(units), 1.0)
    return rows, scale


def _micro_step(
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    batch: dict,
    work: tuple[int, float, bool],
    step_fn: StepFn,
    settings: LoopSettings,
    guard: NonFiniteGuard,
    step: int,
) -> tuple[bool, dict[str, torch.Tensor], int, float | None]:
    """Forward, guard, backward and (at the step's last micro-batch) the optimizer step of one micro-batch;
    ``work``: (real rows, loss scale, whether it ends the optimizer step). Returns (finite, metric sums, count,
    gradient norm before clipping when asked for and this micro-batch ended the step)."""
    rows, scale, boundary = work
    # accelerate's accumulate() would end the step when the loader says it is exhausted, which a read-ahead loader
    # says one window early: the boundary is set here, as accumulate() would, from the window.
    accelerator.gradient_state._set_sync_gradients(boundary)
    norm = None
    with contextlib.nullcontext() if boundary or settings.sync_each_batch else accelerator.no_sync(model):
        loss, metrics, count = step_fn.run(model, batch, rows, scale)
        loss = guard.maybe_inject(loss, step + 1)
        finite = guard.check(accelerator, loss, batch["index"], step + 1)
        scaler = settings.loss_scaler
        if finite:
            accelerator.backward(loss if scaler is None else scaler.scale_loss(loss))
        # Unscaled before clipping, as GradScaler; an overflow on any rank skips the step (and its schedule) on all.
        overflow = scaler is not None and accelerator.sync_gradients and scaler.unscale_(model.parameters())
        if accelerator.sync_gradients and (settings.max_grad_norm > 0 or settings.log_grad_norm):
            # max_norm inf measures without clipping; the returned norm is the one before clipping either way.
            limit = settings.max_grad_norm if settings.max_grad_norm > 0 else math.inf
            norm = accelerator.clip_grad_norm_(model.parameters(), limit)
        if not overflow:
            optimizer.step()
            scheduler.step()
        if scaler is not None and accelerator.sync_gradients:
            scaler.update(overflow)
        optimizer.zero_grad()
    return finite, metrics, count, (float(norm) if norm is not None and settings.log_grad_norm else None)


def train_loop(
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    dataloader: Any,
    step_fn: StepFn,
    settings: LoopSettings,
    logger: MetricsLogger,
    evaluate: Callable[[int], Any] | None = None,
    faults: FaultTolerance | None = None,
) -> dict[str, Any]:
    """Train until ``max_train_steps`` optimizer steps; returns the last logged metrics.

    ``step_fn(model, batch) -> (loss, metric sums, count)``: the stage's step. ``evaluate(step)`` runs every
    ``settings.eval_steps`` steps and after the last one. ``faults``: checkpoints, resume state, non-finite guard.
    """
    faults = faults or FaultTolerance()
    state = faults.resume_state or TrainerState()
    state.signature = faults.signature
    _restore_counters(state, faults, settings)
    pending_rng = faults.resume_rng
    model.train()
    steps_per_epoch = max(1, math.ceil(len(dataloader) / settings.gradient_accumulation_steps))
    step, last, evaluated_at = state.step, {}, -1
    interval = StepMetrics()
    clock = _start_clock(state.tokens_total)
    quiet = None if accelerator.is_local_main_process else True
    bar = tqdm(total=settings.max_train_steps, initial=step, desc="training", unit="step", disable=quiet)
    if state.eval_pending and evaluate is not None:  # cut short by a stop signal: redo it before the resumed steps
        evaluate(step)  # (before the checkpoint's random states are restored: they were saved after it started)
        evaluated_at = step
    for epoch in range(state.epoch, settings.num_epochs):
        if step >= settings.max_train_steps:
            break
        seen = state.batches_in_epoch if epoch == state.epoch else 0
        if pending_rng is not None and seen == 0:  # saved at an epoch's end: before this epoch's iterator, as then
            restore_rng(pending_rng)
            pending_rng = None
        for window in _windows(
            _epoch_loader(accelerator, dataloader, epoch, seen), settings.gradient_accumulation_steps
        ):
            if pending_rng is not None:  # saved mid-epoch: after the iterator drew its seed, as the original's had
                restore_rng(pending_rng)
                pending_rng = None
            rows, scale = _window_rows(accelerator, window, step_fn, settings, (epoch, seen, step + 1))
            passes = [p for i, batch in enumerate(window) for p in step_fn.passes(batch, rows[i])]
            for i, (batch, real) in enumerate(passes):
                work = (real, scale, i == len(passes) - 1)
                finite, metrics, count, norm = _micro_step(
                    accelerator, model, optimizer, scheduler, batch, work, step_fn, settings, faults.guard, step
                )
                interval.grad_norm = norm if norm is not None else interval.grad_norm
                if finite:
                    interval.add(metrics, pairs=count, tokens=step_fn.tokens(batch, real))
                    if settings.peak_flops and settings.flops_fn is not None:
                        interval.flops += settings.flops_fn(batch)
            seen += len(window)
            step += 1
            bar.update(1)
            if settings.step_hook is not None:
                settings.step_hook(step)
            if step % settings.logging_steps == 0 or step == settings.max_train_steps:
                progress = (step, step / steps_per_epoch, scheduler.get_last_lr()[0])
                skipped = {"nonfinite_skipped": faults.guard.skipped, **scale_metrics(settings.loss_scaler, model)}
                last = _log_interval(accelerator, logger, interval, settings, clock, progress, skipped)
                interval = StepMetrics()
            end_of_epoch = seen >= len(dataloader)
            position = (epoch + 1, 0) if end_of_epoch else (epoch, seen)
            evaluated, finished = _after_step(
                accelerator, model, step, settings, evaluate, faults, position, end_of_epoch, clock, bar
            )
            evaluated_at = step if evaluated else evaluated_at
            if finished:
                bar.close()
                return last
    bar.close()
    if evaluate is not None and evaluated_at != step:  # the data ran out before max_train_steps: evaluate the end
        evaluate(step)
    return last


def _restore_counters(state: TrainerState, faults: FaultTolerance, settings: LoopSettings) -> None:
    """The skipped-batch count and fp16's loss scale as the checkpoint being resumed left them."""
    faults.guard.skipped = state.nonfinite_skipped
    if settings.loss_scaler is not None and state.loss_scaler is not None:
        settings.loss_scaler.load_state_dict(state.loss_scaler)


def _log_interval(
    accelerator: Any,
    logger: MetricsLogger,
    interval: StepMetrics,
    settings: LoopSettings,
    clock: dict[str, float],
    progress: tuple[int, float, float],
    skipped: dict[str, float],
) -> dict[str, Any]:
    """Log the steps since the last logged one (``progress``: optimizer step, epoch, learning rate; ``skipped``:
    skip counters and fp16's loss scale); returns the row."""
    step, epoch, lr = progress
    row, perf = _interval_row(accelerator, interval, settings, clock, lr, epoch)
    last = {"training_step": step, **row, "token_count": clock["tokens"]}
    last.update({**skipped, **perf})
    if interval.grad_norm is not None:
        last["grad_norm"] = interval.grad_norm
    logger.log(last)
    return last


def _after_step(
    accelerator: Any,
    model: Any,
    step: int,
    settings: LoopSettings,
    evaluate: Callable[[int], Any] | None,
    faults: FaultTolerance,
    position: tuple[int, int],
    end_of_epoch: bool,
    clock: dict[str, float],
    bar: Any,
) -> tuple[bool, bool]:
    """After optimizer step ``step``: evaluation, scheduled checkpoint, and a stop signal (which checkpoints and
    raises :class:`Preempted`). Returns (evaluated, training finished)."""
    evaluated = eval_cut = False
    if evaluate is not None and (step >= settings.max_train_steps or _due(step, settings.eval_steps)):
        try:
            evaluate(step)
        except EvaluationStopped:
            if faults.preemption is None:
                raise
            eval_cut = True
        evaluated = True
    saved = None
    if faults.policy is not None and faults.policy.due(step, end_of_epoch) and not eval_cut:
        # Logging always ran at a checkpoint step when logging_steps divides it; otherwise the interval's sums since
        # the last log are lost on resume, which only affects one logged average.
        saved = _checkpoint(accelerator, model, faults.policy, faults, step, position, clock, settings.loss_scaler)
        accelerator.print(f"saved checkpoint {saved}")
    if step >= settings.max_train_steps and not eval_cut:  # a stop signal now only has the final save to wait for
        return evaluated, True
    if faults.preemption is not None and (eval_cut or stop_agreed(accelerator)):
        bar.close()
        saved = saved or _checkpoint(
            accelerator, model, faults.preemption, faults, step, position, clock, settings.loss_scaler, eval_cut
        )
        accelerator.print(
            f"preempted by {signal_name()}: saved checkpoint {saved} at optimizer step {step}; "
            f"exiting with code {PREEMPTED_EXIT_CODE}, rerun the same command to resume"
            + (" (it evaluates this step first: the evaluation was cut short)" if eval_cut else "")
        )
        raise Preempted(f"stopped at optimizer step {step}, checkpoint {saved}", step)
    return evaluated, False


def _checkpoint(
    accelerator: Any,
    model: Any,
    policy: CheckpointPolicy,
    faults: FaultTolerance,
    step: int,
    position: tuple[int, int],
    clock: dict[str, float],
    scaler: LossScaler | None = None,
    eval_pending: bool = False,
) -> Any:
    """Save ``step_<step>`` with the loop's position (epoch, micro-batches into it); returns its path."""
    state = TrainerState(step, *position, int(clock["tokens"]), faults.guard.skipped, faults.signature, eval_pending)
    state.loss_scaler = scaler.state_dict() if scaler is not None else None
    return save_checkpoint(accelerator, model, policy, state)


def _due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0
