"""What each layer reads of a run's configuration: small frozen settings objects, one per concern.

``open_instruct.config`` parses the flags and YAML once and builds these (:func:`open_instruct.config.settings_of`);
the entry scripts, the API and the recipe skeleton hand each layer the one it needs, so a function's signature says
what it reads and a test builds a few fields, not the whole flag set. A field has its flag's name, type and meaning
(the flag's help and default live once, in ``config/arguments.py``); :meth:`Settings.of` reads the fields by name
from the parsed flags. This module imports nothing from the project: every layer may depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

S = TypeVar("S", bound="Settings")


class Settings:
    """Base of the settings objects: built from any object holding the flags by their names."""

    @classmethod
    def of(cls: type[S], flags: Any, **overrides: Any) -> S:
        """This concern's fields read by name from ``flags`` (the parsed arguments), ``overrides`` replacing some."""
        values = {f.name: getattr(flags, f.name) for f in fields(cls) if f.name not in overrides}  # type: ignore[arg-type]
        return cls(**values, **overrides)


class LayerCheckpointing:
    """The one rule for activation checkpointing, shared by the settings that hold its three flags."""

    gradient_checkpointing: bool
    activation_memory_budget: float
    activation_checkpointing_mode: str

    @property
    def checkpoints_every_layer(self) -> bool:
        """Whether every decoder layer recomputes its activations in the backward: asked for directly, by a memory
        budget below 1 (open-instruct's "budget" mode), or by its "selected_modules" mode."""
        return bool(
            self.gradient_checkpointing
            or self.activation_memory_budget < 1.0
            or self.activation_checkpointing_mode == "selected_modules"
        )


@dataclass(frozen=True)
class ModelSettings(Settings, LayerCheckpointing):
    """The model and tokenizer to load and how: revision, attention kernel, precision, LoRA, MoE, checkpointing."""

    model_name_or_path: str | None
    model_revision: str | None
    tokenizer_name_or_path: str | None
    tokenizer_revision: str | None
    use_slow_tokenizer: bool
    trust_remote_code: bool
    chat_template_name: str | None
    attn_implementation: str | None
    low_cpu_mem_usage: bool
    additional_model_arguments: str | None
    mixed_precision: str | None
    compile_model: bool
    config_name: str | None
    rope_scaling_factor: float | None
    rope_scaling_beta_fast: float
    rope_scaling_beta_slow: float
    rope_scaling_old_context_len: int
    gradient_checkpointing: bool
    activation_memory_budget: float
    activation_checkpointing_mode: str
    use_liger_kernel: bool
    use_lora: bool
    use_qlora: bool
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: list[str]
    merge_lora: bool
    load_balancing_loss: bool
    load_balancing_weight: float


@dataclass(frozen=True)
class DataSettings(Settings):
    """Which datasets, how they are mixed, checked, tokenized, split for evaluation and cached."""

    mixer_list: list[str]
    mixer_list_splits: list[str]
    eval_mixer_list: list[str]
    eval_mixer_list_splits: list[str]
    eval_fraction: float
    dataset_format: str
    skip_invalid_rows: bool
    add_bos: bool
    max_seq_length: int
    max_response_length: int | None
    max_train_samples: int | None
    dataset_local_cache_dir: str
    overwrite_cache: bool
    skip_cache: bool
    preprocessing_num_workers: int | None
    seed: int
    per_device_train_batch_size: int


