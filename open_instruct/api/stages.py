"""The three stages from Python: ``run_training`` -> ``run_sft`` -> ``run_dpo``, each returning its final checkpoint.

    from open_instruct import run_dpo, DPOConfig, TrainingConfig, PreferenceDatasetConfig
    path = run_dpo("sft_model/", TrainingConfig(output_dir="out", batch_size=32, micro_batch_size=8,
                                                gradient_accumulation_steps=4, learning_rate=5e-7),
                   DPOConfig(beta=0.1), PreferenceDatasetConfig("Anthropic/hh-rlhf"))

Every setting lands in one ``TrainArguments`` (:mod:`open_instruct.api.configs`) that goes through the same validation
and the same entry's ``run`` as the command line (``pretrain``, ``finetune``, ``dpo_tune_cache``): there is no second
training loop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from open_instruct import dpo_tune_cache, finetune, pretrain
from open_instruct.api.configs import (
    DPOConfig,
    PreferenceDatasetConfig,
    SFTDatasetConfig,
    TextDatasetConfig,
    TrainingConfig,
    arguments_from,
    dataset_arguments,
    preference_arguments,
    training_arguments,
    writes_pt,
)
from open_instruct.config import TrainArguments, settings_of, validate
from open_instruct.engine.fsdp2 import restore_process_state
from open_instruct.errors import UserError
from open_instruct.model.scratch import transformers_config, write_config_folder
from open_instruct.model.state_dict import (
    carried_tokenizer_name,
    is_state_dict_file,
    state_dict_to_folder,
    write_pt_checkpoint,
)
from open_instruct.objectives.losses import hyperparameter_names
from open_instruct.plan import check as plan_check
from open_instruct.training import preemption
from open_instruct.training.recipe import preflight, run_guard, summarize_call, summarized


def plan_run(args: TrainArguments, stage: str) -> Any:
    """The dry run of a stage from Python: checks, printed plan, the plan returned; nothing loaded or written."""
    if is_state_dict_file(args.model_name_or_path or ""):
        raise UserError("dry_run: a .pt checkpoint holds weights; plan from its model folder or hub id instead")
    preflight(args)
    return plan_check.dry_run(settings_of(args), stage)


def dpo_arguments(
    model: str,
    train: TrainingConfig,
    dpo: DPOConfig,
    dataset: PreferenceDatasetConfig,
    tokenizer_name: str | None = None,
) -> TrainArguments:
    """One validated TrainArguments from the API's configs."""
    values = training_arguments(train)
    values.update(preference_arguments(dataset, train))
    if dpo.max_length < 1 or dpo.max_prompt_length < 1:
        raise UserError(
            f"max_length and max_prompt_length must be >= 1, got {dpo.max_length}, {dpo.max_prompt_length}"
        )
    values.update({name: getattr(dpo, name) for name in hyperparameter_names()})
    values.update(
        model_name_or_path=model,
        loss_type=dpo.loss_type,
        loss_weights=dpo.loss_weights,
        reference_free=dpo.reference_free,
        max_seq_length=dpo.max_prompt_length + dpo.max_length,
        max_response_length=dpo.max_length,
    )
    if dpo.reference_cache_dir:
        values["reference_logprobs_cache_path"] = dpo.reference_cache_dir
    if tokenizer_name:
        values["tokenizer_name_or_path"] = tokenizer_name
    args = arguments_from(values)
    validate(args)
    return args


def sft_arguments(
    checkpoint: str, train: TrainingConfig, dataset: SFTDatasetConfig, tokenizer_name: str | None
) -> TrainArguments:
    """Validated TrainArguments for supervised fine-tuning from the API's configs (preference-loss flags rejected)."""
    values = {
        **training_arguments(train),
        **dataset_arguments(dataset, train, "SFT"),
        "model_name_or_path": checkpoint,
        "max_seq_length": dataset.max_seq_length,
    }
    if tokenizer_name:
        values["tokenizer_name_or_path"] = tokenizer_name
    args = arguments_from(values)
    finetune.check_sft_arguments(args)
    return args


