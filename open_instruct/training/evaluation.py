"""Evaluation during training: the held-out set, and its loss and reward metrics every ``--eval_steps`` steps.

The evaluation set is either its own mix (``--eval_mixer_list``) or a seeded fraction held out of the training data
(``--eval_fraction``); for DPO the data layer builds it (``PreparedData.eval_records``), for SFT
:func:`prepare_eval_records` does. Each rank evaluates its shard of the set; the per-example values are gathered into one table
keyed by dataset ``index``, so the padding accelerate adds to even out the last batch is counted once, and every rank
ends with the same numbers.

Offline, :func:`preference_accuracy` measures how often the policy itself prefers the chosen reply (average log-prob
per reply token), with no reference model, so it is meaningful before training too (``python -m
open_instruct.evaluate``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from open_instruct.data.collate import PaddedPairCollator
from open_instruct.data.mixer import hold_out, reindex
from open_instruct.engine import gather_rows
from open_instruct.objectives.logprobs import sequence_logprobs
from open_instruct.objectives.losses import LossFn
from open_instruct.report.tracking import MetricsLogger
from open_instruct.settings import DataSettings
from open_instruct.training.preemption import EvaluationStopped, signal_name, stop_agreed
from open_instruct.training.preference import PairObjective, PreferenceSettings
from open_instruct.training.reference_cache import ReferenceLogps


def prepare_eval_records(
    data: DataSettings, records: list[dict[str, Any]], prepare: Callable[[DataSettings], list]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(training records, evaluation records or None) for the run's evaluation settings.

    ``prepare(data)`` tokenizes the mix ``data.mixer_list`` (conversations for SFT); it is called with the evaluation
    mix in ``mixer_list`` and ``mixer_list_splits``.
    """
    if data.eval_mixer_list:
        # --max_train_samples limits the training mix only.
        eval_data = dataclasses.replace(
            data,
            mixer_list=data.eval_mixer_list,
            mixer_list_splits=data.eval_mixer_list_splits,
            max_train_samples=None,
        )
        return records, reindex(prepare(eval_data))
    if data.eval_fraction > 0:
        return hold_out(records, data.eval_fraction, data.seed)
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
        if stop_agreed(accelerator):  # the loop saves a checkpoint that redoes this evaluation on resume
            model.train(was_training)
            raise EvaluationStopped(f"evaluation of {rows} examples stopped by {signal_name()}")
        values = values_fn(model, batch)
        if table is None:
            table = torch.full((rows, values.shape[1]), float("nan"))
        gather_rows(accelerator, table, batch["index"], values)
    model.train(was_training)
    if table is None or torch.isnan(table).any():
        raise RuntimeError(f"evaluation left some of the {rows} examples without values")
    return table


@dataclass(eq=False)
class HeldOutEvaluator:
    """Evaluation on the held-out loader's ``rows`` examples: each example's values (``_values``) gathered into one
    table, the table's metrics (``_metrics``) logged at the step. A subclass adds its fields, ``logger`` among them."""

    accelerator: Any
    model: Any
    dataloader: Any
    rows: int

    def __call__(self, step: int) -> dict[str, float]:
        """Evaluate now, log the metrics at ``step`` and return them."""
        table = gather_table(self.accelerator, self.model, self.dataloader, self.rows, self._values)
        metrics = self._metrics(table)
        log_eval(self.accelerator, self.logger, step, metrics)
        return metrics

    def _values(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _metrics(self, table: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError


@dataclass(eq=False)
class PreferenceEvaluator(HeldOutEvaluator):
    """Held-out DPO metrics: ``eval/loss``, ``eval/rewards/{accuracy,margin,chosen,rejected}``, ``eval/logps/*``."""

    reference: ReferenceLogps | None
    logprob_fn: Any
    loss_fn: LossFn
    settings: PreferenceSettings
    logger: MetricsLogger

    def _values(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, 5]``: loss, chosen reward, rejected reward, chosen log-prob, rejected log-prob."""
        objective = PairObjective(self.logprob_fn, self.loss_fn, self.reference, self.settings)
        chosen, rejected, out = objective.pair_losses(model, batch)
        no_reward = torch.full_like(out.losses, float("inf"))  # the loss defines no rewards (NaN means "missing")
        c = out.chosen_rewards if out.chosen_rewards is not None else no_reward
        r = out.rejected_rewards if out.rejected_rewards is not None else no_reward
        return torch.stack([out.losses, c, r, chosen, rejected], dim=1)

    def _metrics(self, table: torch.Tensor) -> dict[str, float]:
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
        return metrics


@dataclass(eq=False)
class NLLEvaluator(HeldOutEvaluator):
    """Held-out SFT / pretraining metric: ``eval/loss``, the mean negative log-likelihood per label token (and with
    ``perplexity``, ``eval/perplexity``: its exponential)."""

    logprob_fn: Any
    logger: MetricsLogger
    perplexity: bool = False

    def _values(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, 2]``: summed negative log-likelihood, label-token count."""
        lp = self.logprob_fn(model, batch)
        return torch.stack([-lp.sums, lp.counts.to(lp.sums.dtype)], dim=1)

    def _metrics(self, table: torch.Tensor) -> dict[str, float]:
        metrics = {"eval/loss": (table[:, 0].sum() / table[:, 1].sum().clamp(min=1)).item()}
        if self.perplexity:
            metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50.0))  # capped: no overflow to inf
        return metrics


def eval_console_line(step: int, metrics: dict[str, float]) -> str:
    """``eval step=100 loss=0.4523 accuracy=72.50% margin=0.1234`` (fields the run has)."""
    parts = [f"eval step={step}", f"loss={metrics['eval/loss']:.4f}"]
    if "eval/perplexity" in metrics:
        parts.append(f"perplexity={metrics['eval/perplexity']:.3f}")
    if "eval/rewards/accuracy" in metrics:
        parts.append(f"accuracy={100 * metrics['eval/rewards/accuracy']:.2f}%")
        parts.append(f"margin={metrics['eval/rewards/margin']:.4f}")
    return " ".join(parts)


def log_eval(accelerator: Any, logger: MetricsLogger, step: int, metrics: dict[str, float]) -> None:
    """One metrics.jsonl / tracker row at ``step`` plus the eval console line."""
    logger.log({"training_step": step, **metrics}, console=False)
    accelerator.print(eval_console_line(step, metrics))


@torch.no_grad()
def preference_accuracy(model: Any, records: list[dict[str, Any]], pad_token_id: int, batch_size: int = 64) -> float:
    """Fraction of pairs whose chosen reply has the higher mean log-prob under ``model``."""
    model.eval()
    collate = PaddedPairCollator(pad_token_id)
    correct = 0
    for start in range(0, len(records), batch_size):
        batch = collate(records[start : start + batch_size])
        lp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        half = batch["index"].shape[0]
        correct += int((lp.means[:half] > lp.means[half:]).sum())
    return correct / max(len(records), 1)