@dataclass(frozen=True)
class BatchSettings(Settings):
    """How micro-batches are laid out and log-probs computed: batch size, packing, length grouping, chunking."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    packing: bool | None
    group_by_length: bool | None
    share_prompt: bool | None
    max_tokens_per_batch: int | None
    max_tokens_per_forward: int | None
    loss_type: list[
        str
    ]  # whether a micro-batch may run as several forward passes (objectives.losses.whole_batch_loss)
    separate_forward: bool
    seed: int
    data_loader_seed: int | None
    logprob_chunk_size: int | None
    use_liger_kernel: bool
    use_weighting: bool
    load_balancing_loss: bool

    @property
    def order_seed(self) -> int:
        """The seed of the training data order (``--data_loader_seed``, else ``--seed``)."""
        return self.seed if self.data_loader_seed is None else self.data_loader_seed


@dataclass(frozen=True)
class ReferenceSettings(Settings):
    """The reference pass: whether the losses need it, its batch size and the cache folder."""

    needs_reference: bool
    reference_batch_size: int | None
    reference_logprobs_cache_path: str


@dataclass(frozen=True)
class EngineSettings(Settings, LayerCheckpointing):
    """The distributed engine: DeepSpeed ZeRO or FSDP2 and their options, precision, the collective timeout."""

    deepspeed_config: str | None
    zero_stage: int | None
    offload_optimizer: bool
    offload_param: bool
    zero_hpz_partition_size: int | None
    fsdp: bool
    fsdp_shard_degree: int | None
    fsdp_num_replicas: int | None
    fsdp_offload_params: bool
    mixed_precision: str | None
    gradient_checkpointing: bool
    activation_memory_budget: float
    activation_checkpointing_mode: str
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    max_grad_norm: float
    timeout: int
    rank_failure_timeout: int
    sync_each_batch: bool


@dataclass(frozen=True)
class OptimSettings(Settings):
    """The optimizer and the learning-rate schedule, and how many steps the run takes."""

    learning_rate: float
    weight_decay: float
    optimizer_type: str
    optimizer_kwargs: dict | str
    use_8bit_optimizer: bool
    dpo_use_paged_optimizer: bool
    fused_optimizer: bool
    offload_optimizer: bool
    offload_param: bool
    fsdp_offload_params: bool
    lr_scheduler_type: str
    warmup_ratio: float
    warmup_steps: int | None
    num_epochs: int
    max_train_steps: int | None
    max_grad_norm: float
    per_device_train_batch_size: int
    gradient_accumulation_steps: int


@dataclass(frozen=True)
class CheckpointSettings(Settings):
    """Where the run writes, when it saves its training state, how it resumes and stops."""

    output_dir: str
    checkpointing_steps: str | None
    keep_last_n_checkpoints: int
    resume_from_checkpoint: str | None
    skip_nonfinite_batches: int
    preemption_signals: str
    seed: int


@dataclass(frozen=True)
class TrackingSettings(Settings):
    """What the run logs, how often, and where to (console, jsonl, wandb, tensorboard, the profiler)."""

    exp_name: str
    run_name: str | None
    output_dir: str
    with_tracking: bool
    report_to: list[str]
    wandb_project: str
    wandb_entity: str | None
    wandb_group_name: str | None
    logging_steps: int
    eval_steps: int | None
    log_grad_norm: bool
    profiling: bool


@dataclass(frozen=True)
class HubSettings(Settings):
    """Whether and where the final model (and the step checkpoints) go on the Hugging Face Hub."""

    push_to_hub: bool
    push_checkpoints_to_hub: bool
    exp_name: str
    hf_entity: str | None
    hf_repo_id: str | None
    hf_repo_revision: str | None
    hf_repo_private: bool


@dataclass(frozen=True)
class PlanSettings(Settings):
    """What ``--dry_run`` plans for when the machine cannot say: the GPU, processes, nodes, dataset size, MFU."""

    dry_run_gpu: str | None
    dry_run_num_processes: int | None
    dry_run_num_nodes: int | None
    dry_run_num_pairs: int | None
    dry_run_mfu: float | None


_CONCERNS: dict[str, type[Settings]] = {
    "model": ModelSettings,
    "data": DataSettings,
    "batch": BatchSettings,
    "reference": ReferenceSettings,
    "engine": EngineSettings,
    "optim": OptimSettings,
    "checkpoint": CheckpointSettings,
    "tracking": TrackingSettings,
    "hub": HubSettings,
    "plan": PlanSettings,
}


@dataclass(frozen=True)
class RunSettings:
    """Every concern's settings of one run: what the entry scripts and the planner hand out, piece by piece."""

    model: ModelSettings
    data: DataSettings
    batch: BatchSettings
    reference: ReferenceSettings
    engine: EngineSettings
    optim: OptimSettings
    checkpoint: CheckpointSettings
    tracking: TrackingSettings
    hub: HubSettings
    plan: PlanSettings

    @classmethod
    def of(cls, flags: Any) -> RunSettings:
        """Each concern's settings read from the parsed flags."""
        return cls(**{name: concern.of(flags) for name, concern in _CONCERNS.items()})

    def replaced(self, **changes: Any) -> RunSettings:
        """These settings with each changed flag replaced in every concern that holds it (a batch size sits in
        several); a flag no concern holds is an error."""
        held = {name: {f.name for f in fields(piece)} for name, piece in vars(self).items()}  # type: ignore[arg-type]
        unknown = set(changes) - set().union(*held.values())
        if unknown:
            raise KeyError(f"no settings object holds {sorted(unknown)}")
        return RunSettings(
            **{
                name: replace(getattr(self, name), **{k: v for k, v in changes.items() if k in held[name]})
                for name in held
            }
        )