def pretrain_arguments(
    model_config: Any, train: TrainingConfig, dataset: TextDatasetConfig, tokenizer_name: str | None
) -> TrainArguments:
    """Validated TrainArguments for the API's configs; the architecture is written to ``output_dir/model_config``."""
    from transformers import AutoTokenizer  # heavy: only a pretraining run from Python needs it

    values = {**training_arguments(train), **dataset_arguments(dataset, train, "pretraining text")}
    name = tokenizer_name or train.tokenizer_name
    if name is None and isinstance(model_config, str | os.PathLike) and Path(model_config).is_dir():
        name = str(model_config)  # a model folder with its tokenizer
    if name is None:
        raise UserError("pretraining needs a tokenizer: set TrainingConfig.tokenizer_name (or tokenizer_name=)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load tokenizer {name!r}: {err}") from err
    config = transformers_config(model_config, tokenizer)
    block = dataset.block_size or getattr(config, "max_position_embeddings", None)
    if block is None:
        raise UserError("set TextDatasetConfig.block_size: the model config has no max_position_embeddings")
    folder = write_config_folder(config, Path(train.output_dir) / "model_config")
    values.update(model_name_or_path=str(folder), tokenizer_name_or_path=name, max_seq_length=block)
    args = arguments_from(values)
    pretrain.check_pretrain_arguments(args)
    return args


def unpack_checkpoint(
    args: TrainArguments, checkpoint: str, tokenizer_name: str | None, model_config: Any, output_dir: str | os.PathLike
) -> None:
    """A ``.pt`` starting checkpoint becomes a model folder (``output_dir/initial_model``) that the stage loads."""
    if is_state_dict_file(checkpoint):
        folder = state_dict_to_folder(checkpoint, tokenizer_name, model_config, Path(output_dir) / "initial_model")
        args.model_name_or_path = str(folder)
        args.tokenizer_name_or_path = args.model_name_or_path


def source_tokenizer(checkpoint: str, tokenizer_name: str | None) -> str:
    """The tokenizer a stage starting from ``checkpoint`` uses, by name: the one given, the one a ``.pt`` of ours
    carries, else the checkpoint's own."""
    if tokenizer_name:
        return tokenizer_name
    carried = carried_tokenizer_name(checkpoint) if is_state_dict_file(checkpoint) else None
    return carried or checkpoint


def final_checkpoint(folder: Path, train: TrainingConfig, stage: str, tokenizer_name: str | None) -> Path:
    """What a stage returns: its output folder, or with ``save_format="pt"`` the ``<stage>_final.pt`` written from it
    (by default written too; the next stage's ``pretrain_checkpoint`` / ``sft_checkpoint`` either way)."""
    if not writes_pt(train):
        return folder
    import torch.distributed as dist  # heavy: when a run has ended

    path = folder / f"{stage}_final.pt"
    try:
        if int(os.environ.get("RANK", "0")) == 0:  # launched on several processes: the main one writes it
            write_pt_checkpoint(folder, path, tokenizer_name)
    finally:  # the other processes return once it is there (the next stage in the same script may read it)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    return path if train.save_format == "pt" else folder


@contextlib.contextmanager
def fresh_accelerate_state() -> Iterator[None]:
    """Let several runs share one Python process (a notebook, SFT then DPO): accelerate keeps global state."""
    from accelerate.state import AcceleratorState, GradientState  # heavy: imported when a run starts

    AcceleratorState._reset_state()
    GradientState._reset_state()
    try:
        with run_guard():  # a rank's error reaches the others; the output folder's lock is let go
            yield
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()
        restore_process_state()


def call_summarized(
    args: TrainArguments, stage: str, extra_flags: Sequence[str] = ()
) -> contextlib.AbstractContextManager[None]:
    """The run summary of an API run, as the command line prints and writes it: after the final checkpoint, or after a
    stop signal saved the run (then ``Preempted`` goes on to the caller). Its commands are the command line that
    trains the same arguments (``extra_flags`` appended)."""
    return summarized(args, stage, partial(summarize_call, args, stage, extra_flags=extra_flags))


