"""Every flag of the DPO recipe as one typed dataclass, with its validation.

Flag names follow allenai/open-instruct so existing launch scripts keep working; legacy spellings are listed in each
field's ``aliases`` metadata and accepted by the command-line and YAML parsers in :mod:`open_instruct.config.cli`.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, fields, make_dataclass
from pathlib import Path
from typing import Any

from open_instruct.config import compat
from open_instruct.config.fields import NONNEG, POS
from open_instruct.config.fields import flag as _f
from open_instruct.config.flag_rules import rule_problems
from open_instruct.config.open_instruct_flags import OpenInstructFlags
from open_instruct.config.sample_flags import SampleFlags
from open_instruct.data.chat_templates import CHAT_TEMPLATES as _TEMPLATE_TABLE
from open_instruct.data.chat_templates import TOKENIZER_TEMPLATE_NAMES
from open_instruct.data.formats import FORMATS
from open_instruct.errors import UserError
from open_instruct.objectives.combination import combination_problems
from open_instruct.objectives.losses import LossSettings, loss_names, loss_spec, whole_batch_loss
from open_instruct.plan.gpus import GPUS
from open_instruct.ranges import Range, range_problems
from open_instruct.training.preemption import parse_signals

LOSS_TYPES = loss_names()  # the loss registry's names and aliases (open_instruct.objectives.losses.LOSSES)
SCHEDULERS = ("linear", "cosine", "constant")
DATASET_FORMATS = ("auto", *FORMATS)  # the normalizers in data/formats.py
CHAT_TEMPLATES = (*_TEMPLATE_TABLE, *TOKENIZER_TEMPLATE_NAMES)  # data/chat_templates.py


def default_reference_cache_dir() -> str:
    """The reference log-prob cache folder: $REFERENCE_LOGPROBS_CACHE_PATH, else ~/.cache/open_instruct/..."""
    return os.environ.get(
        "REFERENCE_LOGPROBS_CACHE_PATH", str(Path.home() / ".cache" / "open_instruct" / "reference_logprobs")
    )


def _loss_hyperparameter_flags() -> type:
    """``LossSettings``' fields as flags with the recipe's defaults: the base of TrainArguments, so a new loss
    hyperparameter is one field in :mod:`open_instruct.objectives.losses`, not one here too."""
    hints = typing.get_type_hints(LossSettings)
    return make_dataclass(
        "LossHyperparameterFlags",
        [
            (
                f.name,
                hints[f.name],
                _f(
                    f.metadata["flag_default"],
                    f.metadata["help"],
                    f.metadata.get("aliases", ()),
                    f.metadata.get("choices"),
                    f.metadata.get("valid"),
                ),
            )
            for f in fields(LossSettings)
        ],
    )


@dataclass
class TrainArguments(OpenInstructFlags, SampleFlags, _loss_hyperparameter_flags()):
    """All settings of one run of any stage (DPO, SFT and pretraining read the ones they use). Defaults follow the
    Tulu 3 DPO recipe (dpo_norm, beta 5); open-instruct's other flags come from
    :class:`~open_instruct.config.open_instruct_flags.OpenInstructFlags`."""

    # --- experiment -------------------------------------------------------------------------------------------
    exp_name: str = _f("dpo", "Name of the run (wandb run name, hub repo name).")
    seed: int = _f(42, "Random seed for data order, dropout and synthetic data.", valid=Range(0, 2**32 - 1))
    output_dir: str = _f("output/dpo", "Where metrics, checkpoints and the final model go.")
    logging_steps: int = _f(1, "Log metrics every N optimizer steps.", valid=POS)
    checkpointing_steps: str | None = _f(None, "Save the training state every N optimizer steps, or 'epoch'.")
    keep_last_n_checkpoints: int = _f(3, "Keep this many step checkpoints (-1: all).", valid=Range(1, also=(-1,)))
    resume_from_checkpoint: str | None = _f(None, "A step_N checkpoint folder to resume from.")
    preemption_signals: str = _f(
        "SIGTERM,SIGINT,SIGUSR1",
        "Signals that stop the run cleanly: finish the optimizer step (or reference batch), save a checkpoint (or "
        "the reference shards), exit with code 75 to be requeued; the same command resumes. 'none': default actions.",
    )
    skip_nonfinite_batches: int = _f(
        0, "Tolerate up to N batches with a NaN/Inf loss (skipped and counted).", valid=NONNEG
    )
    with_tracking: bool = _f(False, "Log metrics and the config to wandb.", aliases=("report_to_wandb",))
    wandb_project: str = _f("open_instruct_internal", "wandb project.", aliases=("wandb_project_name",))
    wandb_entity: str | None = _f(None, "wandb entity (team or user).")
    push_to_hub: bool = _f(False, "Upload the final model to the Hugging Face Hub.")
    push_checkpoints_to_hub: bool = _f(
        False,
        "Also upload each complete step_N checkpoint, in the background, to branch step_N of the Hub repo (pruned "
        "like local ones); a run with no local checkpoint resumes from the newest complete one there.",
    )
    hf_entity: str | None = _f(None, "Hub user or organisation to push to.")
    hf_repo_id: str | None = _f(None, "Hub repo id (default: <hf_entity>/<exp_name>).")
    hf_repo_revision: str | None = _f(None, "Hub branch to push to (created if missing).")
    hf_repo_private: bool = _f(True, "Create the Hub repo as private.")

    # --- model ------------------------------------------------------------------------------------------------
    model_name_or_path: str | None = _f(None, "Local folder or hub id of the SFT model.")
    model_revision: str | None = _f(None, "Model revision (branch, tag or commit) on the hub.")
    tokenizer_name_or_path: str | None = _f(
        None, "Tokenizer folder or hub id (default: the model's).", aliases=("tokenizer_name",)
    )
    tokenizer_revision: str | None = _f(None, "Tokenizer revision on the hub (default: the model revision).")
    use_slow_tokenizer: bool = _f(False, "Use the slow (Python) tokenizer instead of the fast one.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub repo to run.")
    attn_implementation: str | None = _f(
        None,
        "Attention kernel: flash_attention_3, flash_attention_2, sdpa, eager, flex_attention or torch_varlen "
        "(PyTorch's packed varlen kernel; CUDA, bf16/fp16) (default: best available).",
    )
    low_cpu_mem_usage: bool = _f(
        False, "Load weights without a full extra copy in CPU memory (always the case with transformers >= 5)."
    )
    additional_model_arguments: str | None = _f(None, "JSON object of extra from_pretrained keyword arguments.")
    mixed_precision: str | None = _f(
        None, "no, bf16 or fp16 (default: what accelerate launch says, else no).", choices=("no", "bf16", "fp16")
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward to save memory.")
    activation_memory_budget: float = _f(
        1.0, "Below 1.0 turns on gradient checkpointing.", valid=Range(0, 1, low_open=True)
    )
    use_liger_kernel: bool = _f(
        False, "Liger kernels (CUDA; on CPU only under TRITON_INTERPRET=1); elsewhere a note and chunked log-probs."
    )
    use_lora: bool = _f(False, "Train LoRA adapters instead of all weights.")
    use_qlora: bool = _f(False, "QLoRA: LoRA on a 4-bit NF4 base model (needs CUDA and bitsandbytes; implies LoRA).")
    lora_rank: int = _f(64, "LoRA rank.", valid=POS)
    lora_alpha: float = _f(16, "LoRA alpha.", valid=Range(0, low_open=True))
    lora_dropout: float = _f(0.1, "LoRA dropout.", valid=Range(0, 1, high_open=True))
    lora_target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module-name suffixes that get adapters (or all-linear).",
    )
    merge_lora: bool = _f(False, "Also save merged full weights (into <output_dir>/merged) after LoRA training.")
    load_balancing_loss: bool = _f(False, "Add the MoE router load-balancing loss.")
    load_balancing_weight: float = _f(0.001, "Weight of the load-balancing loss.", valid=NONNEG)

    # --- data -------------------------------------------------------------------------------------------------
    mixer_list: list[str] = _f(
        [], "Pairs of DATASET AMOUNT (fraction with a decimal point, or row count).", aliases=("dataset_mixer_list",)
    )
    mixer_list_splits: list[str] = _f(
        ["train"], "Split per dataset (one for all, or one each).", aliases=("dataset_mixer_list_splits",)
    )
    eval_mixer_list: list[str] = _f(
        [], "Evaluation datasets, same form as --mixer_list.", aliases=("dataset_mixer_eval_list",)
    )
    eval_mixer_list_splits: list[str] = _f(
        ["test"], "Split per evaluation dataset.", aliases=("dataset_mixer_eval_list_splits",)
    )
    eval_fraction: float = _f(
        0.0,
        "Hold out this fraction of each training dataset's valid rows for evaluation.",
        valid=Range(0, 1, high_open=True),
    )
    eval_steps: int | None = _f(
        None, "Evaluate every N optimizer steps (and at the end); needs an evaluation set.", valid=POS
    )
    dataset_format: str = _f(
        "auto", "Row format of every dataset (auto: detected from columns).", choices=DATASET_FORMATS
    )
    skip_invalid_rows: bool = _f(False, "Drop malformed rows with a summary instead of stopping.")
    chat_template_name: str | None = _f(
        None, "One of our chat templates instead of the tokenizer's.", choices=CHAT_TEMPLATES
    )
    add_bos: bool = _f(False, "Prepend the BOS token when the chat template does not.")
    max_seq_length: int = _f(2048, "Maximum tokens per sequence (prompt + reply).", valid=POS)
    max_response_length: int | None = _f(
        None,
        "Cut each reply to at most N tokens, EOS included (TRL's max_completion_length).",
        aliases=("max_completion_length",),
        valid=POS,
    )
    max_train_samples: int | None = _f(None, "Use at most this many training pairs.", valid=POS)
    cache_dataset_only: bool = _f(False, "Prepare and cache the tokenized dataset, then exit.")
    dataset_local_cache_dir: str = _f(
        "local_dataset_cache", "Where prepared (tokenized) datasets are cached.", aliases=("local_cache_dir",)
    )
    preprocessing_num_workers: int | None = _f(
        None, "Processes that tokenize the data (None: 1); the prepared data is identical for any number.", valid=POS
    )
    reference_logprobs_cache_path: str = _f(
        "", "Folder of the reference log-prob cache (default: $REFERENCE_LOGPROBS_CACHE_PATH or ~/.cache/...)."
    )
    packing: bool | None = _f(
        None,
        "Padding-free batches: a micro-batch's sequences laid end to end in one row, each attending only to itself "
        "(also for the reference pass). Unset: the fastest layout proven equal to padded batches on this device "
        "(packed on CPU; padded and grouped by length on CUDA until the GPU suite proves a packed kernel); the run "
        "prints which and why. false: padded rows.",
        aliases=("padding_free",),
    )
    share_prompt: bool | None = _f(
        None,
        "Packed rows hold each pair's common prefix (its prompt) once, the rejected reply masked off the chosen one: "
        "the same log-probs and gradients from fewer tokens. Unset: on for packed rows under sdpa_varlen off CUDA; "
        "false: every sequence whole.",
    )
    max_tokens_per_batch: int | None = _f(
        None,
        "Token budget per micro-batch (packed: real tokens; padded: rows x longest): micro-batches hold as many "
        "pairs as fit, instead of --per_device_train_batch_size pairs.",
        valid=POS,
    )
    max_tokens_per_forward: int | None = _f(
        None,
        "Token budget of one forward/backward pass: a micro-batch above it runs as several passes over groups of its "
        "pairs, gradients added before the optimizer step (the same step, less activation memory; a pair is never "
        "cut). Unset: off CUDA, the tokens of 512 MiB of activations (the run prints how many); on CUDA, no limit.",
        valid=POS,
    )
    group_by_length: bool | None = _f(
        None,
        "Batch pairs of similar length, batches still in shuffled order (less padding). Unset: on when the run "
        "pads by default (see --packing).",
    )
    reference_batch_size: int | None = _f(None, "Batch size of the reference pass (default: 2x training).", valid=POS)

    # --- optimisation -----------------------------------------------------------------------------------------
    per_device_train_batch_size: int = _f(1, "Pairs per device per micro-batch.", valid=POS)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", valid=POS)
    learning_rate: float = _f(5e-7, "Peak learning rate.", valid=NONNEG)
    lr_scheduler_type: str = _f("linear", "Schedule after warmup.", choices=SCHEDULERS)
    warmup_ratio: float = _f(0.1, "Fraction of optimizer steps spent warming up.", valid=Range(0, 1))
    warmup_steps: int | None = _f(None, "Optimizer steps spent warming up (overrides --warmup_ratio).", valid=NONNEG)
    weight_decay: float = _f(0.0, "AdamW weight decay.", valid=NONNEG)
    max_grad_norm: float = _f(
        -1.0, "Clip gradients to this norm (<= 0: no clipping).", aliases=("clip_grad_norm",), valid=Range()
    )
    num_epochs: int = _f(1, "Epochs over the training mix.", aliases=("num_train_epochs",), valid=POS)
    max_train_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides num_epochs).", valid=POS)

    # --- loss -------------------------------------------------------------------------------------------------
    # (its hyperparameters: the LossSettings fields, inherited)
    loss_type: list[str] = _f(
        ["dpo_norm"],
        "Preference loss, or several (TRL's names too): with --loss_weights the loss is their weighted sum.",
        aliases=("dpo_loss_type",),
        choices=LOSS_TYPES,
    )
    loss_weights: list[float] | None = _f(None, "One weight per --loss_type entry (default: 1 each).", valid=NONNEG)
    reference_free: bool = _f(False, "Use a zero reference (skips the reference pass).")
    separate_forward: bool = _f(
        False,
        "Run chosen and rejected in two forwards, each padded to its own length (lower peak per forward).",
        aliases=("concatenated_forward_false",),
    )
    logprob_chunk_size: int | None = _f(
        None,
        "Tokens per chunk of the output projection in the chunked log-probs "
        "(default: 2^21 / vocabulary size, at least 32: 256 at 8k, 65 at 32k, 32 at 128k).",
        valid=POS,
    )

    # --- distributed ------------------------------------------------------------------------------------------
    zero_stage: int | None = _f(
        None, "DeepSpeed ZeRO stage (0-3); with --deepspeed_config it overrides the file's.", valid=Range(0, 3)
    )
    offload_optimizer: bool = _f(False, "ZeRO: offload optimizer state to CPU.")
    offload_param: bool = _f(False, "ZeRO-3: offload parameters to CPU.")
    deepspeed_config: str | None = _f(
        None, "Path of a DeepSpeed JSON config ('auto' fields are filled from our flags)."
    )
    fsdp: bool = _f(
        False,
        "Train with PyTorch FSDP2 (fully_shard per decoder layer) instead of DeepSpeed "
        "(also: accelerate launch --use_fsdp, or an accelerate config with distributed_type FSDP).",
    )
    fsdp_shard_degree: int | None = _f(
        None,
        "FSDP2: ranks each parameter is sharded over (default: all, or the processes / --fsdp_num_replicas).",
        valid=POS,
    )
    fsdp_num_replicas: int | None = _f(
        None, "FSDP2: model replicas, gradients all-reduced across them (HSDP when > 1; default 1).", valid=POS
    )
    fsdp_offload_params: bool = _f(False, "FSDP2: keep sharded parameters, gradients and optimizer state on CPU.")
    timeout: int = _f(1800, "Seconds before a collective operation times out.", valid=POS)
    rank_failure_timeout: int = _f(
        300,
        "Seconds a rank may go silent (killed, out of memory, its host gone) before every rank stops, naming it; a "
        "rank that raises stops the others within seconds. 0: off (a dead rank then waits out --timeout).",
        valid=NONNEG,
    )

    # --- planning ---------------------------------------------------------------------------------------------
    dry_run: bool = _f(
        False,
        "Check every flag, the model's config.json (no weights), the datasets' first rows, the output folder, the Hub "
        "target and tracking; print the plan (recipe, memory per GPU by phase, fit, time) and exit 0.",
    )
    dry_run_gpu: str | None = _f(None, "The GPU to plan for (default: this machine's).", choices=tuple(GPUS))
    dry_run_num_processes: int | None = _f(
        None, "Processes (GPUs) to plan for (default: the launcher's WORLD_SIZE, else nodes x local GPUs).", valid=POS
    )
    dry_run_num_nodes: int | None = _f(
        None, "Nodes to plan for (default: NUM_NODES / the launcher's, else 1).", valid=POS
    )
    dry_run_num_pairs: int | None = _f(
        None, "Training examples to plan for when a dataset's size cannot be read (a Hub dataset offline).", valid=POS
    )
    dry_run_mfu: float | None = _f(
        None,
        "Model FLOPs utilisation for the time estimate (default: measured, or 0.35).",
        valid=Range(0, 1, low_open=True),
    )

    def __post_init__(self) -> None:
        if not self.reference_logprobs_cache_path:
            self.reference_logprobs_cache_path = default_reference_cache_dir()
        if isinstance(self.loss_type, str):  # one name, as open-instruct and TRL both accept
            self.loss_type = self.loss_type.split()
        if isinstance(self.loss_weights, int | float):
            self.loss_weights = [float(self.loss_weights)]
        compat.normalize(self)

    def _specs(self) -> list[Any]:
        known = [name for name in self.loss_type if name in LOSS_TYPES]
        return [loss_spec(name) for name in known]

    @property
    def length_normalized(self) -> bool:
        """Whether every listed loss compares per-token averages (logged log-probs are then averages too)."""
        specs = self._specs()
        return bool(specs) and all(spec.length_normalized for spec in specs)

    @property
    def needs_reference(self) -> bool:
        """Whether a listed loss compares against the reference model (else the cache pass is skipped)."""
        return not self.reference_free and any(spec.needs_reference for spec in self._specs())

    def loss_settings(self) -> LossSettings:
        """The loss hyperparameters of this run."""
        return LossSettings(**{f.name: getattr(self, f.name) for f in fields(LossSettings)})

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values, for the run's config file and the tracker (never holds a token)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# The class's name from when it held only DPO settings; kept so user code that imports it runs unchanged.
DPOArguments = TrainArguments

# Flags declared above whose behaviour is not built yet. Passing a non-default value is an error, never ignored.
NOT_YET_SUPPORTED: tuple[str, ...] = ()


def _consistency_problems(args: TrainArguments) -> list[str]:
    """Flags that contradict each other (a flag missing what it needs is a ``FLAG_RULES`` entry instead)."""
    problems = []
    if args.model_name_or_path is None and not (args.cache_dataset_only and args.tokenizer_name_or_path):
        problems.append("--model_name_or_path is required (--cache_dataset_only needs only --tokenizer_name_or_path)")
    problems.extend(compat.problems(args))  # incl. exactly one dataset selection (--mixer_list, --dataset_name, ...)
    for name in ("mixer_list", "eval_mixer_list"):
        if len(getattr(args, name)) % 2:
            problems.append(f"--{name} takes pairs of DATASET AMOUNT, got {len(getattr(args, name))} values")
    if not args.lora_target_modules:
        problems.append("--lora_target_modules needs at least one module name")
    if args.merge_lora and args.use_qlora:
        problems.append(
            "--merge_lora with --use_qlora is not supported (the base is 4-bit): merge the saved adapter "
            "into a bf16 copy of the base model with peft's merge_and_unload"
        )
    if args.eval_mixer_list and args.eval_fraction > 0:
        problems.append("--eval_mixer_list and --eval_fraction both define the evaluation set; pass one of them")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            problems.append(
                f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}"
            )
    try:
        parse_signals(args.preemption_signals)
    except ValueError as err:
        problems.append(f"--preemption_signals: {err}")
    whole_batch = whole_batch_loss(args.loss_type, args.load_balancing_loss) if args.max_tokens_per_forward else None
    if whole_batch:
        problems.append(f"--max_tokens_per_forward: {whole_batch}; leave it unset")
    if args.share_prompt and (args.packing is False or args.separate_forward):
        problems.append("--share_prompt needs packed rows; it does not apply to --packing false or --separate_forward")
    if args.packing and args.separate_forward:
        problems.append("--separate_forward splits padded rows; it does not apply to --packing (one row per batch)")
    return problems


def validate(args: TrainArguments) -> None:
    """Reject out-of-range or inconsistent settings with one clear message, before any work starts: every number
    finite and in its field's ``valid`` range, the loss combination sound, each flag's ``FLAG_RULES`` entry kept
    (a ``note`` rule prints its line instead)."""

    problems = range_problems(args)
    problems.extend(_consistency_problems(args))
    problems.extend(combination_problems(args.loss_type, args.loss_weights, args.loss_settings(), args.reference_free))
    defaults = TrainArguments(reference_logprobs_cache_path=args.reference_logprobs_cache_path)
    for name in NOT_YET_SUPPORTED:
        if getattr(args, name) != getattr(defaults, name):
            problems.append(f"--{name} is not supported yet in this version")
    if not problems:  # the rules read values (paths, counts) that must first be sound
        problems.extend(rule_problems(args, defaults))
    if problems:
        raise UserError("invalid configuration: " + "; ".join(dict.fromkeys(problems)))
