"""The Python API's config classes and their mapping onto :class:`TrainArguments` (no training here).

``TrainingConfig`` (every stage), ``DPOConfig``, and one dataset config per stage (``TextDatasetConfig``,
``SFTDatasetConfig``, ``PreferenceDatasetConfig``) become the values of one ``TrainArguments``, the object the command
line builds too; :mod:`open_instruct.api.stages` validates it and runs the stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from open_instruct.config import TrainArguments
from open_instruct.errors import UserError, say_note
from open_instruct.files import is_local_path
from open_instruct.objectives.losses import LossSettings

# Hub datasets whose row shape needs a dedicated parser (open_instruct.data.formats), by lower-cased hub id.
HUB_FORMATS = {"anthropic/hh-rlhf": "hh_rlhf", "stanfordnlp/shp": "shp"}

DatasetSource = str | os.PathLike | Sequence[dict[str, Any]]


@dataclass
class TrainingConfig:
    """Settings shared by the SFT and DPO stages: run, batch, optimiser, schedule, logging, saving.

    Fields by ``--help`` group:

    - Model: tokenizer_name
    - Data: dataset_name, eval_dataset_name, eval_fraction, eval_every
    - Batch and schedule: batch_size, micro_batch_size, gradient_accumulation_steps, learning_rate, max_steps,
      num_epochs, warmup_steps, weight_decay, lr_scheduler_type, max_grad_norm, seed
    - Engine and precision: mixed_precision
    - Checkpoints and resume: output_dir, save_every, save_format
    - Tracking and Hub: run_name, log_every, with_tracking, wandb_project, wandb_entity, push_to_hub, hf_repo_id
    - Any other flag: extra
    """

    run_name: str = "run"
    dataset_name: str | None = None  # used when the stage's dataset config is not given (pretraining: its text)
    eval_dataset_name: str | None = None  # likewise, the held-out set when the dataset config names none
    eval_fraction: float = 0.0  # likewise: hold out this fraction of the training data instead
    tokenizer_name: str | None = None  # default: the checkpoint's own tokenizer
    output_dir: str = "output/run"
    batch_size: int = 8  # global, on any number of processes: micro_batch_size x accumulation x world size
    micro_batch_size: int = 8  # per device per forward
    gradient_accumulation_steps: int | None = 1  # batch_size wins: derived as batch_size / (micro x world size)
    learning_rate: float = 5e-7
    max_steps: int | None = None  # default: num_epochs over the data
    num_epochs: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    # After warmup the learning rate stays put (the documented API's log: lr=5.000e-06 at steps 100 and 200 of 2000);
    # the command line keeps open-instruct's "linear" decay. "linear" and "cosine" are here too.
    lr_scheduler_type: str = "constant"
    max_grad_norm: float = -1.0
    save_every: int | None = None  # optimizer steps between resumable checkpoints
    log_every: int = 10
    eval_every: int | None = None  # optimizer steps between evaluations (also run at the end)
    mixed_precision: str = "no"  # "bf16", "fp16" or "no"
    seed: int = 42
    with_tracking: bool = False
    wandb_project: str = "open_instruct_internal"
    wandb_entity: str | None = None
    push_to_hub: bool = False
    hf_repo_id: str | None = None
    # None: output_dir (returned) plus output_dir/<stage>_final.pt beside it (not for LoRA: its output is an adapter);
    # "pt": the same, the .pt returned; "hf": output_dir only.
    save_format: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other TrainArguments flag by name


def _loss_hyperparameters() -> type:
    """``LossSettings``' fields with their (TRL) defaults: the base of DPOConfig, so each loss hyperparameter is
    declared once, in :mod:`open_instruct.objectives.losses`."""
    hints = typing.get_type_hints(LossSettings)
    return dataclasses.make_dataclass(
        "LossHyperparameters",
        [(f.name, hints[f.name], field(default=f.default)) for f in dataclasses.fields(LossSettings)],
    )


@dataclass
class DPOConfig(_loss_hyperparameters()):
    """The preference loss and its length budget (plus every ``LossSettings`` hyperparameter: beta, label_smoothing,
    gamma_beta_ratio, nll_loss_weight, ...).

    Fields by ``--help`` group:

    - Data: max_length, max_prompt_length
    - Loss: beta, label_smoothing, gamma_beta_ratio, nll_loss_weight, f_divergence_type, f_alpha_divergence_coef,
      discopop_tau, ld_alpha, use_weighting, loss_type, loss_weights, reference_free, reference_cache_dir
    """

    max_length: int = 512  # maximum tokens per response
    max_prompt_length: int = 512  # maximum prompt tokens; sequences get max_prompt_length + max_length tokens
    loss_type: str | list[str] = "dpo"  # one loss, or several (TRL's names too) summed with loss_weights
    loss_weights: list[float] | None = None
    reference_free: bool = False
    reference_cache_dir: str | None = None  # default: $REFERENCE_LOGPROBS_CACHE_PATH or ~/.cache/open_instruct/...


@dataclass
class PreferenceDatasetConfig:
    """Where the preference pairs come from: a hub id, a local file or folder, or rows in memory.

    ``Anthropic/hh-rlhf`` and ``stanfordnlp/SHP`` get their own parsers; files and rows may hold any supported shape,
    including ``{prompt, chosen, rejected}`` with strings or messages.

    Fields by ``--help`` group:

    - Data: dataset_name, split, amount, dataset_format, eval_dataset_name, eval_split, eval_fraction,
      chat_template_name, max_samples, skip_invalid_rows
    """

    dataset_name: DatasetSource | None = None
    split: str = "train"
    amount: float | int = 1.0  # a fraction (float) or a row count (int) of the dataset
    dataset_format: str | None = None  # default: from the hub id, else detected from the columns
    eval_dataset_name: DatasetSource | None = None  # default with eval_every: the dataset's eval_split (hub ids)
    eval_split: str = "test"
    eval_fraction: float = 0.0  # or hold out this fraction of the training pairs
    chat_template_name: str | None = None
    max_samples: int | None = None
    skip_invalid_rows: bool = False


@dataclass
class TextDatasetConfig:
    """Raw text for pretraining: ``.txt`` (a document per line), ``.jsonl``/``.json``/parquet or a hub dataset with a
    text column; default: ``TrainingConfig.dataset_name``. Documents are packed into blocks of ``block_size`` tokens
    (default: the model's context length).

    Fields by ``--help`` group:

    - Data: dataset_name, split, amount, text_column, block_size, eval_dataset_name, eval_split, eval_fraction,
      max_samples, chat_template_name
    """

    dataset_name: DatasetSource | None = None
    split: str = "train"
    amount: float | int = 1.0
    text_column: str = "text"
    block_size: int | None = None
    eval_dataset_name: DatasetSource | None = None
    eval_split: str = "test"
    eval_fraction: float = 0.0  # of the documents, held out before packing
    max_samples: int | None = None  # documents
    chat_template_name: str | None = None  # unused by pretraining; here so the data arguments are shared


@dataclass
class SFTDatasetConfig:
    """Chat data for supervised fine-tuning: ``{"messages": [...]}`` rows (preference rows: their chosen side).

    Fields by ``--help`` group:

    - Data: dataset_name, split, amount, max_seq_length, eval_dataset_name, eval_split, eval_fraction,
      chat_template_name, max_samples
    """

    dataset_name: DatasetSource | None = None
    split: str = "train"
    amount: float | int = 1.0  # a fraction (float) or a row count (int) of the dataset
    max_seq_length: int = 1024
    eval_dataset_name: DatasetSource | None = None  # default with eval_every: the dataset's eval_split (hub ids)
    eval_split: str = "test"
    eval_fraction: float = 0.0
    chat_template_name: str | None = None
    max_samples: int | None = None


def world_size() -> int:
    """Processes of this run, as the launcher (accelerate, torchrun) announces them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def accumulation_steps(batch: int, micro: int, given: int | None, processes: int) -> tuple[int, str | None]:
    """(gradient accumulation steps, note) that keep the global ``batch`` = ``micro`` x steps x ``processes``.

    ``batch_size`` is what the run trains on per optimizer step, on any number of processes; ``given`` (the
    accumulation a one-process example names, or None) yields to it, with a ``note:`` line when it differs. Only a
    batch that cannot be split evenly into the processes' micro-batches is an error."""
    for name, value in (("batch_size", batch), ("micro_batch_size", micro), ("gradient_accumulation_steps", given)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    per_step = micro * processes
    if batch % per_step:
        raise UserError(
            f"batch_size {batch} (global) cannot be split evenly into micro_batch_size {micro} x {processes} "
            f"process(es): make it a multiple of {per_step}"
        )
    steps = batch // per_step
    if given is None or given == steps:
        return steps, None
    return steps, (
        f"note: gradient_accumulation_steps {given} -> {steps}: keeps the global batch_size {batch} = "
        f"micro_batch_size {micro} x {steps} x {processes} process(es)"
    )


def writes_pt(train: TrainingConfig) -> bool:
    """Whether a stage writes ``<output_dir>/<stage>_final.pt``: by default (a full-weight run) or ``"pt"``."""
    lora = bool(train.extra.get("use_lora") or train.extra.get("use_qlora"))
    return train.save_format == "pt" or (train.save_format is None and not lora)


def training_arguments(train: TrainingConfig) -> dict[str, Any]:
    """The TrainArguments values a TrainingConfig sets."""
    if train.mixed_precision not in ("no", "bf16", "fp16"):
        raise UserError(f"mixed_precision must be 'bf16', 'fp16' or 'no', got {train.mixed_precision!r}")
    if train.warmup_steps < 0:
        raise UserError(f"warmup_steps must be >= 0, got {train.warmup_steps}")
    if train.save_format not in (None, "hf", "pt"):
        raise UserError(
            f"save_format must be 'hf' (a Hugging Face folder) or 'pt' (one file), got {train.save_format!r}"
        )
    if train.save_format == "pt" and (train.extra.get("use_lora") or train.extra.get("use_qlora")):
        raise UserError("save_format='pt' writes full weights; a LoRA run saves an adapter (use save_format='hf')")
    steps, note = accumulation_steps(
        train.batch_size, train.micro_batch_size, train.gradient_accumulation_steps, world_size()
    )
    if note:
        say_note(note)
    values = {
        "output_dir": str(train.output_dir),
        "seed": train.seed,
        "per_device_train_batch_size": train.micro_batch_size,
        "gradient_accumulation_steps": steps,
        "learning_rate": train.learning_rate,
        "max_train_steps": train.max_steps,
        "num_epochs": train.num_epochs,
        "warmup_steps": train.warmup_steps,
        "weight_decay": train.weight_decay,
        "lr_scheduler_type": train.lr_scheduler_type,
        "max_grad_norm": train.max_grad_norm,
        "logging_steps": train.log_every,
        "eval_steps": train.eval_every,
        "mixed_precision": train.mixed_precision,
        "checkpointing_steps": None if train.save_every is None else str(train.save_every),
        "with_tracking": train.with_tracking,
        "wandb_project": train.wandb_project,
        "wandb_entity": train.wandb_entity,
        "push_to_hub": train.push_to_hub,
        "hf_repo_id": train.hf_repo_id,
    }
    if train.tokenizer_name:
        values["tokenizer_name_or_path"] = train.tokenizer_name
    if train.with_tracking or train.push_to_hub or train.run_name != TrainingConfig.run_name:
        values["exp_name"] = train.run_name  # else the note that a run name without wandb or hub does nothing
    known = {f.name for f in dataclasses.fields(TrainArguments)}
    unknown = sorted(set(train.extra) - known)
    if unknown:
        raise UserError(f"TrainingConfig.extra: unknown setting(s) {', '.join(unknown)}")
    return {**values, **train.extra}


def _is_rows(source: Any) -> bool:
    return not isinstance(source, str | os.PathLike) and (isinstance(source, Sequence) or hasattr(source, "to_list"))


def dataset_path(source: DatasetSource, folder: Path, name: str) -> str:
    """A mixer name for ``source``: hub ids and paths as they are; rows in memory written to ``folder/name.jsonl``."""
    if not _is_rows(source):
        return str(source)
    rows = source.to_list() if hasattr(source, "to_list") else list(source)
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{name} dataset: expected a non-empty list of dict rows")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return str(path)


def dataset_arguments(dataset: Any, train: TrainingConfig, kind: str) -> dict[str, Any]:
    """The TrainArguments data values for a dataset config (preference pairs or SFT conversations)."""
    source = dataset.dataset_name if dataset.dataset_name is not None else train.dataset_name
    if source is None:
        raise UserError(f"no {kind} dataset: set {type(dataset).__name__}.dataset_name or TrainingConfig.dataset_name")
    folder = Path(train.output_dir) / "api_data"
    name = dataset_path(source, folder, "train")
    if dataset.eval_dataset_name is None and dataset.eval_fraction == 0:  # TrainingConfig's evaluation settings
        dataset = dataclasses.replace(
            dataset, eval_dataset_name=train.eval_dataset_name, eval_fraction=train.eval_fraction
        )
    amount = dataset.amount
    if not isinstance(amount, int | float) or isinstance(amount, bool) or not 0 < amount < math.inf:
        raise UserError(f"amount must be a positive fraction (float) or row count (int), got {amount!r}")
    values: dict[str, Any] = {
        "mixer_list": [name, repr(float(amount)) if isinstance(amount, float) else str(amount)],
        "mixer_list_splits": [dataset.split],
        "max_train_samples": dataset.max_samples,
        "chat_template_name": dataset.chat_template_name,
        "eval_fraction": dataset.eval_fraction,
    }
    if dataset.eval_dataset_name is not None:
        values["eval_mixer_list"] = [dataset_path(dataset.eval_dataset_name, folder, "eval"), "1.0"]
        values["eval_mixer_list_splits"] = [dataset.eval_split]
    elif train.eval_every is not None and dataset.eval_fraction == 0:
        if _is_rows(source) or is_local_path(name):
            raise UserError(
                f"eval_every needs an evaluation set and {name} has no {dataset.eval_split!r} split: "
                "pass eval_dataset_name= or eval_fraction="
            )
        values["eval_mixer_list"] = [name, "1.0"]
        values["eval_mixer_list_splits"] = [dataset.eval_split]
    return values


def preference_arguments(dataset: PreferenceDatasetConfig, train: TrainingConfig) -> dict[str, Any]:
    """The TrainArguments data values of a PreferenceDatasetConfig (hub ids mapped to their format)."""
    values = dataset_arguments(dataset, train, "preference")
    hub_format = HUB_FORMATS.get(str(values["mixer_list"][0]).lower())
    values["dataset_format"] = dataset.dataset_format or hub_format or "auto"
    values["skip_invalid_rows"] = dataset.skip_invalid_rows
    return values


def arguments_from(values: dict[str, Any]) -> TrainArguments:
    """The arguments the API's configs translate to, not yet validated; a setting of the wrong name is a UserError."""
    try:
        return TrainArguments(**values)
    except TypeError as err:
        raise UserError(f"invalid setting: {err}") from err


# The config classes whose docstrings list their fields by --help group (open_instruct.api.config_groups).
CONFIG_CLASSES = (TrainingConfig, DPOConfig, PreferenceDatasetConfig, SFTDatasetConfig, TextDatasetConfig)
