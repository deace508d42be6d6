"""DPO with a cached reference: the recipe, top to bottom.

    python open_instruct/dpo_tune_cache.py [recipe.yaml] --model_name_or_path M --mixer_list data.jsonl 1.0 ...
    accelerate launch open_instruct/dpo_tune_cache.py ...
    python -m open_instruct.dpo_tune_cache ...
"""

from __future__ import annotations

import json
import math
import sys
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package, not this folder's modules by bare name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from open_instruct.cli import parse_args
from open_instruct.config import DPOArguments, UserError, validate


def build_accelerator(args: DPOArguments):
    """accelerate's Accelerator for this run (DeepSpeed when launched with it)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with="wandb" if args.with_tracking else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.timeout))],
    )


def optimizer_steps(num_pairs: int, args: DPOArguments, world_size: int,
                    num_batches: int | None = None) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for this many pairs (or micro-batches) on this many ranks."""
    if num_batches is None:
        num_batches = math.ceil(num_pairs / args.per_device_train_batch_size)
    batches_per_rank = math.ceil(num_batches / world_size)
    per_epoch = max(1, math.ceil(batches_per_rank / args.gradient_accumulation_steps))
    return per_epoch, args.max_train_steps or per_epoch * args.num_epochs


def run(args: DPOArguments) -> Path:
    """Train one DPO model; returns the folder holding the final checkpoint."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from open_instruct import reference_cache
    from open_instruct.checkpointing import save_final_model
    from open_instruct.data.prepare import prepare_preference_data, write_statistics
    from open_instruct.data.sampler import pair_dataloader
    from open_instruct.logprobs import sequence_logprobs
    from open_instruct.losses import LossSettings, get_loss
    from open_instruct.modeling import load_model, load_tokenizer
    from open_instruct.packing import packed_sequence_logprobs, prepare_model_for_packing
    from open_instruct.perf import FlopCounter, peak_flops
    from open_instruct.tracking import MetricsLogger
    from open_instruct.trainer import LoopSettings, train_loop

    # 1. Config, seed, accelerator.
    loss_fn, length_normalized = get_loss(args.loss_type)
    accelerator = build_accelerator(args)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # 2. Tokenizer and data: every row is checked before the model is loaded.
    tokenizer = load_tokenizer(args)
    data = prepare_preference_data(args, tokenizer)
    accelerator.print(f"data: {data.statistics['kept']} pairs kept, dropped {data.statistics['dropped'] or 'none'}, "
                      f"{data.statistics['truncated']} truncated")
    if accelerator.is_main_process:
        write_statistics(data.statistics, output_dir)

    # 3. Model, optimizer, schedule, dataloaders, under accelerate (DeepSpeed ZeRO when configured).
    model = load_model(args, tokenizer)
    if args.packing:
        accelerator.print(f"packing: attention {prepare_model_for_packing(model)}")
    flop_counter = FlopCounter(model)  # before ZeRO-3 partitions the weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    train_loader = pair_dataloader(data.records, tokenizer.pad_token_id, args.per_device_train_batch_size, args.seed,
                                   args.packing, args.max_tokens_per_batch, args.group_by_length)
    steps_per_epoch, total_steps = optimizer_steps(len(data.records), args, accelerator.num_processes,
                                                   len(train_loader))
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    schedule = "constant_with_warmup" if args.lr_scheduler_type == "constant" else args.lr_scheduler_type
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps * accelerator.num_processes,
                              num_training_steps=total_steps * accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    run_config = {**args.to_dict(), "global_batch_size": global_batch, "total_optimizer_steps": total_steps,
                  "world_size": accelerator.num_processes}
    accelerator.print(f"global batch {global_batch} pairs ({args.per_device_train_batch_size} per device x "
                      f"{args.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes); "
                      f"{total_steps} optimizer steps")
    if accelerator.is_main_process:
        (output_dir / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))

    def logprob_fn(m, batch):
        if args.packing:
            return packed_sequence_logprobs(m, batch, chunk_size=args.logprob_chunk_size)
        return sequence_logprobs(m, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                 chunk_size=args.logprob_chunk_size)

    # 4. Reference log-probs: one no-grad pass of the untouched policy, cached on disk by content hash.
    reference = None
    if args.needs_reference:
        ref_loader = accelerator.prepare_data_loader(pair_dataloader(
            data.records, tokenizer.pad_token_id, args.reference_batch_size or 2 * args.per_device_train_batch_size,
            args.seed, packing=args.packing, shuffle=False))
        key = reference_cache.fingerprint({
            "model": reference_cache.model_fingerprint(args.model_name_or_path, args.model_revision),
            "data": reference_cache.dataset_fingerprint(data.records),
            "mixed_precision": accelerator.mixed_precision, "logprobs": "v1",
        })
        reference = reference_cache.get_reference(model, ref_loader, accelerator, logprob_fn, len(data.records),
                                                  args.reference_logprobs_cache_path, key)

    # 5. Training.
    if args.with_tracking:
        accelerator.init_trackers(args.wandb_project, config=run_config,
                                  init_kwargs={"wandb": {"name": args.exp_name, "entity": args.wandb_entity}})
    settings = LoopSettings(
        num_epochs=num_epochs, max_train_steps=total_steps, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm, logging_steps=args.logging_steps, length_normalized=length_normalized,
        loss_settings=LossSettings(args.beta, args.label_smoothing, args.gamma_beta_ratio),
        flops_fn=flop_counter, peak_flops=peak_flops(accelerator.device),
    )
    logger = MetricsLogger(accelerator, output_dir, use_wandb=args.with_tracking)
    train_loop(accelerator, model, optimizer, scheduler, train_loader, reference, logprob_fn, loss_fn, settings, logger)

    # 6. Final checkpoint in Hugging Face format.
    save_final_model(accelerator, model, tokenizer, output_dir)
    accelerator.print(f"saved the final model to {output_dir}")
    accelerator.end_training()
    return output_dir


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: one clear line and exit code 2 for bad input."""
    try:
        args = parse_args(argv)
        validate(args)
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
