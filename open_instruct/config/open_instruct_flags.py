"""The flags of allenai/open-instruct's DPO config (``DPOExperimentConfig`` and ``TokenizerConfig``) that our own
flags in :mod:`open_instruct.config.arguments` do not already cover, as a dataclass mixin of ``TrainArguments``.

Names, types and defaults follow open-instruct so its launch scripts and YAML recipes run unchanged. Defaults that
differ here (and why) are listed in :data:`DEFAULTS_THAT_DIFFER`; options that only mean something on AI2's own
cluster are in :data:`CLUSTER_ONLY`: accepted, and named in one printed line saying they have no effect here.
What each flag does is resolved in :mod:`open_instruct.config.compat` and the module its help names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from open_instruct.config.fields import POS
from open_instruct.config.fields import flag as _f
from open_instruct.ranges import Range

_NO_EFFECT = "AI2-cluster option: accepted, no effect outside that cluster."
REPORT_TO = ("all", "none", "wandb", "tensorboard")
OPTIMIZERS = ("adamw", "muon")
# open-instruct's olmo-core block names; on Hugging Face models "selected_modules" checkpoints every decoder layer.
_OLMO_CORE_BLOCKS = [
    "blocks.*.attention_norm",
    "blocks.*.attention",
    "blocks.*.attention_residual_stream",
    "blocks.*.feed_forward_norm",
    "blocks.*.feed_forward",
    "blocks.*.feed_forward_residual_stream",
]


@dataclass
class OpenInstructFlags:
    """open-instruct's DPO flags beyond ours (see the module docstring)."""

    # --- experiment and logging -------------------------------------------------------------------------------
    run_name: str | None = _f(None, "Tracker run name (default: --exp_name).")
    data_loader_seed: int | None = _f(None, "Seed of the DPO training data order (default: --seed).", valid=Range(0))
    do_not_randomize_output_dir: bool = _f(
        True,
        "Write into --output_dir as given. false (open-instruct's default): write into <output_dir>/<exp_name>.",
    )
    report_to: list[str] = _f(
        ["all"],
        "Trackers --with_tracking sends metrics to: wandb, tensorboard (<output_dir>/tensorboard), all (both), none.",
        choices=REPORT_TO,
    )
    wandb_group_name: str | None = _f(None, "wandb group of the run.")
    log_grad_norm: bool = _f(False, "Log the gradient norm (before clipping) as grad_norm at each logged step.")
    profiling: bool = _f(
        False, "Trace a few optimizer steps with the torch profiler into <output_dir>/profile (path printed)."
    )

    # --- model and tokenizer ----------------------------------------------------------------------------------
    config_name: str | None = _f(
        None,
        "A model config (folder or hub id) to build the model with instead of the checkpoint's own config.json; an "
        "olmo-core config name (open-instruct's dpo.py, e.g. olmo3_7B) is noted and the checkpoint's config used.",
    )
    loss_implementation: str = _f("default", "olmo-core's LM loss kernel; DPO computes its loss itself (no effect).")
    rope_scaling_factor: float | None = _f(
        None, "YaRN RoPE scaling factor (sets the model config's rope_scaling).", valid=Range(0, low_open=True)
    )
    rope_scaling_beta_fast: float = _f(32.0, "YaRN beta_fast.", valid=Range(0, low_open=True))
    rope_scaling_beta_slow: float = _f(1.0, "YaRN beta_slow.", valid=Range(0, low_open=True))
    rope_scaling_old_context_len: int = _f(8192, "YaRN original context length.", valid=POS)
    use_fast: bool = _f(True, "Use the fast tokenizer (false: the slow one, as --use_slow_tokenizer).")
    get_tokenizer_fn: str = _f(
        "get_tokenizer_tulu_v2_2",
        "open-instruct's tokenizer loader; ours behaves as get_tokenizer_tulu_v2_2 (pad token added if missing).",
        choices=(
            "get_tokenizer_simple_v1",
            "get_tokenizer_tulu_v1",
            "get_tokenizer_tulu_v2_1",
            "get_tokenizer_tulu_v2_2",
        ),
    )
    tokenizer_files_hash: list[str] | None = _f(None, "Recorded by open-instruct for tracking; ignored as input.")
    ground_truths_key: str = _f("ground_truth", "RL column name in open-instruct; unused by DPO.")
    sft_messages_key: str = _f("messages", "SFT column name in open-instruct; unused by DPO.")

    # --- data -------------------------------------------------------------------------------------------------
    dataset_name: str | None = _f(
        None, "One hub dataset (or local path) to train on, all of it: another way to give --mixer_list."
    )
    dataset_config_name: str | None = _f(None, "The hub configuration of --dataset_name.")
    dataset_mixer: dict | str | None = _f(
        None, "Mapping (JSON on the command line) of dataset -> amount: another way to give --mixer_list."
    )
    dataset_mix_dir: str | None = _f(None, "Also save the mixed, tokenized training pairs here (JSONL).")
    overwrite_cache: bool = _f(False, "Prepare the data again and replace its cache entry.")
    skip_cache: bool = _f(False, "Do not load a prepared-data cache entry: prepare again (the entry is rewritten).")
    transform_fn: list[str] = _f(
        ["preference_tulu_tokenize_and_truncate_v1", "preference_tulu_filter_v1"],
        "open-instruct's transform pipeline; ours is that pipeline (other values are an error).",
    )
    target_columns: list[str] = _f(
        [
            "chosen_input_ids",
            "chosen_labels",
            "chosen_attention_mask",
            "rejected_input_ids",
            "rejected_labels",
            "rejected_attention_mask",
        ],
        "Columns open-instruct keeps after tokenizing; ours keeps these (ids and labels).",
    )
    cache_mode: str = _f("local", "Prepared-data cache: local (ours); hf (a Hub dataset repo) is not supported.")
    config_hash: str | None = _f(None, "open-instruct's precomputed dataset-cache hash; ours hashes the inputs.")

    # --- optimisation -----------------------------------------------------------------------------------------
    optimizer_type: str = _f(
        "adamw",
        "adamw, or muon (torch.optim.Muon on the 2-D weight matrices of the decoder layers; embeddings, output "
        "layer, norms and biases stay on AdamW).",
        choices=OPTIMIZERS,
    )
    optimizer_kwargs: dict | str = _f({}, 'JSON of extra optimizer arguments, e.g. {"betas": [0.9, 0.95]}.')
    use_8bit_optimizer: bool = _f(False, "bitsandbytes 8-bit AdamW (needs CUDA and bitsandbytes).")
    dpo_use_paged_optimizer: bool = _f(False, "bitsandbytes paged AdamW (needs CUDA and bitsandbytes).")
    fused_optimizer: bool = _f(True, "Fused AdamW kernel (CUDA and CPU; not under CPU offload).")
    sync_each_batch: bool = _f(
        False, "Synchronize gradients on every micro-batch under accumulation (less memory, more communication)."
    )
    concatenated_forward: bool = _f(True, "Chosen and rejected in one forward; false: --separate_forward.")
    compile_model: bool = _f(False, "torch.compile each decoder layer (open-instruct's default is true).")
    activation_checkpointing_mode: str = _f(
        "budget",
        "budget: checkpointing when --activation_memory_budget < 1; selected_modules: checkpoint every decoder layer.",
        choices=("budget", "selected_modules"),
    )
    activation_checkpointing_modules: list[str] = _f(
        _OLMO_CORE_BLOCKS, "olmo-core block globs; on Hugging Face models every decoder layer is checkpointed."
    )
    cache_logprobs_only: bool = _f(False, "Build the reference log-prob cache, then exit.")

    # --- distributed ------------------------------------------------------------------------------------------
    zero_hpz_partition_size: int | None = _f(
        None,
        "ZeRO++ hierarchical partitioning: ranks holding a secondary copy of the ZeRO-3 weights (usually the GPUs "
        "of one node); written into the ZeRO-3 config. open-instruct always writes 8.",
        valid=POS,
    )
    tensor_parallel_degree: int = _f(
        1,
        "No tensor parallelism here: a degree > 1 shards the weights with FSDP2 over that many more ranks instead "
        "(--fsdp_shard_degree x degree); each rank then takes its own micro-batch (the run prints the global batch).",
        valid=POS,
    )
    context_parallel_degree: int = _f(1, "Context parallelism (only 1 here).", valid=POS)
    cp_degree: int | None = _f(None, "olmo-core context parallelism (only unset or 1 here).", valid=POS)
    cp_strategy: str = _f("llama3", "olmo-core context-parallel strategy.", choices=("llama3", "zig_zag", "ulysses"))

    # --- checkpoints and hub ----------------------------------------------------------------------------------
    ephemeral_save_interval: int | None = _f(
        None, "olmo-core temporary checkpoints; ours keep the last N (no effect).", valid=POS
    )
    hf_repo_url: str | None = _f(None, "Set by open-instruct after a push; ignored as input.")
    save_to_hub: str | None = _f(None, "Push the final model to this Hub repo (same as --push_to_hub --hf_repo_id).")

    # --- AI2-cluster only ---------------------------------------------------------------------------------------
    try_launch_beaker_eval_jobs: bool = _f(True, _NO_EFFECT)
    try_auto_save_to_beaker: bool = _f(True, _NO_EFFECT)
    gs_bucket_path: str | None = _f(None, _NO_EFFECT)
    oe_eval_tasks: list[str] | None = _f(None, _NO_EFFECT)
    oe_eval_max_length: int = _f(4096, _NO_EFFECT, valid=POS)
    oe_eval_gpu_multiplier: int | None = _f(None, _NO_EFFECT, valid=POS)
    eval_workspace: str | None = _f("ai2/tulu-3-results", _NO_EFFECT)
    eval_priority: str | None = _f("high", _NO_EFFECT)
    hf_metadata_dataset: str | None = _f("allenai/tulu-3-evals", _NO_EFFECT)
    send_slack_alerts: bool = _f(False, _NO_EFFECT)