def run_training(
    model_config: Any,
    train_config: TrainingConfig | None = None,
    dataset_config: TextDatasetConfig | None = None,
    tokenizer_name: str | None = None,
) -> Path:
    """Pretrain a causal LM from scratch; returns its final checkpoint (the output folder, or with
    ``save_format="pt"`` the ``pretrain_final.pt`` written beside it by default), ``run_sft``'s ``pretrain_checkpoint``.

    ``model_config``: a :class:`~open_instruct.model.scratch.ModelConfig`, a transformers ``PretrainedConfig``, a dict,
    or a folder / hub id with ``config.json``. The text: ``dataset_config`` or ``train_config.dataset_name`` (and its
    ``eval_dataset_name`` / ``eval_fraction`` for the held-out perplexity), tokenized with ``tokenizer_name`` or
    ``train_config.tokenizer_name``.
    """
    train = train_config or TrainingConfig()
    dataset = dataset_config or TextDatasetConfig()
    args = pretrain_arguments(model_config, train, dataset, tokenizer_name)
    preflight(args, pretraining=True)
    column = [] if dataset.text_column == "text" else ["--text_column", dataset.text_column]
    with call_summarized(args, "pretrain", column):
        with fresh_accelerate_state():
            folder = Path(pretrain.run(args, dataset.text_column))
        return final_checkpoint(folder, train, "pretrain", args.tokenizer_name_or_path)


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
    checkpoint, the output folder or with ``save_format="pt"`` ``sft_final.pt`` (written in it by default): either is a
    valid ``sft_checkpoint`` for ``run_dpo``. ``dry_run=True``: check and print the plan instead (see ``run_dpo``); returns it."""
    train = train_config or TrainingConfig()
    tokenizer_name = tokenizer_name or train.tokenizer_name
    checkpoint = str(pretrain_checkpoint)
    args = sft_arguments(checkpoint, train, dataset_config or SFTDatasetConfig(), tokenizer_name)
    if dry_run or args.dry_run:
        return plan_run(args, "sft")
    unpack_checkpoint(args, checkpoint, tokenizer_name, model_config, train.output_dir)
    preflight(args)
    with call_summarized(args, "sft"):
        with fresh_accelerate_state():
            folder = Path(finetune.run(args))
        return final_checkpoint(folder, train, "sft", source_tokenizer(checkpoint, tokenizer_name))


def run_dpo(
    sft_checkpoint: str | os.PathLike,
    train_config: TrainingConfig | None = None,
    dpo_config: DPOConfig | None = None,
    preference_config: PreferenceDatasetConfig | None = None,
    tokenizer_name: str | None = None,
    model_config: Any = None,
    dry_run: bool = False,
) -> Any:
    """DPO from an SFT checkpoint (HF folder, hub id, or ``.pt``); returns the final checkpoint (the output folder, or
    with ``save_format="pt"`` the ``dpo_final.pt`` written in it by default). ``dry_run=True``: check every input and print the plan (memory per
    GPU, time; see ``--dry_run``) without loading weights or writing anything; returns the
    :class:`open_instruct.plan.build.Plan`.

    A ``.pt`` written by ``run_sft``/``run_training`` carries its model config and tokenizer. A bare state dict needs a
    tokenizer (``tokenizer_name`` or ``train_config.tokenizer_name``) and a model config (``model_config``: a folder,
    hub id or ``PretrainedConfig``; default: the tokenizer's folder).
    """
    train = train_config or TrainingConfig()
    tokenizer_name = tokenizer_name or train.tokenizer_name
    checkpoint = str(sft_checkpoint)
    args = dpo_arguments(
        checkpoint, train, dpo_config or DPOConfig(), preference_config or PreferenceDatasetConfig(), tokenizer_name
    )
    if dry_run or args.dry_run:
        return plan_run(args, "dpo")
    unpack_checkpoint(args, checkpoint, tokenizer_name, model_config, train.output_dir)
    preflight(args)
    with call_summarized(args, "dpo"):
        with fresh_accelerate_state():
            try:
                folder = Path(dpo_tune_cache.run(args))
            finally:  # the run's stop-signal handlers end with it, also when it raises Preempted
                preemption.uninstall()
        return final_checkpoint(folder, train, "dpo", source_tokenizer(checkpoint, tokenizer_name))
