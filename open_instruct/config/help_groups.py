"""Which group each flag belongs to, in the order a new user needs them: the one place ``--help`` and the Python API's
config docstrings (:mod:`open_instruct.api.config_groups`) read it from.

Every ``TrainArguments`` field is in exactly one group (tests/config/test_help.py checks it, so a new flag fails the
suite until it is placed here). Within a group, flags come in the order listed. The last group holds open-instruct's
other spellings of our flags and the flags that are accepted but do nothing here (``CLUSTER_ONLY`` and
``NO_EFFECT_HERE`` of :mod:`open_instruct.config.open_instruct_flags`); open-instruct's flags that act here sit in
their topic's group.
"""

from __future__ import annotations

from dataclasses import dataclass

from open_instruct.config.open_instruct_flags import CLUSTER_ONLY, NO_EFFECT_HERE
from open_instruct.objectives.losses import hyperparameter_names


@dataclass(frozen=True)
class FlagGroup:
    """``key``: a short name for code and tests; ``title``: the heading in ``--help`` and the API docstrings."""

    key: str
    title: str
    flags: tuple[str, ...]

    @property
    def heading(self) -> str:
        """The title without its explanation: "Planning", "open-instruct compatibility" (the API docstrings')."""
        return self.title.split(" (")[0].split(":")[0]


GROUPS: tuple[FlagGroup, ...] = (
    FlagGroup(
        "model",
        "Model",
        (
            "model_name_or_path",
            "model_revision",
            "tokenizer_name_or_path",
            "tokenizer_revision",
            "use_slow_tokenizer",
            "trust_remote_code",
            "config_name",
            "additional_model_arguments",
            "use_lora",
            "use_qlora",
            "lora_rank",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
            "merge_lora",
            "rope_scaling_factor",
            "rope_scaling_beta_fast",
            "rope_scaling_beta_slow",
            "rope_scaling_old_context_len",
        ),
    ),
    FlagGroup(
        "data",
        "Data",
        (
            "mixer_list",
            "mixer_list_splits",
            "dataset_format",
            "chat_template_name",
            "add_bos",
            "max_seq_length",
            "max_response_length",
            "max_train_samples",
            "skip_invalid_rows",
            "eval_mixer_list",
            "eval_mixer_list_splits",
            "eval_fraction",
            "eval_steps",
            "dataset_local_cache_dir",
            "preprocessing_num_workers",
            "cache_dataset_only",
            "overwrite_cache",
            "skip_cache",
            "dataset_mix_dir",
            "data_loader_seed",
        ),
    ),
    FlagGroup(
        "batch",
        "Batch and schedule",
        (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "num_epochs",
            "max_train_steps",
            "learning_rate",
            "lr_scheduler_type",
            "warmup_ratio",
            "warmup_steps",
            "weight_decay",
            "max_grad_norm",
            "optimizer_type",
            "optimizer_kwargs",
            "seed",
            "packing",
            "share_prompt",
            "group_by_length",
            "max_tokens_per_batch",
            "max_tokens_per_forward",
            "skip_nonfinite_batches",
        ),
    ),
    FlagGroup(
        "loss",
        "Loss",
        (
            "loss_type",
            "loss_weights",
            *hyperparameter_names(),  # beta, label_smoothing, ...: objectives/losses.py's LossSettings
            "reference_free",
            "reference_batch_size",
            "reference_logprobs_cache_path",
            "cache_logprobs_only",
            "load_balancing_loss",
            "load_balancing_weight",
        ),
    ),
    FlagGroup(
        "engine",
        "Engine and precision",
        (
            "mixed_precision",
            "attn_implementation",
            "gradient_checkpointing",
            "activation_memory_budget",
            "activation_checkpointing_mode",
            "use_liger_kernel",
            "logprob_chunk_size",
            "separate_forward",
            "compile_model",
            "low_cpu_mem_usage",
            "fused_optimizer",
            "use_8bit_optimizer",
            "dpo_use_paged_optimizer",
            "sync_each_batch",
            "zero_stage",
            "offload_optimizer",
            "offload_param",
            "deepspeed_config",
            "zero_hpz_partition_size",
            "fsdp",
            "fsdp_shard_degree",
            "fsdp_num_replicas",
            "fsdp_offload_params",
            "timeout",
            "rank_failure_timeout",
        ),
    ),
    FlagGroup(
        "checkpoints",
        "Checkpoints and resume",
        (
            "output_dir",
            "checkpointing_steps",
            "keep_last_n_checkpoints",
            "resume_from_checkpoint",
            "preemption_signals",
        ),
    ),
    FlagGroup(
        "tracking",
        "Tracking and Hub",
        (
            "exp_name",
            "run_name",
            "logging_steps",
            "log_grad_norm",
            "profiling",
            "num_sample_prompts",
            "sample_prompts",
            "sample_max_new_tokens",
            "with_tracking",
            "report_to",
            "wandb_project",
            "wandb_entity",
            "wandb_group_name",
            "push_to_hub",
            "push_checkpoints_to_hub",
            "hf_entity",
            "hf_repo_id",
            "hf_repo_revision",
            "hf_repo_private",
        ),
    ),
    FlagGroup(
        "planning",
        "Planning (--dry_run: check everything, print the plan, exit)",
        (
            "dry_run",
            "dry_run_gpu",
            "dry_run_num_processes",
            "dry_run_num_nodes",
            "dry_run_num_pairs",
            "dry_run_mfu",
        ),
    ),
    FlagGroup(
        "open_instruct",
        "open-instruct compatibility: other spellings of the flags above, and flags with no effect here",
        (
            "dataset_name",
            "dataset_config_name",
            "dataset_mixer",
            "use_fast",
            "concatenated_forward",
            "save_to_hub",
            "do_not_randomize_output_dir",
            "tensor_parallel_degree",
            "context_parallel_degree",
            "cp_degree",
            "transform_fn",
            "cache_mode",
            *NO_EFFECT_HERE,
            *CLUSTER_ONLY,
        ),
    ),
)

GROUP_OF: dict[str, str] = {name: group.key for group in GROUPS for name in group.flags}