CLUSTER_ONLY: tuple[str, ...] = (
    "try_launch_beaker_eval_jobs",
    "try_auto_save_to_beaker",
    "gs_bucket_path",
    "oe_eval_tasks",
    "oe_eval_max_length",
    "oe_eval_gpu_multiplier",
    "eval_workspace",
    "eval_priority",
    "hf_metadata_dataset",
    "send_slack_alerts",
)

# Accepted for open-instruct's scripts, recorded in run_config.json, with nothing to do in this engine (the printed
# notice names them too, so nothing is silently ignored).
NO_EFFECT_HERE: tuple[str, ...] = (
    "loss_implementation",
    "tokenizer_files_hash",
    "ground_truths_key",
    "sft_messages_key",
    "target_columns",
    "config_hash",
    "ephemeral_save_interval",
    "hf_repo_url",
    "activation_checkpointing_modules",
    "get_tokenizer_fn",
    "cp_strategy",
)

# New flags whose default here is not open-instruct's: name -> (ours, theirs, why).
DEFAULTS_THAT_DIFFER: dict[str, tuple[Any, Any, str]] = {
    "compile_model": (False, True, "compiling costs minutes up front; turn it on for long runs"),
    "do_not_randomize_output_dir": (True, False, "--output_dir is used as given, as our own scripts expect"),
    "zero_hpz_partition_size": (None, 8, "8 needs 8 ranks per node; set it to the GPUs of one node"),
}
