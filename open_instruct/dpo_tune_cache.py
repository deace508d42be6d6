"""DPO with a cached reference: the recipe, top to bottom.

python open_instruct/dpo_tune_cache.py [recipe.yaml] --model_name_or_path M --mixer_list data.jsonl 1.0 ...
accelerate launch open_instruct/dpo_tune_cache.py ...
python -m open_instruct.dpo_tune_cache ...
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import the package, not this folder's modules by bare name
    sys.path[0] = str(Path(__file__).resolve().parents[1])
if __name__ == "__main__":  # before torch is imported: glibc reads its tunables when a process starts
    from open_instruct.training.host_memory import reexec_with_lean_malloc

    reexec_with_lean_malloc()

from open_instruct.config import TrainArguments, settings_of, validate
from open_instruct.data.prepare import prepare_preference_data, save_mixed_pairs, write_statistics
from open_instruct.data.sampler import pair_dataloader
from open_instruct.data.statistics import format_summary
from open_instruct.model.batch_layout import choose_batch_layout, computes_in_half, with_prompt_sharing
from open_instruct.model.modeling import load_model, load_tokenizer
from open_instruct.objectives.combination import combined_loss
from open_instruct.objectives.losses import LossFn, whole_batch_loss
from open_instruct.report.hub import push_final_model
from open_instruct.report.phases import phase
from open_instruct.report.tracking import MetricsLogger
from open_instruct.settings import RunSettings
from open_instruct.training import hub_checkpoints, preemption, preference, recipe
from open_instruct.training.evaluation import PreferenceEvaluator
from open_instruct.training.forward_passes import forward_splitter
from open_instruct.training.host_memory import return_freed_memory
from open_instruct.training.perf import FlopCounter, peak_flops
from open_instruct.training.preemption import parse_signals
from open_instruct.training.recipe import command_line
from open_instruct.training.reference_cache import dataset_fingerprint
from open_instruct.training.resume import resumed_signature, run_signature, start_or_resume
from open_instruct.training.samples import AnswerSampler, answer_sampler


def settle_batch_layout(args: TrainArguments, cfg: RunSettings, model: Any, accelerator: Any) -> TrainArguments:
    """The flags with ``--packing`` / ``--group_by_length`` decided: unset, the fastest layout proven equal to padded
    batches on this device (a resumed run keeps its own); the run log says which and why."""
    packing, grouping = args.packing, args.group_by_length
    resumed = resumed_signature(cfg.checkpoint) if packing is None or grouping is None else None
    half = computes_in_half(model, accelerator.mixed_precision)  # the CUDA packed kernel's precisions
    layout = choose_batch_layout(model, accelerator.device, packing, grouping, args.separate_forward, resumed, half)
    layout = with_prompt_sharing(layout, accelerator.device, args.share_prompt, args.load_balancing_loss)
    accelerator.print(layout.describe())
    return dataclasses.replace(
        args, packing=layout.packing, group_by_length=layout.group_by_length, share_prompt=layout.share_prompt
    )


def preference_objective(args: TrainArguments) -> tuple[LossFn, preference.PreferenceSettings]:
    """The combined preference loss of ``--loss_type`` / ``--loss_weights``, and what each step needs to compute it."""
    moe_weight = args.load_balancing_weight if args.load_balancing_loss else None
    settings = preference.PreferenceSettings(
        args.length_normalized, args.loss_settings(), args.separate_forward, moe_weight
    )
    return combined_loss(args.loss_type, args.loss_weights), settings


def start_sampling(
    args: TrainArguments, accelerator: Any, model: Any, tokenizer: Any, output_dir: Path, data: Any, faults: Any
) -> AnswerSampler:
    """The sample prompts answered greedily with the chat template by the untouched model (a resumed run keeps its
    first attempt's answers); the sampler answers them again after each evaluation and at the end."""
    how = (args.sample_prompts, args.num_sample_prompts, args.sample_max_new_tokens, args.add_bos)
    samples = answer_sampler(accelerator, model, tokenizer, output_dir, how, (data.eval_records, data.records))
    samples.begin(faults.resume_state)
    return samples


def run(args: TrainArguments) -> Path:
    """Train one DPO model; returns the folder holding the final checkpoint."""
    cfg = settings_of(args)  # each layer below gets the settings of its concern
    # 1. Engine, seed, output folder.
    return_freed_memory()  # CPU RSS: freed activations go back to the system (training/host_memory.py)
    accelerator, output_dir = recipe.start_run(args)
    # From here a stop signal finishes the current step or reference batch, saves, and exits with code 75.
    preemption.install(parse_signals(args.preemption_signals), accelerator.print)
    hub_repo = hub_checkpoints.resolve_and_fetch(cfg.hub, cfg.checkpoint, accelerator)  # before any work

    # 2. Tokenizer and data: every row is checked before the model is loaded.
    tokenizer = load_tokenizer(cfg.model)
    with phase("data"), accelerator.main_process_first():  # the main process prepares and caches; others load it
        data = prepare_preference_data(cfg.data, tokenizer)
    accelerator.print(format_summary(data.statistics))
    if accelerator.is_main_process:
        write_statistics(data.statistics, output_dir)
        if args.dataset_mix_dir:
            accelerator.print(f"--dataset_mix_dir: {save_mixed_pairs(data.records, args.dataset_mix_dir)}")
    if args.cache_dataset_only:
        accelerator.print(f"--cache_dataset_only: prepared data cached at {data.statistics['cache']['path']}")
        return output_dir
    record_sets = [(data.records, dataset_fingerprint(data.records))]  # the hash also identifies the run for resume
    if data.eval_records:
        record_sets.append((data.eval_records, dataset_fingerprint(data.eval_records)))
        accelerator.print(f"evaluation: {len(data.eval_records)} pairs, {len(data.records)} for training")

    # 3. Model, batch layout (packed where proven equal to padded on this device, unless --packing says otherwise),
    #    log-prob function, optimizer, schedule, data loader, under the engine.
    model = load_model(cfg.model, tokenizer, log=accelerator.print)
    args = settle_batch_layout(args, cfg, model, accelerator)
    cfg = settings_of(args)
    flop_counter = FlopCounter(model)  # before the engine partitions the weights
    whole_batch = whole_batch_loss(args.loss_type, args.load_balancing_loss)
    split = forward_splitter(args.max_tokens_per_forward, model, accelerator, whole_batch)  # activation memory
    logprob_fn = preference.run_logprob_fn(cfg.batch, model, accelerator)
    pad, batch = tokenizer.pad_token_id, cfg.batch
    train_loader = pair_dataloader(
        data.records, pad, batch.per_device_train_batch_size, batch.order_seed, batch.packing,
        batch.max_tokens_per_batch, batch.group_by_length, share_prompt=batch.share_prompt,
    )  # fmt: skip
    run = recipe.prepare_training(args, accelerator, model, train_loader, output_dir, "pairs", "dpo")

    # 4. Reference log-probs: one no-grad pass of the untouched policy, cached on disk by content hash.
    with phase("reference pass"):
        references, ref_loaders = preference.reference_pass(
            cfg.reference, cfg.batch, cfg.model, accelerator, run.model, logprob_fn, pad, record_sets
        )
    if args.cache_logprobs_only:
        accelerator.print(
            f"--cache_logprobs_only: reference log-probs cached under {args.reference_logprobs_cache_path}"
        )
        accelerator.end_training()
        return output_dir

    # 5. Training, from the newest complete checkpoint if any (after the reference pass: it needs untouched weights).
    logger = MetricsLogger(accelerator, output_dir, use_wandb=args.with_tracking)
    signature = run_signature(
        cfg.batch, cfg.optim, len(data.records), record_sets[0][1], run.total_steps, accelerator.num_processes
    )
    faults = start_or_resume(cfg.checkpoint, accelerator, signature, logger)
    samples = start_sampling(args, accelerator, run.model, tokenizer, output_dir, data, faults)  # answers, before
    loss_fn, settings = preference_objective(args)
    evaluate = samples.around(PreferenceEvaluator(  # then sample answers after each evaluation
        accelerator, run.model, ref_loaders[1], len(data.eval_records), references[1], logprob_fn, loss_fn,
        settings, logger,
    ) if data.eval_records else None)  # fmt: skip
    step_fn = preference.preference_step_fn(logprob_fn, loss_fn, references[0], settings, split)
    with hub_checkpoints.pushing(faults, cfg.hub, cfg.checkpoint, hub_repo):  # waits for the uploads at the end
        recipe.train(
            args, accelerator, run, step_fn, logger, evaluate, faults, flop_counter, peak_flops(accelerator.device)
        )
    samples.finish(run.total_steps)  # the final answers, beside the first ones in the run summary

    # 6. Final checkpoint in Hugging Face format, curves, Hub.
    recipe.finish_run(accelerator, run.model, tokenizer, output_dir, merge_lora=args.merge_lora)
    if args.push_to_hub and accelerator.is_main_process:
        push_final_model(output_dir, cfg.hub, hub_repo)
    accelerator.end_training()
    return output_dir


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: one clear line and exit code 2 for bad input."""
    command_line(argv, validate, run)


if __name__ == "__main__":
    main()
