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
from typing import Any

if __package__ in (None, ""):  # run as a file: import the package, not this folder's modules by bare name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from open_instruct.cli import exit_on_user_error, parse_args
from open_instruct.config import DPOArguments, UserError, validate


def preflight(args: DPOArguments) -> None:
    """Cheap checks of every input path, before any process group, model or dataset is touched."""
    from open_instruct.data.sources import is_data_file
    from open_instruct.modeling import check_model_options, check_model_path

    check_model_options(args)  # CUDA / packages for QLoRA and flash-attention, JSON of extra model arguments
    check_model_path(args.model_name_or_path, "model")
    check_model_path(args.tokenizer_name_or_path, "tokenizer")
    for name in args.mixer_list[0::2] + args.eval_mixer_list[0::2]:
        path = Path(name).expanduser()
        if (is_data_file(path) or name.startswith((".", "/", "~"))) and not path.exists():
            raise UserError(f"dataset file not found: {name}")


def build_accelerator(args: DPOArguments):
    """accelerate's Accelerator for this run (DeepSpeed ZeRO from the flags, a config file or the launcher)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    from open_instruct.distributed import accelerator_options

    options = accelerator_options(args)
    group = {"backend": options["backend"]} if options["backend"] else {}
    return Accelerator(
        deepspeed_plugin=options["deepspeed_plugin"],
        cpu=options["cpu"],
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with="wandb" if args.with_tracking else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.timeout), **group)],
    )


def optimizer_steps(
    num_pairs: int, args: DPOArguments, world_size: int, num_batches: int | None = None
) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for this many pairs (or micro-batches) on this many ranks."""
    if num_batches is None:
        num_batches = math.ceil(num_pairs / args.per_device_train_batch_size)
    batches_per_rank = math.ceil(num_batches / world_size)
    per_epoch = max(1, math.ceil(batches_per_rank / args.gradient_accumulation_steps))
    return per_epoch, args.max_train_steps or per_epoch * args.num_epochs


def build_scheduler(args: DPOArguments, optimizer: Any, total_steps: int, num_processes: int) -> Any:
    """The learning-rate schedule: warmup (``--warmup_steps``, else ``--warmup_ratio``), then ``--lr_scheduler_type``."""
    from transformers import get_scheduler

    warmup_steps = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * total_steps)
    schedule = "constant_with_warmup" if args.lr_scheduler_type == "constant" else args.lr_scheduler_type
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    return get_scheduler(
        schedule,
        optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
    )


