"""Evaluation during training: the held-out set, and its loss and reward metrics every ``--eval_steps`` steps.

The evaluation set is either its own mix (``--eval_mixer_list``) or a seeded fraction held out of the training data
(``--eval_fraction``); for DPO the data layer builds it (``PreparedData.eval_records``), for SFT
:func:`prepare_eval_records` does. Each rank evaluates its shard of the set; the per-example values are gathered into one table
keyed by dataset ``index``, so the padding accelerate adds to even out the last batch is counted once, and every rank
ends with the same numbers.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import torch

from open_instruct.config import DPOArguments, UserError
from open_instruct.losses import LossFn
from open_instruct.reference_cache import ReferenceLogps
from open_instruct.tracking import MetricsLogger
from open_instruct.trainer import LoopSettings, pair_losses


def reindex(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same records with ``index`` renumbered 0..N-1 (the reference table and eval table are indexed by it)."""
    return [{**r, "index": i} for i, r in enumerate(records)]


def hold_out(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded ``fraction`` of ``records`` (at least one) held out; both renumbered from 0."""
    n_eval = max(1, round(fraction * len(records)))
    if n_eval >= len(records):
        raise UserError(f"--eval_fraction {fraction} leaves no training pairs out of {len(records)}")
    held = set(random.Random(seed).sample(range(len(records)), n_eval))
    train = [r for i, r in enumerate(records) if i not in held]
    evaluation = [r for i, r in enumerate(records) if i in held]
    return reindex(train), reindex(evaluation)


def prepare_eval_records(
    args: DPOArguments, records: list[dict[str, Any]], prepare: Callable[[DPOArguments, list[str], list[str]], list]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(training records, evaluation records or None) for the run's evaluation settings.

    ``prepare(args, mixer_list, splits)`` tokenizes a mix (preference pairs for DPO, conversations for SFT).
    """
    if args.eval_mixer_list:
        # --max_train_samples limits the training mix only.
        eval_args = dataclasses.replace(args, max_train_samples=None)
        return records, reindex(prepare(eval_args, args.eval_mixer_list, args.eval_mixer_list_splits))
    if args.eval_fraction > 0:
        return hold_out(records, args.eval_fraction, args.seed)
    return records, None


@torch.no_grad()
def gather_table(
    accelerator: Any,
    model: Any,
    dataloader: Any,
    rows: int,
    values_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
) -> torch.Tensor:
    """``[rows, K]``: ``values_fn(model, batch)`` (``[B, K]`` per batch) for every dataset index, merged over ranks."""
    was_training = model.training
    model.eval()
    table: torch.Tensor | None = None
    for batch in dataloader:
        values = values_fn(model, batch).float()
        merged_index = accelerator.gather(batch["index"]).cpu()
        merged = accelerator.gather(values.contiguous()).cpu()
        if table is None:
            table = torch.full((rows, merged.shape[1]), float("nan"))
        table[merged_index] = merged
    model.train(was_training)
    if table is None or torch.isnan(table).any():
        raise RuntimeError(f"evaluation left some of the {rows} examples without values")
    return table


class PreferenceEvaluator:
    """Held-out DPO metrics: ``eval/loss``, ``eval/rewards/{accuracy,margin,chosen,rejected}``, ``eval/logps/*``."""

    def __init__(
        self,
        accelerator: Any,
        model: Any,
        dataloader: Any,
        rows: int,
        reference: ReferenceLogps | None,
        logprob_fn: Any,
        loss_fn: LossFn,
        settings: LoopSettings,
        logger: MetricsLogger,
    ) -> None:
        self.accelerator, self.model, self.dataloader, self.rows = accelerator, model, dataloader, rows
        self.reference, self.logprob_fn, self.loss_fn, self.settings = reference, logprob_fn, loss_fn, settings
        self.logger = logger

    def _pair_values(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, 5]``: loss, chosen reward, rejected reward, chosen log-prob, rejected log-prob."""
        chosen, rejected, out = pair_losses(model, batch, self.logprob_fn, self.loss_fn, self.reference, self.settings)
        no_reward = torch.full_like(out.losses, float("inf"))  # the loss defines no rewards (NaN means "missing")
        c = out.chosen_rewards if out.chosen_rewards is not None else no_reward
        r = out.rejected_rewards if out.rejected_rewards is not None else no_reward
        return torch.stack([out.losses, c, r, chosen, rejected], dim=1)

    def __call__(self, step: int) -> dict[str, float]:
        """Evaluate now, log the metrics at ``step`` and return them."""
        table = gather_table(self.accelerator, self.model, self.dataloader, self.rows, self._pair_values)
        loss, c, r, lc, lr = table.unbind(1)
        metrics = {
            "eval/loss": loss.mean().item(),
            "eval/logps/chosen": lc.mean().item(),
            "eval/logps/rejected": lr.mean().item(),
        }
        if torch.isfinite(c).all():
            metrics.update(
                {
                    "eval/rewards/accuracy": (c > r).float().mean().item(),
                    "eval/rewards/margin": (c - r).mean().item(),
                    "eval/rewards/chosen": c.mean().item(),
                    "eval/rewards/rejected": r.mean().item(),
                }
            )
        log_eval(self.accelerator, self.logger, step, metrics)
        return metrics


class NLLEvaluator:
    """Held-out SFT metric: ``eval/loss``, the mean negative log-likelihood per label token."""

    def __init__(
        self, accelerator: Any, model: Any, dataloader: Any, rows: int, logprob_fn: Any, logger: MetricsLogger
    ) -> None:
        self.accelerator, self.model, self.dataloader, self.rows = accelerator, model, dataloader, rows
        self.logprob_fn, self.logger = logprob_fn, logger

    def _values(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lp = self.logprob_fn(model, batch)
        return torch.stack([-lp.sums, lp.counts.to(lp.sums.dtype)], dim=1)

    def __call__(self, step: int) -> dict[str, float]:
        """Evaluate now, log the metric at ``step`` and return it."""
        table = gather_table(self.accelerator, self.model, self.dataloader, self.rows, self._values)
        metrics = {"eval/loss": (table[:, 0].sum() / table[:, 1].sum().clamp(min=1)).item()}
        log_eval(self.accelerator, self.logger, step, metrics)
        return metrics


def eval_console_line(step: int, metrics: dict[str, float]) -> str:
    """``eval step=100 loss=0.4523 accuracy=72.50% margin=0.1234`` (fields the run has)."""
    parts = [f"eval step={step}", f"loss={metrics['eval/loss']:.4f}"]
    if "eval/rewards/accuracy" in metrics:
        parts.append(f"accuracy={100 * metrics['eval/rewards/accuracy']:.2f}%")
        parts.append(f"margin={metrics['eval/rewards/margin']:.4f}")
    return " ".join(parts)


def log_eval(accelerator: Any, logger: MetricsLogger, step: int, metrics: dict[str, float]) -> None:
    """One metrics.jsonl / tracker row at ``step`` plus the eval console line."""
    logger.log({"training_step": step, **metrics}, console=False)
    accelerator.print(eval_console_line(step, metrics))
