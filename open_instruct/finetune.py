"""Supervised fine-tuning on chat data: the stage before DPO, with the same machinery, top to bottom.

    python -m open_instruct.finetune [recipe.yaml] --model_name_or_path M --mixer_list chat.jsonl 1.0 ...
    accelerate launch -m open_instruct.finetune ...

The flags are those of ``dpo_tune_cache`` (model, data mix, optimisation, evaluation, tracking, distributed) minus the
preference-loss ones, which are rejected. The loss is the mean negative log-likelihood of the assistant tokens; the
final checkpoint is a Hugging Face folder that ``run_dpo`` / ``dpo_tune_cache`` take as ``--model_name_or_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from open_instruct.config import TrainArguments, settings_of, validate
from open_instruct.config.stage_flags import DPO_ONLY
from open_instruct.data.prepare import write_statistics
from open_instruct.data.sft import SFTCollator, prepare_sft_data
from open_instruct.errors import UserError
from open_instruct.model.modeling import load_model, load_tokenizer
from open_instruct.objectives.logprobs import sequence_logprobs
from open_instruct.report.phases import phase
from open_instruct.report.tracking import MetricsLogger
from open_instruct.training import recipe
from open_instruct.training.evaluation import NLLEvaluator, prepare_eval_records
from open_instruct.training.precision import in_run_precision
from open_instruct.training.recipe import command_line
from open_instruct.training.sft import sft_step


def check_sft_arguments(args: TrainArguments) -> None:
    """Reject DPO-only flags, then run the common validation."""
    defaults = TrainArguments(reference_logprobs_cache_path="unused")
    used = [f"--{name}" for name in DPO_ONLY if getattr(args, name) != getattr(defaults, name)]
    if used:
        raise UserError(f"{', '.join(used)}: DPO-only flag(s), not used by supervised fine-tuning")
    validate(args)


def run(args: TrainArguments) -> Path:
    """Fine-tune one model on chat data; returns the folder holding the final checkpoint."""
    cfg = settings_of(args)  # each layer below gets the settings of its concern

    # 1. Engine, seed, tokenizer, data (every row checked before the model loads).
    accelerator, output_dir = recipe.start_run(args)
    tokenizer = load_tokenizer(cfg.model)
    with phase("data"):
        records, stats = prepare_sft_data(cfg.data, tokenizer)
        records, eval_records = prepare_eval_records(
            cfg.data, records, lambda eval_data: prepare_sft_data(eval_data, tokenizer)[0]
        )
    accelerator.print(
        f"data: {stats['kept']} conversations kept ({stats['label_tokens']} assistant tokens), "
        f"{stats['dropped']} dropped, {stats['truncated']} truncated"
        + (f"; {len(eval_records)} held out for evaluation" if eval_records else "")
    )
    if accelerator.is_main_process:
        write_statistics(stats, output_dir)

    # 2. Model, optimizer, schedule, data loader under the engine.
    model = load_model(cfg.model, tokenizer)
    collate = SFTCollator(tokenizer.pad_token_id)
    train_loader = DataLoader(records, batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=collate)
    run = recipe.prepare_training(args, accelerator, model, train_loader, output_dir, "conversations", "sft")

    def logprob_fn_fp(m: Any, batch: dict[str, torch.Tensor]) -> Any:
        return sequence_logprobs(
            m, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size=args.logprob_chunk_size
        )

    logprob_fn = in_run_precision(accelerator, logprob_fn_fp, report=accelerator.print)  # run's precision, fp32 logps

    # 3. Training, with held-out NLL every --eval_steps.
    logger = MetricsLogger(accelerator, output_dir, use_wandb=args.with_tracking)
    evaluate = None
    if eval_records:
        eval_loader = accelerator.prepare_data_loader(
            DataLoader(
                eval_records, batch_size=2 * args.per_device_train_batch_size, shuffle=False, collate_fn=collate
            )
        )
        evaluate = NLLEvaluator(accelerator, run.model, eval_loader, len(eval_records), logprob_fn, logger)
    recipe.train(args, accelerator, run, sft_step(logprob_fn), logger, evaluate)

    # 4. Final checkpoint in Hugging Face format (a valid starting point for DPO), curves.
    recipe.finish_run(accelerator, run.model, tokenizer, output_dir)
    accelerator.end_training()
    return output_dir


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: one clear line and exit code 2 for bad input."""
    command_line(argv, check_sft_arguments, run, stage="sft")


if __name__ == "__main__":
    main()