def run(args: DPOArguments) -> Path:
    """Train one DPO model; returns the folder holding the final checkpoint."""
    from accelerate.utils import set_seed

    from open_instruct import eval_loop, reference_cache
    from open_instruct.checkpointing import save_final_model
    from open_instruct.data.prepare import prepare_preference_data, write_statistics
    from open_instruct.data.sampler import pair_dataloader
    from open_instruct.data.statistics import format_summary
    from open_instruct.hub import push_final_model, resolve_repo_id
    from open_instruct.logprobs import sequence_logprobs
    from open_instruct.logprobs_liger import resolve_logprob_impl
    from open_instruct.lora import adapters_disabled
    from open_instruct.losses import LossSettings, get_loss
    from open_instruct.modeling import load_model, load_tokenizer, reference_identity
    from open_instruct.packing import packed_sequence_logprobs, prepare_model_for_packing
    from open_instruct.perf import FlopCounter, peak_flops
    from open_instruct.resume import run_signature, start_or_resume
    from open_instruct.tracking import MetricsLogger
    from open_instruct.trainer import LoopSettings, train_loop

    # 1. Config, seed, accelerator.
    loss_fn, length_normalized = get_loss(args.loss_type)
    accelerator = build_accelerator(args)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    hub_repo = resolve_repo_id(args) if args.push_to_hub and accelerator.is_main_process else None

    # 2. Tokenizer and data: every row is checked before the model is loaded.
    tokenizer = load_tokenizer(args)
    with accelerator.main_process_first():  # the main process prepares and caches; the others load its cache
        data = prepare_preference_data(args, tokenizer)
    accelerator.print(format_summary(data.statistics))
    if accelerator.is_main_process:
        write_statistics(data.statistics, output_dir)
    if args.cache_dataset_only:
        accelerator.print(f"--cache_dataset_only: prepared data cached at {data.statistics['cache']['path']}")
        return output_dir
    eval_records = data.eval_records or None
    if eval_records is not None:
        accelerator.print(f"evaluation: {len(eval_records)} pairs, {len(data.records)} for training")

    # 3. Model, optimizer, schedule, dataloaders, under accelerate (DeepSpeed ZeRO when configured).
    model = load_model(args, tokenizer, log=accelerator.print)
    if args.packing:
        accelerator.print(f"packing: attention {prepare_model_for_packing(model)}")
    flop_counter = FlopCounter(model)  # before ZeRO-3 partitions the weights
    logprob_impl = resolve_logprob_impl(args.use_liger_kernel, model, accelerator.device, accelerator.print)
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    train_loader = pair_dataloader(
        data.records,
        tokenizer.pad_token_id,
        args.per_device_train_batch_size,
        args.seed,
        args.packing,
        args.max_tokens_per_batch,
        args.group_by_length,
    )
    steps_per_epoch, total_steps = optimizer_steps(
        len(data.records), args, accelerator.num_processes, len(train_loader)
    )
    scheduler = build_scheduler(args, optimizer, total_steps, accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    run_config = {
        **args.to_dict(),
        "global_batch_size": global_batch,
        "total_optimizer_steps": total_steps,
        "world_size": accelerator.num_processes,
    }
    accelerator.print(
        f"global batch {global_batch} pairs ({args.per_device_train_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes); "
        f"{total_steps} optimizer steps"
    )
    if accelerator.is_main_process:
        (output_dir / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))

    def logprob_fn(m, batch):
        if args.packing:
            return packed_sequence_logprobs(m, batch, impl=logprob_impl, chunk_size=args.logprob_chunk_size)
        return sequence_logprobs(
            m,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            impl=logprob_impl,
            chunk_size=args.logprob_chunk_size,
        )

    # 4. Reference log-probs: one no-grad pass of the untouched policy, cached on disk by content hash
    #    (for the evaluation set too, before any training step changes the policy).
    data_hash = reference_cache.dataset_fingerprint(data.records)  # also identifies the run for exact resume

    def ordered_loader(records):
        return accelerator.prepare_data_loader(
            pair_dataloader(
                records,
                tokenizer.pad_token_id,
                args.reference_batch_size or 2 * args.per_device_train_batch_size,
                args.seed,
                packing=args.packing,
                shuffle=False,
            )
        )

    def reference_for(records):
        if not args.needs_reference:
            return None
        key = reference_cache.fingerprint(
            {
                "model": reference_cache.model_fingerprint(args.model_name_or_path, args.model_revision),
                "model_options": reference_identity(args, model),
                "data": data_hash if records is data.records else reference_cache.dataset_fingerprint(records),
                "mixed_precision": accelerator.mixed_precision,
                "logprobs": "v1",
            }
        )
        with adapters_disabled(model):  # LoRA: the reference is the base model
            return reference_cache.get_reference(
                model,
                ordered_loader(records),
                accelerator,
                logprob_fn,
                len(records),
                args.reference_logprobs_cache_path,
                key,
            )

    reference = reference_for(data.records)
    eval_reference = reference_for(eval_records) if eval_records is not None else None

    # 5. Training, from the newest complete checkpoint when there is one (after the reference pass: it must see the
    # untouched weights).
    logger = MetricsLogger(accelerator, output_dir, use_wandb=args.with_tracking)
    signature = run_signature(args, len(data.records), data_hash, total_steps, accelerator.num_processes)
    faults = start_or_resume(args, accelerator, signature, logger)
    if args.with_tracking:
        accelerator.init_trackers(
            args.wandb_project,
            config=run_config,
            init_kwargs={"wandb": {"name": args.exp_name, "entity": args.wandb_entity}},
        )
    settings = LoopSettings(
        num_epochs=num_epochs,
        max_train_steps=total_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps,
        length_normalized=length_normalized,
        loss_settings=LossSettings(args.beta, args.label_smoothing, args.gamma_beta_ratio, args.nll_loss_weight),
        separate_forward=args.separate_forward,
        eval_steps=args.eval_steps,
        load_balancing_weight=args.load_balancing_weight if args.load_balancing_loss else None,
        flops_fn=flop_counter,
        peak_flops=peak_flops(accelerator.device),
    )
    evaluate = None
    if eval_records is not None:
        evaluate = eval_loop.PreferenceEvaluator(
            accelerator,
            model,
            ordered_loader(eval_records),
            len(eval_records),
            eval_reference,
            logprob_fn,
            loss_fn,
            settings,
            logger,
        )
    train_loop(
        accelerator,
        model,
        optimizer,
        scheduler,
        train_loader,
        reference,
        logprob_fn,
        loss_fn,
        settings,
        logger,
        evaluate=evaluate,
        faults=faults,
    )

    # 6. Final checkpoint in Hugging Face format.
    save_final_model(accelerator, model, tokenizer, output_dir, merge_lora=args.merge_lora)
    accelerator.print(f"saved the final model to {output_dir}")
    if args.push_to_hub and accelerator.is_main_process:
        push_final_model(output_dir, args, hub_repo)
    accelerator.end_training()
    return output_dir


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: one clear line and exit code 2 for bad input."""

    def entry() -> None:
        args = parse_args(argv)
        validate(args)
        preflight(args)
        run(args)

    exit_on_user_error(entry)


if __name__ == "__main__":
    main()
