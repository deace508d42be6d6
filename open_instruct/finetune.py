"""Supervised fine-tuning on chat data: the stage before DPO, with the same machinery, top to bottom.

    python -m open_instruct.finetune [recipe.yaml] --model_name_or_path M --mixer_list chat.jsonl 1.0 ...
    accelerate launch -m open_instruct.finetune ...

The flags are those of ``dpo_tune_cache`` (model, data mix, optimisation, evaluation, tracking, distributed) minus the
preference-loss ones, which are rejected. The loss is the mean negative log-likelihood of the assistant tokens; the
final checkpoint is a Hugging Face folder that ``run_dpo`` / ``dpo_tune_cache`` take as ``--model_name_or_path``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from open_instruct.api import (
    SFTDatasetConfig,
    TrainingConfig,
    dataset_arguments,
    fresh_accelerate_state,
    training_arguments,
)
from open_instruct.config import DPOArguments, UserError, validate
from open_instruct.dpo_tune_cache import preflight

# Flags that only mean something for a preference loss: passing one to SFT is an error, never ignored.
DPO_ONLY = (
    "loss_type",
    "beta",
    "label_smoothing",
    "gamma_beta_ratio",
    "nll_loss_weight",
    "reference_free",
    "separate_forward",
    "reference_batch_size",
    "dataset_format",
    # pair batching (packing, token budget, length grouping) is built for preference pairs only so far
    "packing",
    "max_tokens_per_batch",
    "group_by_length",
)


def check_sft_arguments(args: DPOArguments) -> None:
    """Reject preference-loss flags, then run the common validation."""
    defaults = DPOArguments(reference_logprobs_cache_path="unused")
    used = [f"--{name}" for name in DPO_ONLY if getattr(args, name) != getattr(defaults, name)]
    if used:
        raise UserError(f"{', '.join(used)}: preference-loss flag(s), not used by supervised fine-tuning")
    validate(args)


def sft_step(logprob_fn: Any) -> Any:
    """The trainer's step function for SFT: token-mean NLL of the micro-batch, summed NLL and token count."""

    def step(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        lp = logprob_fn(model, batch)
        tokens = lp.counts.sum()
        loss = -lp.sums.sum() / tokens.clamp(min=1)
        return loss, {"train_loss": -lp.sums.detach().sum()}, int(tokens)

    return step


def run(args: DPOArguments) -> Path:
    """Fine-tune one model on chat data; returns the folder holding the final checkpoint."""
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from open_instruct import eval_loop
    from open_instruct.checkpointing import save_final_model
    from open_instruct.data.prepare import write_statistics
    from open_instruct.data.sft import SFTCollator, prepare_sft_data
    from open_instruct.dpo_tune_cache import build_accelerator, build_scheduler, optimizer_steps
    from open_instruct.logprobs import sequence_logprobs
    from open_instruct.losses import LossSettings
    from open_instruct.modeling import load_model, load_tokenizer
    from open_instruct.tracking import MetricsLogger
    from open_instruct.trainer import LoopSettings, train_loop

    # 1. Accelerator, seed, tokenizer, data (every row checked before the model loads).
    accelerator = build_accelerator(args)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args)
    records, stats = prepare_sft_data(args, tokenizer)
    records, eval_records = eval_loop.prepare_eval_records(
        args, records, lambda a, mix, splits: prepare_sft_data(a, tokenizer, mix, splits)[0]
    )
    accelerator.print(
        f"data: {stats['kept']} conversations kept ({stats['label_tokens']} assistant tokens), "
        f"{stats['dropped']} dropped, {stats['truncated']} truncated"
        + (f"; {len(eval_records)} held out for evaluation" if eval_records else "")
    )
    if accelerator.is_main_process:
        write_statistics(stats, output_dir)

    # 2. Model, optimizer, schedule, dataloader under accelerate.
    model = load_model(args, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    collate = SFTCollator(tokenizer.pad_token_id)
    train_loader = DataLoader(records, batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=collate)
    steps_per_epoch, total_steps = optimizer_steps(len(records), args, accelerator.num_processes)
    scheduler = build_scheduler(args, optimizer, total_steps, accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    run_config = {
        **args.to_dict(),
        "stage": "sft",
        "global_batch_size": global_batch,
        "total_optimizer_steps": total_steps,
        "world_size": accelerator.num_processes,
    }
    accelerator.print(f"global batch {global_batch} conversations; {total_steps} optimizer steps")
    if accelerator.is_main_process:
        (output_dir / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))

    def logprob_fn(m: Any, batch: dict[str, torch.Tensor]) -> Any:
        return sequence_logprobs(
            m, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size=args.logprob_chunk_size
        )

    # 3. Training, with held-out NLL every --eval_steps.
    if args.with_tracking:
        accelerator.init_trackers(
            args.wandb_project,
            config=run_config,
            init_kwargs={"wandb": {"name": args.exp_name, "entity": args.wandb_entity}},
        )
    settings = LoopSettings(
        num_epochs=-(-total_steps // steps_per_epoch),
        max_train_steps=total_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps,
        length_normalized=False,
        loss_settings=LossSettings(),
        eval_steps=args.eval_steps,
    )
    logger = MetricsLogger(accelerator, output_dir, use_wandb=args.with_tracking)
    evaluate = None
    if eval_records:
        eval_loader = accelerator.prepare_data_loader(
            DataLoader(
                eval_records, batch_size=2 * args.per_device_train_batch_size, shuffle=False, collate_fn=collate
            )
        )
        evaluate = eval_loop.NLLEvaluator(accelerator, model, eval_loader, len(eval_records), logprob_fn, logger)
    train_loop(
        accelerator,
        model,
        optimizer,
        scheduler,
        train_loader,
        None,
        logprob_fn,
        None,
        settings,
        logger,
        evaluate=evaluate,
        step_fn=sft_step(logprob_fn),
    )

    # 4. Final checkpoint in Hugging Face format: a valid starting point for DPO.
    save_final_model(accelerator, model, tokenizer, output_dir)
    accelerator.print(f"saved the final model to {output_dir}")
    accelerator.end_training()
    return output_dir


def run_sft(
    pretrain_checkpoint: str | os.PathLike,
    train_config: TrainingConfig | None = None,
    dataset_config: SFTDatasetConfig | None = None,
    tokenizer_name: str | None = None,
    model_config: Any = None,
) -> Path:
    """Supervised fine-tuning from a pretrained checkpoint (HF folder, hub id or ``.pt`` state dict); returns the
    final checkpoint's folder, a valid ``sft_checkpoint`` for ``run_dpo``."""
    from open_instruct.state_dict import is_state_dict_file, state_dict_to_folder

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
    args = DPOArguments(**values)
    check_sft_arguments(args)
    if is_state_dict_file(str(pretrain_checkpoint)):
        args.model_name_or_path = str(
            state_dict_to_folder(
                str(pretrain_checkpoint), tokenizer_name, model_config, Path(train.output_dir) / "initial_model"
            )
        )
        args.tokenizer_name_or_path = args.model_name_or_path
    preflight(args)
    with fresh_accelerate_state():
        return Path(run(args))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: one clear line and exit code 2 for bad input."""
    from open_instruct.cli import exit_on_user_error, parse_args

    def entry() -> None:
        args = parse_args(argv)
        check_sft_arguments(args)
        preflight(args)
        run(args)

    exit_on_user_error(entry)


if __name__ == "__main__":
    main()
