"""DPO with a cached reference: the recipe, top to bottom.

python open_instruct/dpo_tune_cache.py [recipe.yaml] --model_name_or_path M --mixer_list data.jsonl 1.0 ...
accelerate launch open_instruct/dpo_tune_cache.py ...
python -m open_instruct.dpo_tune_cache ...
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package, not this folder's modules by bare name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from open_instruct.config import DPOArguments, validate
from open_instruct.data.prepare import prepare_preference_data, write_statistics
from open_instruct.data.sampler import pair_dataloader
from open_instruct.data.statistics import format_summary
from open_instruct.model.fast_path import choose_batch_layout, needs_padding_mask
from open_instruct.model.liger import resolve_logprob_impl
from open_instruct.model.modeling import load_model, load_tokenizer, reference_identity
from open_instruct.objectives.combination import combined_loss
from open_instruct.report.hub import push_final_model, resolve_repo_id
from open_instruct.report.tracking import MetricsLogger
from open_instruct.training import preemption, preference, recipe
from open_instruct.training.evaluation import PreferenceEvaluator
from open_instruct.training.memory import return_freed_memory
from open_instruct.training.perf import FlopCounter, peak_flops
from open_instruct.training.precision import in_run_precision
from open_instruct.training.preemption import parse_signals
from open_instruct.training.recipe import command_line
from open_instruct.training.reference_cache import dataset_fingerprint, model_fingerprint
from open_instruct.training.resume import resumed_signature, run_signature, start_or_resume


def run(args: DPOArguments) -> Path:
    """Train one DPO model; returns the folder holding the final checkpoint."""
    # 1. Engine, seed, output folder.
    return_freed_memory()  # CPU RSS: freed activations go back to the system (training/memory.py)
    loss_fn, length_normalized = combined_loss(args.loss_type, args.loss_weights), args.length_normalized
    accelerator, output_dir = recipe.start_run(args)
    # From here a stop signal finishes the current step or reference batch, saves, and exits with code 75.
    preemption.install(parse_signals(args.preemption_signals), accelerator.print)
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

    # 3. Model, optimizer, schedule, data loader, under the engine.
    model = load_model(args, tokenizer, log=accelerator.print)
    # The batch layout: packed where proven equal to padded on this device, unless --packing says otherwise.
    resumed = resumed_signature(args) if args.packing is None or args.group_by_length is None else None
    layout = choose_batch_layout(
        model, accelerator.device, args.packing, args.group_by_length, args.separate_forward, resumed
    )
    accelerator.print(layout.describe())
    args = dataclasses.replace(args, packing=layout.packing, group_by_length=layout.group_by_length)
    flop_counter = FlopCounter(model)  # before the engine partitions the weights
    impl = resolve_logprob_impl(args.use_liger_kernel, model, accelerator.device, accelerator.print)
    if args.use_weighting and impl == "liger":
        accelerator.print("--use_weighting: WPO weights need the logits; log-probs use the chunked path, not Liger")
    pad, batch_size = tokenizer.pad_token_id, args.per_device_train_batch_size
    train_loader = pair_dataloader(
        data.records, pad, batch_size, args.seed, args.packing, args.max_tokens_per_batch, args.group_by_length
    )
    run = recipe.prepare_training(args, accelerator, model, train_loader, output_dir, "pairs", "dpo")
    # The decoder runs in the run's precision on every pass (training, reference, evaluation); log-probs stay fp32.
    logprob_fn = in_run_precision(
        accelerator,
        preference.make_logprob_fn(
            args.packing,
            impl,
            args.logprob_chunk_size,
            args.use_weighting,
            padding_mask=needs_padding_mask(model, args.load_balancing_loss),
        ),
        report=accelerator.print,
    )

    # 4. Reference log-probs: one no-grad pass of the untouched policy, cached on disk by content hash
    #    (for the evaluation set too, before any training step changes the policy).
    data_hash = dataset_fingerprint(data.records)  # also identifies the run for exact resume
    sets = [(data.records, data_hash)] + ([(eval_records, dataset_fingerprint(eval_records))] if eval_records else [])
    ref_batch = args.reference_batch_size or 2 * batch_size
    loaders = [
        accelerator.prepare_data_loader(pair_dataloader(r, pad, ref_batch, args.seed, args.packing, shuffle=False))
        for r, _ in sets
    ]
    references: list = [None, None]
    if args.needs_reference:
        identity = preference.reference_identity(
            model_fingerprint(args.model_name_or_path, args.model_revision),
            reference_identity(args, run.model),
            accelerator.mixed_precision,
        )
        cache = args.reference_logprobs_cache_path
        references = preference.reference_logprobs_of(
            run.model, accelerator, logprob_fn, sets, loaders, cache, identity
        )

    # 5. Training, from the newest complete checkpoint when there is one (after the reference pass: it must see the
    # untouched weights).
    logger = MetricsLogger(accelerator, output_dir, use_wandb=args.with_tracking)
    signature = run_signature(args, len(data.records), data_hash, run.total_steps, accelerator.num_processes)
    faults = start_or_resume(args, accelerator, signature, logger)
    moe_weight = args.load_balancing_weight if args.load_balancing_loss else None
    step_settings = preference.PreferenceSettings(
        length_normalized, args.loss_settings(), args.separate_forward, moe_weight
    )
    evaluate = None
    if eval_records is not None:
        evaluate = PreferenceEvaluator(
            accelerator,
            run.model,
            loaders[1],
            len(eval_records),
            references[1],
            logprob_fn,
            loss_fn,
            step_settings,
            logger,
        )
    step_fn = preference.preference_step_fn(logprob_fn, loss_fn, references[0], step_settings)
    recipe.train(
        args, accelerator, run, step_fn, logger, evaluate, faults, flop_counter, peak_flops(accelerator.device)
    )

    # 6. Final checkpoint in Hugging Face format, curves, Hub.
    recipe.finish_run(accelerator, run.model, tokenizer, output_dir, merge_lora=args.merge_lora)
    if args.push_to_hub and accelerator.is_main_process:
        push_final_model(output_dir, args, hub_repo)
    accelerator.end_training()
    return output_dir


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: one clear line and exit code 2 for bad input."""
    command_line(argv, validate, run)


if __name__ == "__main__":
    main()
