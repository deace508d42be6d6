"""Where each flag's effect is shown: one entry per ``TrainArguments`` field, read by ``tests/config/test_flag_walk.py``.

The test walks every field of the dataclass, so a new flag without an entry here fails it by name. An entry says how
its effect is observed against a baseline run's settings, cheaply:

- ``Effect(probe, value, context)``: with ``context`` flags on both sides, adding ``--flag value`` changes what the
  probe computes with the project's own code: ``loss`` (the combined loss of fixed log-probs), ``setup`` (optimizer,
  schedule and step counts from ``recipe.prepare_training``), ``data`` (the prepared pairs), ``batches`` (the training
  loader's batches), ``model`` (the loaded model), ``engine`` (the selected engine and its DeepSpeed config),
  ``tokenizer`` (its class and the lines it prints), ``signals`` (the stop signals), ``run`` (one short training run's
  files and metrics, for the few flags only a run shows).
- ``TestedIn(test)``: a test elsewhere asserts the effect and is too costly to repeat (a Hub upload, a GPU kernel, a
  resume); the walk checks that the test exists and names the flag.
- ``RuleOnly(value)``: only its ``FLAG_RULES`` line can be shown here (its effect needs the Hub or several processes).
- ``Inert(value)``: an open-instruct option with nothing to do here (``CLUSTER_ONLY`` / ``NO_EFFECT_HERE`` in
  ``open_instruct/config/open_instruct_flags.py``); given, it is named in the one ``note:`` line the parser prints.

A flag with a ``FLAG_RULES`` entry is also given without what it needs, and its error or note must appear.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Effect:
    probe: str
    value: tuple[str, ...]
    context: tuple[str, ...] = ()


@dataclass(frozen=True)
class TestedIn:
    __test__ = False  # a name pytest would otherwise collect
    test: str
    value: tuple[str, ...] = ()  # for a flag with a FLAG_RULES entry: a value to give it without what it needs


@dataclass(frozen=True)
class RuleOnly:
    value: tuple[str, ...]


@dataclass(frozen=True)
class Inert:
    value: tuple[str, ...]


def _e(probe: str, value: str, *context: str) -> Effect:
    return Effect(probe, tuple(value.split()), tuple(" ".join(context).split()))


EFFECTS: dict[str, Effect | TestedIn | RuleOnly | Inert] = {
    # --- loss hyperparameters (LossSettings) ---
    "beta": _e("loss", "0.5"),
    "label_smoothing": _e("loss", "0.2", "--loss_type dpo"),
    "gamma_beta_ratio": _e("loss", "0.9", "--loss_type simpo"),
    "nll_loss_weight": _e("loss", "1.0"),
    "f_divergence_type": _e("loss", "forward_kl", "--loss_type dpo"),
    "f_alpha_divergence_coef": _e("loss", "0.2", "--loss_type dpo --f_divergence_type alpha_divergence"),
    "discopop_tau": _e("loss", "0.5", "--loss_type discopop"),
    "ld_alpha": TestedIn("tests/objectives/test_losses_trl.py::test_model_level_matches_trl_dpo_trainer"),
    "use_weighting": _e("loss", "true", "--loss_type dpo"),
    "loss_type": _e("loss", "ipo"),
    "loss_weights": _e("loss", "1.0 0.25", "--loss_type dpo ipo"),
    "reference_free": _e("loss", "true", "--loss_type dpo"),
    # --- experiment ---
    "exp_name": TestedIn("tests/report/test_hub.py::test_repo_id_resolution", ("myrun",)),
    "seed": _e("batches", "7"),
    "output_dir": _e("run", "OTHER_DIR"),
    "logging_steps": _e("run", "2"),
    "checkpointing_steps": _e("run", "1"),
    "keep_last_n_checkpoints": _e("run", "1", "--checkpointing_steps 1"),
    "resume_from_checkpoint": TestedIn(
        "tests/runs/test_fault_tolerance.py::test_resume_with_changed_batch_settings_is_refused"
    ),
    "preemption_signals": _e("signals", "SIGUSR1"),
    "skip_nonfinite_batches": TestedIn(
        "tests/runs/test_fault_tolerance.py::test_skip_nonfinite_batches_tolerates_and_counts"
    ),
    "with_tracking": TestedIn("tests/report/test_hub.py::test_wandb_offline_run_holds_config_and_every_metric"),
    "wandb_project": TestedIn(
        "tests/report/test_hub.py::test_wandb_offline_run_holds_config_and_every_metric", ("proj",)
    ),
    "wandb_entity": RuleOnly(("team",)),
    "push_to_hub": TestedIn("tests/report/test_hub.py::test_push_to_hub_uploads_the_final_model_privately"),
    "push_checkpoints_to_hub": TestedIn(
        "tests/runs/test_hub_resume.py::test_killed_run_resumes_from_the_hub_on_an_empty_disk", ("true",)
    ),
    "hf_entity": TestedIn("tests/report/test_hub.py::test_repo_id_resolution", ("org",)),
    "hf_repo_id": TestedIn("tests/report/test_hub.py::test_repo_id_resolution", ("org/x",)),
    "hf_repo_revision": TestedIn(
        "tests/report/test_hub.py::test_push_to_hub_uploads_the_final_model_privately", ("dev",)
    ),
    "hf_repo_private": RuleOnly(("false",)),
    # --- model ---
    "model_name_or_path": _e("model", "OTHER_MODEL"),
    "model_revision": RuleOnly(("main",)),
    "tokenizer_name_or_path": _e("data", "OTHER_TOKENIZER"),
    "tokenizer_revision": RuleOnly(("main",)),
    "use_slow_tokenizer": _e("tokenizer", "true"),
    "trust_remote_code": TestedIn("tests/model/test_modeling.py::test_trust_remote_code_gates_custom_model_code"),
    "attn_implementation": _e("model", "eager"),
    "low_cpu_mem_usage": RuleOnly(("true",)),
    "additional_model_arguments": _e("model", '{"rms_norm_eps":0.001}'),
    "mixed_precision": _e("engine", "bf16"),
    "gradient_checkpointing": _e("model", "true"),
    "activation_memory_budget": _e("model", "0.5"),
    "use_liger_kernel": TestedIn(
        "tests/objectives/test_losses.py::test_cli_wpo_with_nll_separate_forward_and_liger_fallback"
    ),
    "use_lora": _e("model", "true"),
    "use_qlora": TestedIn("tests/model/test_modeling.py::test_qlora_without_cuda_fails_before_any_work"),
    "lora_rank": _e("model", "4", "--use_lora"),
    "lora_alpha": _e("model", "4", "--use_lora"),
    "lora_dropout": _e("model", "0.3", "--use_lora"),
    "lora_target_modules": _e("model", "q_proj", "--use_lora"),
    "merge_lora": TestedIn("tests/model/test_lora.py::test_lora_cli_run_saves_adapter_and_merged_model", ("true",)),
    "load_balancing_loss": TestedIn("tests/model/test_moe.py::test_moe_cli_run_logs_aux_loss"),
    "load_balancing_weight": TestedIn(
        "tests/model/test_moe.py::test_aux_loss_is_logged_and_changes_the_gradient", ("0.1",)
    ),
    # --- data ---
    "mixer_list": _e("data", "TRAIN_FILE 8"),
    "mixer_list_splits": _e("data", "test", "--mixer_list DATA_DIR 1.0"),
    "eval_mixer_list": _e("data", "TEST_FILE 1.0"),
    "eval_mixer_list_splits": _e("data", "train", "--eval_mixer_list DATA_DIR 1.0"),
    "eval_fraction": _e("data", "0.25"),
    "eval_steps": TestedIn(
        "tests/training/test_evaluation.py::test_eval_metrics_at_every_eval_step_and_the_end", ("2",)
    ),
    "sample_prompts": TestedIn(
        "tests/training/test_samples.py::test_the_start_answer_is_the_untouched_models_greedy_answer"
    ),
    "num_sample_prompts": TestedIn(
        "tests/training/test_samples.py::test_no_samples_and_the_same_losses_with_sampling_off"
    ),
    "sample_max_new_tokens": TestedIn(
        "tests/training/test_samples.py::test_rows_at_start_each_evaluation_and_the_end"
    ),
    "dataset_format": TestedIn("tests/data/test_formats.py::test_detection_and_explicit_override"),
    "skip_invalid_rows": TestedIn(
        "tests/data/test_formats.py::test_invalid_rows_error_names_dataset_row_and_reason_and_counts_all"
    ),
    "chat_template_name": _e("data", "chatml"),
    "add_bos": _e("data", "true"),
    "max_seq_length": _e("data", "24"),
    "max_response_length": _e("data", "3"),
    "max_train_samples": _e("data", "5"),
    "cache_dataset_only": TestedIn(
        "tests/data/test_prepare.py::test_cache_dataset_only_prepares_and_exits_without_a_model"
    ),
    "dataset_local_cache_dir": _e("data", "OTHER_DIR"),
    "preprocessing_num_workers": TestedIn(
        "tests/data/test_streaming.py::test_workers_give_identical_bytes_and_share_the_cache_key"
    ),
    "reference_logprobs_cache_path": _e("run", "OTHER_DIR"),
    "packing": _e("batches", "false"),
    "share_prompt": _e("batches", "false"),
    "max_tokens_per_batch": _e("batches", "40"),
    "max_tokens_per_forward": TestedIn("tests/training/test_forward_passes.py::test_cli_passes_train_the_same_model"),
    "group_by_length": _e("batches", "true", "--packing false"),
    "reference_batch_size": TestedIn(
        "tests/runs/test_fault_tolerance.py::test_kill_during_reference_pass_leaves_no_cache_file", ("4",)
    ),
    # --- optimisation ---
    "per_device_train_batch_size": _e("setup", "2"),
    "gradient_accumulation_steps": _e("setup", "2"),
    "learning_rate": _e("setup", "3e-4"),
    "lr_scheduler_type": _e("setup", "cosine", "--warmup_ratio 0"),
    "warmup_ratio": _e("setup", "0.5"),
    "warmup_steps": _e("setup", "3"),
    "weight_decay": _e("setup", "0.1"),
    "max_grad_norm": _e("engine", "1.0", "--zero_stage 2"),
    "num_epochs": _e("setup", "2"),
    "max_train_steps": _e("setup", "2"),
    "separate_forward": TestedIn("tests/objectives/test_logprobs.py::test_separate_forward_matches_concatenated"),
    "logprob_chunk_size": TestedIn("tests/runs/test_lora_zero3.py::test_lora_zero3_two_processes_match_one_process"),
    # --- distributed ---
    "zero_stage": _e("engine", "2"),
    "offload_optimizer": _e("engine", "true", "--zero_stage 2"),
    "offload_param": _e("engine", "true", "--zero_stage 3"),
    "deepspeed_config": _e("engine", "configs/ds_configs/stage3_no_offloading_accelerate.conf"),
    "fsdp": _e("engine", "true"),
    "fsdp_shard_degree": _e("engine", "1"),
    "fsdp_num_replicas": _e("engine", "1"),
    "fsdp_offload_params": _e("engine", "true"),
    "timeout": RuleOnly(("60",)),
    "rank_failure_timeout": TestedIn(
        "tests/runs/test_faults_ranks.py::test_exception_on_one_rank_stops_both_naming_it"
    ),
    "dry_run": TestedIn("tests/plan/test_plan.py::test_python_api_plans_without_writing"),
    "dry_run_gpu": TestedIn("tests/plan/test_plan.py::test_dry_run_mfu_scales_the_predicted_time", ("H200",)),
    "dry_run_num_processes": TestedIn("tests/plan/test_plan.py::test_dry_run_mfu_scales_the_predicted_time", ("8",)),
    "dry_run_num_nodes": TestedIn("tests/plan/test_plan.py::test_planning_flags_need_dry_run", ("2",)),
    "dry_run_num_pairs": TestedIn("tests/plan/test_plan.py::test_dry_run_mfu_scales_the_predicted_time", ("100",)),
    "dry_run_mfu": TestedIn("tests/plan/test_plan.py::test_dry_run_mfu_scales_the_predicted_time", ("0.5",)),
    # --- open-instruct's flags (open_instruct/config/open_instruct_flags.py) ---
    "run_name": TestedIn("tests/runs/test_modern_llm.py::test_documented_dpo_example_runs_as_written"),
    "do_not_randomize_output_dir": TestedIn(
        "tests/config/test_open_instruct_flags.py::test_output_dir_per_experiment_name_when_asked_as_open_instruct"
    ),
    "report_to": TestedIn("tests/config/test_open_instruct_effects.py::test_reporting_flags_in_one_run"),
    "log_grad_norm": TestedIn("tests/config/test_open_instruct_effects.py::test_reporting_flags_in_one_run"),
    "profiling": TestedIn("tests/config/test_open_instruct_effects.py::test_reporting_flags_in_one_run"),
    "config_name": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_config_name_and_rope_scaling_shape_the_model"
    ),
    "rope_scaling_factor": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_config_name_and_rope_scaling_shape_the_model"
    ),
    "use_fast": TestedIn("tests/config/test_open_instruct_flags.py::test_save_to_hub_and_use_fast_are_our_flags"),
    "dataset_name": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_dataset_config_name_reaches_the_hub_loader"
    ),
    "dataset_config_name": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_dataset_config_name_reaches_the_hub_loader"
    ),
    "dataset_mixer": TestedIn(
        "tests/config/test_open_instruct_flags.py::test_dataset_mixer_and_dataset_name_become_the_mixer_list"
    ),
    "dataset_mix_dir": TestedIn("tests/config/test_open_instruct_effects.py::test_reporting_flags_in_one_run"),
    "overwrite_cache": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_overwrite_and_skip_cache_prepare_again"
    ),
    "skip_cache": TestedIn("tests/config/test_open_instruct_effects.py::test_overwrite_and_skip_cache_prepare_again"),
    "transform_fn": TestedIn("tests/config/test_open_instruct_flags.py::test_save_to_hub_and_use_fast_are_our_flags"),
    "cache_mode": TestedIn("tests/config/test_open_instruct_flags.py::test_save_to_hub_and_use_fast_are_our_flags"),
    "optimizer_type": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_muon_takes_the_decoder_matrices_and_adamw_the_rest"
    ),
    "optimizer_kwargs": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_adamw_takes_optimizer_kwargs_and_rejects_unknown_ones"
    ),
    "use_8bit_optimizer": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_bitsandbytes_optimizers_stop_before_any_work_without_cuda"
    ),
    "dpo_use_paged_optimizer": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_bitsandbytes_optimizers_stop_before_any_work_without_cuda"
    ),
    "sync_each_batch": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_sync_each_batch_never_skips_the_gradient_sync"
    ),
    "concatenated_forward": TestedIn(
        "tests/config/test_open_instruct_flags.py::test_concatenated_forward_false_is_our_separate_forward"
    ),
    "compile_model": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_compile_model_compiles_each_decoder_layer_in_place"
    ),
    "activation_checkpointing_mode": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_selected_modules_checkpoints_every_decoder_layer"
    ),
    "cache_logprobs_only": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_cache_logprobs_only_through_the_dpo_py_entry"
    ),
    "zero_hpz_partition_size": TestedIn(
        "tests/config/test_open_instruct_effects.py::test_zero_hpz_partition_size_goes_into_the_zero3_config"
    ),
    "tensor_parallel_degree": TestedIn(
        "tests/config/test_open_instruct_flags.py::test_tensor_parallel_degree_shards_with_fsdp2_instead"
    ),
    "context_parallel_degree": TestedIn(
        "tests/config/test_open_instruct_flags.py::test_tensor_parallel_degree_shards_with_fsdp2_instead"
    ),
    "cp_degree": TestedIn(
        "tests/config/test_open_instruct_flags.py::test_tensor_parallel_degree_shards_with_fsdp2_instead"
    ),
    "save_to_hub": TestedIn("tests/config/test_open_instruct_flags.py::test_save_to_hub_and_use_fast_are_our_flags"),
    "loss_implementation": Inert(("x",)),
    "tokenizer_files_hash": Inert(("abc",)),
    "ground_truths_key": Inert(("gt",)),
    "sft_messages_key": Inert(("m",)),
    "target_columns": Inert(("a",)),
    "config_hash": Inert(("h",)),
    "ephemeral_save_interval": Inert(("10",)),
    "hf_repo_url": Inert(("https://x",)),
    "activation_checkpointing_modules": Inert(("mlp",)),
    "get_tokenizer_fn": Inert(("get_tokenizer_tulu_v1",)),
    "cp_strategy": Inert(("ulysses",)),
    "try_launch_beaker_eval_jobs": Inert(("false",)),
    "try_auto_save_to_beaker": Inert(("false",)),
    "gs_bucket_path": Inert(("gs://b",)),
    "oe_eval_tasks": Inert(("mmlu",)),
    "oe_eval_max_length": Inert(("2048",)),
    "oe_eval_gpu_multiplier": Inert(("2",)),
    "eval_workspace": Inert(("w",)),
    "eval_priority": Inert(("low",)),
    "hf_metadata_dataset": Inert(("d",)),
    "send_slack_alerts": Inert(("true",)),
    "wandb_group_name": RuleOnly(("grp",)),
    "fused_optimizer": _e("setup", "false"),
    "data_loader_seed": _e("batches", "7"),
    "rope_scaling_beta_fast": _e("model", "16.0", "--rope_scaling_factor 2.0"),
    "rope_scaling_beta_slow": _e("model", "2.0", "--rope_scaling_factor 2.0"),
    "rope_scaling_old_context_len": _e("model", "1024", "--rope_scaling_factor 2.0"),
}
