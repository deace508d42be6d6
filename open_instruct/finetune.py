"""Supervised fine-tuning on chat data: the stage before DPO, with the same machinery, top to bottom.

    python -m open_instruct.finetune [recipe.yaml] --model_name_or_path M --mixer_list chat.jsonl 1.0 ...
    accelerate launch -m open_instruct.finetune ...

The flags are those of ``dpo_tune_cache`` (model, data mix, optimisation, evaluation, tracking, distributed) minus the
preference-loss ones, which are rejected. The loss is the mean negative log-likelihood of the assistant tokens; the
final checkpoint is a Hugging Face folder that ``run_dpo`` / ``dpo_tune_cache`` take as ``--model_name_or_path``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from open_instruct.api import (
    SFTDatasetConfig,
    TrainingConfig,
    arguments_from,
    dataset_arguments,
    final_checkpoint,
    fresh_accelerate_state,
    source_tokenizer,
    training_arguments,
)
from open_instruct.config import TrainArguments, settings_of, validate
from open_instruct.data.tokenize import IGNORE_INDEX
from open_instruct.errors import UserError
from open_instruct.objectives.losses import hyperparameter_names
from open_instruct.training.recipe import command_line, preflight

# Flags that only mean something for a preference loss: passing one to SFT is an error, never ignored.
DPO_ONLY = (
    "loss_type",
    "loss_weights",
    *hyperparameter_names(),
    "reference_free",
    "separate_forward",
    "cache_logprobs_only",
    # preference-pair preparation: the prepared-pairs cache and its JSONL copy
    "dataset_mix_dir",
    "overwrite_cache",
    "skip_cache",
    "data_loader_seed",  # the SFT loader shuffles with --seed
    "reference_batch_size",
    "dataset_format",
    # pair batching (packing, token budget, length grouping) is built for preference pairs only so far
    "packing",
    "max_tokens_per_batch",
    "group_by_length",
    # SFT has no checkpoint resume yet, so a stop signal keeps its default action
    "preemption_signals",
)


def check_sft_arguments(args: TrainArguments) -> None:
    """Reject preference-loss flags, then run the common validation."""
    defaults = TrainArguments(reference_logprobs_cache_path="unused")
    used = [f"--{name}" for name in DPO_ONLY if getattr(args, name) != getattr(defaults, name)]
    if used:
        raise UserError(f"{', '.join(used)}: preference-loss flag(s), not used by supervised fine-tuning")
    validate(args)


def label_tokens(batch: dict[str, torch.Tensor], rows: int) -> int:
    """Predicted (label) tokens of the first ``rows`` conversations: the first token of each is never a target."""
    return int((batch["labels"][:rows, 1:] != IGNORE_INDEX).sum())


def sft_step(logprob_fn: Any) -> Any:
    """The trainer's step for SFT: summed NLL of the real conversations' label tokens, scaled by the loop (which
    divides by the optimizer step's label tokens on all ranks: a per-token mean over the whole step), and the count."""
    from open_instruct.training.loop import StepFn

    def run(model: Any, batch: dict[str, torch.Tensor], rows: int, scale: float) -> tuple[Any, dict, int]:
        lp = logprob_fn(model, batch)
        nll = -lp.sums[:rows].sum()
        return nll * scale, {"train_loss": nll.detach()}, int(lp.counts[:rows].sum())

    return StepFn(run=run, units=label_tokens)


def run(args: TrainArguments) -> Path:
    """Fine-tune one model on chat data; returns the folder holding the final checkpoint."""
    cfg = settings_of(args)  # each layer below gets the settings of its concern
    from torch.utils.data import DataLoader

    from open_instruct.data.prepare import write_statistics
    from open_instruct.data.sft import SFTCollator, prepare_sft_data
    from open_instruct.model.modeling import load_model, load_tokenizer
    from open_instruct.objectives.logprobs import sequence_logprobs
    from open_instruct.report.tracking import MetricsLogger
    from open_instruct.training import recipe
    from open_instruct.training.evaluation import NLLEvaluator, prepare_eval_records
    from open_instruct.training.precision import in_run_precision

    # 1. Engine, seed, tokenizer, data (every row checked before the model loads).
    accelerator, output_dir = recipe.start_run(args)
    tokenizer = load_tokenizer(cfg.model)
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


def run_sft(
    pretrain_checkpoint: str | os.PathLike,
    train_config: TrainingConfig | None = None,
    dataset_config: SFTDatasetConfig | None = None,
    tokenizer_name: str | None = None,
    model_config: Any = None,
    dry_run: bool = False,
) -> Any:
    """Supervised fine-tuning from a pretrained checkpoint (HF folder, hub id, or ``.pt``: ours carry their model
    config and tokenizer, a bare state dict needs ``tokenizer_name`` and ``model_config``); returns the final
    checkpoint, the output folder or with ``save_format="pt"`` ``sft_final.pt``: a valid ``sft_checkpoint`` for
    ``run_dpo``. ``dry_run=True``: check and print the plan instead (see ``api.run_dpo``); returns it."""
    from open_instruct.model.state_dict import is_state_dict_file, state_dict_to_folder

    train = train_config or TrainingConfig()
    dataset = dataset_config or SFTDatasetConfig()
    tokenizer_name = tokenizer_name or train.tokenizer_name
    values = {
        **training_arguments(train),
        **dataset_arguments(dataset, train, "SFT"),
        "model_name_or_path": str(pretrain_checkpoint),
        "max_seq_length": dataset.max_seq_length,
    }
    if tokenizer_name:
        values["tokenizer_name_or_path"] = tokenizer_name
    args = arguments_from(values)
    check_sft_arguments(args)
    if dry_run or args.dry_run:
        from open_instruct.api import plan_run

        return plan_run(args, "sft")
    if is_state_dict_file(str(pretrain_checkpoint)):
        args.model_name_or_path = str(
            state_dict_to_folder(
                str(pretrain_checkpoint), tokenizer_name, model_config, Path(train.output_dir) / "initial_model"
            )
        )
        args.tokenizer_name_or_path = args.model_name_or_path
    preflight(args)
    with fresh_accelerate_state():
        folder = Path(run(args))
    return final_checkpoint(folder, train, "sft", source_tokenizer(str(pretrain_checkpoint), tokenizer_name))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: one clear line and exit code 2 for bad input."""
    command_line(argv, check_sft_arguments, run, stage="sft")


if __name__ == "__main__":
    main()
