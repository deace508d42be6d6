"""The recipe skeleton every stage shares: start (engine, seed, output folder), prepare the trainable pieces
(optimizer, schedule, data loader under the engine), train with the stage's step function, finish (final model,
curves, Hub). A stage supplies its data, its step function and its evaluator; nothing else differs."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from open_instruct.config import TrainArguments, compat, settings_of
from open_instruct.config.cli import command_line_flags, exit_on_user_error, parse_args
from open_instruct.config.path_checks import check_paths
from open_instruct.data.sampler import real_rows_fn
from open_instruct.engine import select_engine
from open_instruct.engine.base import effective_mixed_precision
from open_instruct.engine.deepspeed import DeepSpeedEngine
from open_instruct.engine.loss_scaling import check_fp16_device, check_fp16_weights, enable_fp16, loss_scaler_of
from open_instruct.errors import UserError
from open_instruct.files import write_text_atomic
from open_instruct.model.modeling import check_model_options, parse_additional_model_arguments
from open_instruct.plan.check import dry_run
from open_instruct.report.phases import phase, restart_clock
from open_instruct.report.plot import write_curves
from open_instruct.report.run_commands import next_commands
from open_instruct.report.samples import side_by_side
from open_instruct.report.summary import prepared_data_cache, summarize_run
from open_instruct.report.tracking import MetricsLogger
from open_instruct.training import output_lock, rank_watch
from open_instruct.training.checkpointing import latest_complete_checkpoint, save_final_model
from open_instruct.training.loop import FaultTolerance, LoopSettings, StepFn, train_loop
from open_instruct.training.optim import build_optimizer, check_optimizer_environment
from open_instruct.training.preemption import Preempted, exit_preempted, uninstall
from open_instruct.training.profiling import profiled_steps
from open_instruct.training.reshard import kept_accumulation
from open_instruct.training.resume import resumed_signature
from open_instruct.training.schedule import build_scheduler, optimizer_steps
from open_instruct.training.space_checks import report_room_at_start


def preflight(args: TrainArguments, pretraining: bool = False) -> None:
    """Cheap checks of every input path, before any process group, model or dataset is touched: each path is the
    kind of thing its flag needs and the output folder can be written (``config/path_checks.py``)."""

    cfg = settings_of(args)
    check_model_options(cfg.model)  # CUDA / packages for QLoRA and flash-attention, JSON of extra model arguments
    if effective_mixed_precision(cfg.model.mixed_precision, dict(os.environ)) == "fp16":
        options = parse_additional_model_arguments(cfg.model.additional_model_arguments)
        deepspeed = isinstance(select_engine(cfg.engine), DeepSpeedEngine)
        check_fp16_weights(options, deepspeed)
        check_fp16_device(deepspeed, cuda=torch.cuda.is_available())
    check_optimizer_environment(cfg.optim)  # CUDA / bitsandbytes for the 8-bit and paged optimizers
    compat.check_trackers(args)  # --report_to tensorboard needs its package
    check_paths(args, pretraining)


def command_line(argv: list[str] | None, check: Any, run: Any, stage: str = "dpo") -> None:
    """A recipe's command-line entry: parse, ``check(args)``, preflight, ``run(args)`` (with ``--dry_run``: the
    plan of the ``stage`` instead, see :mod:`open_instruct.plan`); bad input is one ``error:`` line and exit code 2;
    a run stopped by a preemption signal (its progress saved) exits with code 75."""

    def entry() -> None:
        args = parse_args(argv, stage)
        check(args)
        preflight(args)
        args = same_global_batch(args)  # a resume on another number of processes keeps the checkpoint's batch
        if args.dry_run:
            dry_run(settings_of(args), stage)
            return
        report = partial(summarize, args, stage, argv)
        try:
            with summarized(args, stage, report), no_empty_output_on_error(args.output_dir), run_guard():
                run(args)
        except Preempted:
            exit_preempted()
        finally:
            uninstall()  # the run's stop-signal handlers end with it, also for a caller in the same process

    exit_on_user_error(entry)


STAGE_MODULES = {
    "dpo": "open_instruct.dpo_tune_cache",
    "sft": "open_instruct.finetune",
    "pretrain": "open_instruct.pretrain",
}
EARLY_ENDS = {  # flag -> how the summary names a run it ended before training
    "cache_dataset_only": ("cached_data", "--cache_dataset_only: the prepared data cached"),
    "cache_logprobs_only": ("cached_logprobs", "--cache_logprobs_only: the reference log-probs cached"),
}


def early_end(args: TrainArguments, stage: str) -> str | None:
    """The :data:`EARLY_ENDS` flag that ends this run before training, if any (DPO's: the other stages train anyway)."""
    return next((flag for flag in EARLY_ENDS if stage == "dpo" and getattr(args, flag)), None)


def ending_of(args: TrainArguments, stage: str) -> dict[str, Any]:
    """How a run that returned ended: finished, or as its :func:`early_end` flag says."""
    flag = early_end(args, stage)
    if flag is None:
        return {"status": "finished", "step": None, "detail": ""}
    status, detail = EARLY_ENDS[flag]
    return {"status": status, "step": None, "detail": detail}


def stopped(stop: Preempted) -> dict[str, Any]:
    """The summary's ending of a run a stop signal ended, its progress saved."""
    return {"status": "preempted", "step": stop.step, "detail": str(stop)}


@contextlib.contextmanager
def summarized(args: TrainArguments, stage: str, report: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Time the block for the run summary (its wall time counts from here), then ``report(ending)``: after a run
    that returned (finished, or ended early) or one a stop signal ended with its progress saved. ``Preempted`` goes
    on whatever the report does: its exit code 75 is what schedulers requeue on. The command line, the Python API
    and pretraining's entry all sum up a run through here."""
    restart_clock()
    try:
        yield
    except Preempted as stop:
        try:
            report(stopped(stop))
        finally:
            raise stop
    report(ending_of(args, stage))


def summarize_call(args: TrainArguments, stage: str, ending: dict[str, Any], extra_flags: Sequence[str] = ()) -> None:
    """:func:`summarize` for a run the Python API started: its commands are those of the command line that runs the
    same arguments (``extra_flags`` appended), none where the arguments have no command-line spelling."""
    if os.environ.get("RANK", "0") != "0":
        return
    flags = command_line_flags(args, stage)
    summarize(args, stage, None if flags is None else [*flags, *extra_flags], ending, api=True)


def summarize(
    args: TrainArguments, stage: str, argv: list[str] | None, ending: dict[str, Any], api: bool = False
) -> None:
    """Print the run's summary and write ``<output_dir>/summary.json``, on the main process (``report/summary.py``);
    a summary that cannot be written is a warning, never a failed run. ``argv``: the entry's (None: the command
    line's; with ``api``: there is none)."""
    if os.environ.get("RANK", "0") != "0":
        return
    output_dir = Path(args.output_dir)
    early = early_end(args, stage)
    uses_references = stage == "dpo" and not args.cache_dataset_only and args.needs_reference  # simpo, orpo: none
    references = args.reference_logprobs_cache_path if uses_references else None
    context = {
        "stage": stage,
        "cwd": os.getcwd(),
        "commands": next_commands(
            STAGE_MODULES[stage],
            argv,
            output_dir,
            None if early is None else f"--{early}",
            plannable=stage != "pretrain",
            known=not api or argv is not None,
        ),
        "caches": {"prepared data": prepared_data_cache(output_dir), "reference log-probs": references},
    }
    try:
        print(summarize_run(output_dir, ending, context, summary_sections(output_dir)), flush=True)
    except OSError as err:
        print(f"warning: no run summary in {output_dir}: {err}", flush=True)


def summary_sections(output_dir: Path) -> list[tuple[str, str]]:
    """Extra ``(title, text)`` sections for the run summary, printed after the standard ones and kept in
    ``summary.json`` under ``sections``: the one place a feature adds its own."""
    samples = side_by_side(output_dir)  # each sample prompt's answer at the start and at the end
    return [samples] if samples else []


def same_global_batch(args: TrainArguments) -> TrainArguments:
    """``args`` with the accumulation steps a resume on another world size needs (``training/reshard.py``)."""
    saved = resumed_signature(settings_of(args).checkpoint)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = args.gradient_accumulation_steps
    steps, note = kept_accumulation(saved, args.per_device_train_batch_size, accumulation, world_size, args.output_dir)
    if note is None:
        return args
    if os.environ.get("RANK", "0") == "0":
        print(note, flush=True)
    return replace(args, gradient_accumulation_steps=steps)


@contextlib.contextmanager
def no_empty_output_on_error(output_dir: str) -> Iterator[None]:
    """Bad input found once the run started (a data row, a model file) leaves no output folder behind that this run
    created and left empty: the folder appears with the run's first result, as far as the user can tell."""
    path = Path(output_dir).expanduser()
    existed = path.exists()
    try:
        yield
    except UserError:
        if not existed:
            try:
                path.rmdir()  # only when empty: another rank may have written into it, or just removed it
            except OSError:
                pass
        raise


@contextlib.contextmanager
def run_guard() -> Iterator[None]:
    """Around a run: a rank's error reaches the others (``rank_watch``); the output folder's lock is let go."""
    try:
        with rank_watch.reporting():
            yield
    finally:
        output_lock.release()


def start_run(args: TrainArguments) -> tuple[Any, Path]:
    """(accelerator built by the engine the flags select, output folder); the seed is set."""
    with phase("start"):  # the run summary's wall time by phase
        # accelerate is slow to import: --help, validation and the planner never need it
        from accelerate.utils import set_seed

        engine = select_engine(settings_of(args).engine)
        output_dir = Path(args.output_dir)
        trackers = compat.trackers(args.report_to) if args.with_tracking else []
        accelerator = engine.build_accelerator(
            args.gradient_accumulation_steps,
            args.mixed_precision,
            trackers,
            args.timeout,
            project_dir=str(output_dir),
            sync_each_batch=args.sync_each_batch,
        )
        enable_fp16(accelerator)  # fp16 autocast and loss scaling where the engine does not do them itself
        accelerator.print(engine.describe())
        set_seed(args.seed)
        output_dir.mkdir(parents=True, exist_ok=True)
        output_lock.hold(output_dir, accelerator)  # one run per output folder: refused here, before any expensive work
        rank_watch.start(args.rank_failure_timeout, accelerator.print)  # a dead rank stops every rank, named
    return accelerator, output_dir


def tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run config for trackers: lists, mappings and None as text (tensorboard's hparams take only scalars)."""
    return {k: v if isinstance(v, bool | int | float | str) else json.dumps(v, default=str) for k, v in config.items()}


@dataclass
class Trainable:
    """The prepared pieces of a run and its step counts."""

    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    steps_per_epoch: int
    total_steps: int
    run_config: dict[str, Any]
    real_rows: Any = None  # (epoch, micro-batch position) -> its real rows: open_instruct.data.sampler.real_rows_fn


def prepare_training(
    args: TrainArguments, accelerator: Any, model: Any, train_loader: Any, output_dir: Path, unit: str, stage: str
) -> Trainable:
    """AdamW on the trainable parameters (LoRA: the adapters), the schedule, and everything under the engine;
    writes ``run_config.json``. ``unit`` names an example in the log line (pairs, conversations)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(settings_of(args).optim, model, trainable)
    steps_per_epoch, total_steps = optimizer_steps(
        len(train_loader),
        accelerator.num_processes,
        args.gradient_accumulation_steps,
        args.num_epochs,
        args.max_train_steps,
    )
    scheduler = build_scheduler(settings_of(args).optim, optimizer, total_steps, accelerator.num_processes)
    real_rows = real_rows_fn(train_loader, accelerator.num_processes, accelerator.process_index)  # before sharding
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    run_config = {
        **args.to_dict(),
        **({"stage": stage} if stage != "dpo" else {}),
        "global_batch_size": global_batch,
        "total_optimizer_steps": total_steps,
        "world_size": accelerator.num_processes,
    }
    accelerator.print(
        f"global batch {global_batch} {unit} ({args.per_device_train_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes); "
        f"{total_steps} optimizer steps"
    )
    if accelerator.is_main_process:
        write_text_atomic(output_dir / "run_config.json", json.dumps(run_config, indent=2, default=str))
    return Trainable(model, optimizer, scheduler, train_loader, steps_per_epoch, total_steps, run_config, real_rows)


def train(
    args: TrainArguments,
    accelerator: Any,
    run: Trainable,
    step_fn: StepFn,
    logger: MetricsLogger,
    evaluate: Any = None,
    faults: FaultTolerance | None = None,
    flops_fn: Any = None,
    peak_flops: float | None = None,
) -> dict[str, Any]:
    """Start the trackers, then the loop with the stage's ``step_fn``; returns the last logged metrics."""
    if accelerator.log_with:
        wandb = {"name": args.run_name or args.exp_name, "entity": args.wandb_entity, "group": args.wandb_group_name}
        accelerator.init_trackers(
            args.wandb_project, config=tracker_config(run.run_config), init_kwargs={"wandb": wandb}
        )
    settings = LoopSettings(
        num_epochs=math.ceil(run.total_steps / run.steps_per_epoch),
        max_train_steps=run.total_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps,
        eval_steps=args.eval_steps,
        flops_fn=flops_fn,
        peak_flops=peak_flops,
        real_rows=run.real_rows,
        sync_each_batch=args.sync_each_batch,
        log_grad_norm=args.log_grad_norm,
        loss_scaler=loss_scaler_of(accelerator),
    )
    layout, output = select_engine(settings_of(args).engine).state_layout(1), Path(args.output_dir)
    report_room_at_start(accelerator, faults, layout, run.model, output, latest_complete_checkpoint(output)[0])
    profiler = profiled_steps(accelerator, Path(args.output_dir)) if args.profiling else contextlib.nullcontext()
    with phase("training"), profiler as step_hook:  # the run summary's wall time by phase
        settings.step_hook = rank_watch.with_injected_fault(step_hook, accelerator.process_index)  # tests only
        return train_loop(
            accelerator,
            run.model,
            run.optimizer,
            run.scheduler,
            run.train_loader,
            step_fn,
            settings,
            logger,
            evaluate=evaluate,
            faults=faults,
        )


def finish_run(accelerator: Any, model: Any, tokenizer: Any, output_dir: Path, merge_lora: bool = False) -> Path:
    """The final model in Hugging Face format, and ``curves.png`` beside ``metrics.jsonl`` (the run summary's "save"
    phase)."""
    with phase("save"):
        save_final_model(accelerator, model, tokenizer, output_dir, merge_lora=merge_lora)
        accelerator.print(f"saved the final model to {output_dir}")
        if accelerator.is_main_process:
            curves = write_curves(output_dir)
            if curves is not None:
                accelerator.print(f"training curves: {curves}")
    return output_dir
