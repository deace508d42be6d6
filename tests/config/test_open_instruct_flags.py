"""open-instruct's DPO flags: each accepted with its type (new ones with open-instruct's default), the rules that map
them onto ours, and real open-instruct launch commands and recipes accepted unchanged by the parser and validation."""

from __future__ import annotations

import pytest

from open_instruct.config import TrainArguments, validate
from open_instruct.config.cli import parse_args
from open_instruct.config.open_instruct_flags import CLUSTER_ONLY, DEFAULTS_THAT_DIFFER
from open_instruct.errors import UserError

BASE = ["--model_name_or_path", "m", "--mixer_list", "d.jsonl", "1.0"]

# Every field of open-instruct's DPOExperimentConfig (and its parents) and TokenizerConfig, main of 2026-08:
# name -> (command-line value tokens, the parsed value). Flags the table gives no value to are booleans given bare.
OPEN_INSTRUCT_FLAGS: dict[str, tuple[list[str], object]] = {
    # ExperimentConfig
    "exp_name": (["run1"], "run1"),
    "run_name": (["r"], "r"),
    "seed": (["7"], 7),
    "data_loader_seed": (["9"], 9),
    # ModelConfig
    "model_name_or_path": (["m2"], "m2"),
    "config_name": (["olmo3_7B"], "olmo3_7B"),
    "attn_implementation": (["sdpa"], "sdpa"),
    "loss_implementation": (["default"], "default"),
    "model_revision": (["main"], "main"),
    "low_cpu_mem_usage": ([], True),
    "rope_scaling_factor": (["4.0"], 4.0),
    "rope_scaling_beta_fast": (["16"], 16.0),
    "rope_scaling_beta_slow": (["2"], 2.0),
    "rope_scaling_old_context_len": (["4096"], 4096),
    # DPOConfig
    "beta": (["5"], 5.0),
    "loss_type": (["dpo"], ["dpo"]),
    "gamma_beta_ratio": (["0.5"], 0.5),
    "label_smoothing": (["0.1"], 0.1),
    "load_balancing_loss": ([], True),
    "load_balancing_weight": (["0.01"], 0.01),
    "concatenated_forward": (["false"], False),
    "packing": (["true"], True),
    # TrainingConfig and DPOTrainingConfig
    "num_epochs": (["2"], 2),
    "per_device_train_batch_size": (["4"], 4),
    "gradient_accumulation_steps": (["8"], 8),
    "learning_rate": (["5e-7"], 5e-7),
    "warmup_ratio": (["0.1"], 0.1),
    "weight_decay": (["0.01"], 0.01),
    "max_grad_norm": (["1.0"], 1.0),
    "max_seq_length": (["4096"], 4096),
    "lr_scheduler_type": (["cosine"], "cosine"),
    "max_train_steps": (["100"], 100),
    "activation_memory_budget": (["0.5"], 0.5),
    "activation_checkpointing_mode": (["selected_modules"], "selected_modules"),
    "activation_checkpointing_modules": (["blocks.*.attention"], ["blocks.*.attention"]),
    "compile_model": (["true"], True),
    "fused_optimizer": (["false"], False),
    "cp_degree": (["1"], 1),
    "cp_strategy": (["zig_zag"], "zig_zag"),
    "use_8bit_optimizer": ([], True),
    "dpo_use_paged_optimizer": ([], True),
    "optimizer_type": (["muon"], "muon"),
    "optimizer_kwargs": (['{"mu": 0.9}'], {"mu": 0.9}),
    "tensor_parallel_degree": (["1"], 1),
    "context_parallel_degree": (["1"], 1),
    "cache_logprobs_only": ([], True),
    "fsdp_shard_degree": (["4"], 4),
    "fsdp_num_replicas": (["2"], 2),
    # DatasetConfig
    "mixer_list": (["a.jsonl", "1.0"], ["a.jsonl", "1.0"]),
    "mixer_list_splits": (["test"], ["test"]),
    "transform_fn": (["preference_tulu_tokenize_and_truncate_v1"], ["preference_tulu_tokenize_and_truncate_v1"]),
    "target_columns": (["chosen_input_ids"], ["chosen_input_ids"]),
    "cache_mode": (["local"], "local"),
    "local_cache_dir": (["cache_here"], "cache_here"),
    "skip_cache": ([], True),
    "cache_dataset_only": ([], True),
    "config_hash": (["abc"], "abc"),
    "hf_entity": (["org"], "org"),
    # LoRAConfig
    "use_lora": ([], True),
    "lora_rank": (["8"], 8),
    "lora_alpha": (["32"], 32.0),
    "lora_dropout": (["0.05"], 0.05),
    # LoggingConfig
    "logging_steps": (["10"], 10),
    "with_tracking": ([], True),
    "wandb_project": (["p"], "p"),
    "wandb_entity": (["e"], "e"),
    "report_to": (["wandb", "tensorboard"], ["wandb", "tensorboard"]),
    "wandb_group_name": (["g"], "g"),
    # HubConfig
    "push_to_hub": (["true"], True),
    "hf_repo_id": (["org/m"], "org/m"),
    "hf_repo_revision": (["b"], "b"),
    "hf_repo_url": (["https://x"], "https://x"),
    # CheckpointConfig
    "output_dir": (["out"], "out"),
    "checkpointing_steps": (["500"], "500"),
    "ephemeral_save_interval": (["-1"], -1),
    "keep_last_n_checkpoints": (["-1"], -1),
    "resume_from_checkpoint": (["ckpt"], "ckpt"),
    # EvalConfig and the AI2-cluster fields of DPOExperimentConfig
    "try_launch_beaker_eval_jobs": (["false"], False),
    "try_auto_save_to_beaker": (["false"], False),
    "gs_bucket_path": (["gs://b"], "gs://b"),
    "oe_eval_tasks": (["mmlu,gsm8k"], ["mmlu,gsm8k"]),
    "oe_eval_max_length": (["32768"], 32768),
    "oe_eval_gpu_multiplier": (["2"], 2),
    "eval_workspace": (["w"], "w"),
    "eval_priority": (["urgent"], "urgent"),
    "hf_metadata_dataset": (["allenai/x"], "allenai/x"),
    "send_slack_alerts": ([], True),
    # DPOExperimentConfig's own
    "do_not_randomize_output_dir": (["true"], True),
    "additional_model_arguments": (['{"rope_theta": 1}'], '{"rope_theta": 1}'),
    "sync_each_batch": ([], True),
    "dataset_name": (["org/prefs"], "org/prefs"),
    "dataset_mixer": (['{"a.jsonl": 0.5}'], {"a.jsonl": 0.5}),
    "dataset_mix_dir": (["mixdir"], "mixdir"),
    "dataset_config_name": (["default"], "default"),
    "max_train_samples": (["1000"], 1000),
    "preprocessing_num_workers": (["16"], 16),
    "overwrite_cache": ([], True),
    "use_qlora": ([], True),
    "timeout": (["600"], 600),
    "save_to_hub": (["org/m"], "org/m"),
    "use_liger_kernel": ([], True),
    "profiling": ([], True),
    "zero_stage": (["3"], 3),
    "offload_optimizer": ([], True),
    "offload_param": ([], True),
    "zero_hpz_partition_size": (["8"], 8),
    # TokenizerConfig
    "tokenizer_name_or_path": (["t"], "t"),
    "tokenizer_revision": (["main"], "main"),
    "trust_remote_code": ([], True),
    "use_fast": (["false"], False),
    "chat_template_name": (["olmo_thinker"], "olmo_thinker"),
    "add_bos": ([], True),
    "get_tokenizer_fn": (["get_tokenizer_tulu_v2_2"], "get_tokenizer_tulu_v2_2"),
    "tokenizer_files_hash": (["h1", "h2"], ["h1", "h2"]),
    "use_slow_tokenizer": ([], True),
    "tokenizer_name": (["t2"], "t2"),
    "ground_truths_key": (["gt"], "gt"),
    "sft_messages_key": (["msgs"], "msgs"),
}
# open-instruct's spellings whose value lands on our field of another name.
FIELD = {"local_cache_dir": "dataset_local_cache_dir", "tokenizer_name": "tokenizer_name_or_path"}

# open-instruct's defaults of the flags new here (flags we had keep ours; see docs/flags.md "Coming from open-instruct").
OPEN_INSTRUCT_DEFAULTS = {
    "run_name": None, "data_loader_seed": None, "config_name": None, "loss_implementation": "default",
    "rope_scaling_factor": None, "rope_scaling_beta_fast": 32, "rope_scaling_beta_slow": 1,
    "rope_scaling_old_context_len": 8192, "concatenated_forward": True, "activation_checkpointing_mode": "budget",
    "compile_model": True, "fused_optimizer": True, "cp_degree": None, "cp_strategy": "llama3",
    "use_8bit_optimizer": False, "dpo_use_paged_optimizer": False, "optimizer_type": "adamw", "optimizer_kwargs": {},
    "tensor_parallel_degree": 1, "context_parallel_degree": 1, "cache_logprobs_only": False,
    "transform_fn": ["preference_tulu_tokenize_and_truncate_v1", "preference_tulu_filter_v1"], "cache_mode": "local",
    "skip_cache": False, "config_hash": None, "report_to": ["all"], "wandb_group_name": None, "hf_repo_url": None,
    "ephemeral_save_interval": None, "try_launch_beaker_eval_jobs": True, "try_auto_save_to_beaker": True,
    "gs_bucket_path": None, "oe_eval_tasks": None, "oe_eval_max_length": 4096, "oe_eval_gpu_multiplier": None,
    "eval_workspace": "ai2/tulu-3-results", "eval_priority": "high", "hf_metadata_dataset": "allenai/tulu-3-evals",
    "send_slack_alerts": False, "do_not_randomize_output_dir": False, "sync_each_batch": False,
    "dataset_name": None, "dataset_mixer": None, "dataset_mix_dir": None, "dataset_config_name": None,
    "overwrite_cache": False, "save_to_hub": None, "profiling": False, "zero_hpz_partition_size": 8,
    "use_fast": True, "get_tokenizer_fn": "get_tokenizer_tulu_v2_2", "tokenizer_files_hash": None,
    "ground_truths_key": "ground_truth", "sft_messages_key": "messages",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OPEN_INSTRUCT_FLAGS))
def test_each_open_instruct_flag_parses_to_its_type(name):
    tokens, expected = OPEN_INSTRUCT_FLAGS[name]
    args = parse_args(BASE + [f"--{name}", *tokens]) if name != "mixer_list" else parse_args([f"--{name}", *tokens])
    value = getattr(args, FIELD.get(name, name))
    assert value == expected and type(value) is type(expected), (value, expected)


def test_new_flags_take_open_instruct_defaults_except_the_listed_ones():
    defaults = TrainArguments(reference_logprobs_cache_path="unused")
    differ = {n: getattr(defaults, n) for n, want in OPEN_INSTRUCT_DEFAULTS.items() if getattr(defaults, n) != want}
    assert differ == {name: ours for name, (ours, _, _) in DEFAULTS_THAT_DIFFER.items()}
    assert {n: OPEN_INSTRUCT_DEFAULTS[n] for n in differ} == {n: t for n, (_, t, _) in DEFAULTS_THAT_DIFFER.items()}


def test_true_by_default_booleans_take_no_prefix_as_open_instruct_parser():
    args = parse_args(BASE + ["--no_try_launch_beaker_eval_jobs", "--no_concatenated_forward"])
    assert args.try_launch_beaker_eval_jobs is False and args.separate_forward is True


def test_cluster_only_options_are_named_in_one_line(capsys):
    parse_args(BASE + ["--oe_eval_tasks", "mmlu", "--eval_priority", "high", "--send_slack_alerts", "--seed", "3"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == [
        "note: --oe_eval_tasks, --eval_priority, --send_slack_alerts: AI2-cluster options, no effect outside that "
        "cluster"
    ]
    assert set(CLUSTER_ONLY) >= {"oe_eval_tasks", "eval_priority", "send_slack_alerts", "gs_bucket_path"}
    parse_args(BASE)
    assert capsys.readouterr().out == ""


# --- the rules that map open-instruct's flags onto ours --------------------------------------------------------


def _validated(argv):
    args = parse_args(argv)
    validate(args)
    return args


def test_dataset_mixer_and_dataset_name_become_the_mixer_list():
    args = _validated(["--model_name_or_path", "m", "--dataset_mixer", '{"a.jsonl": 0.5, "b.jsonl": 100}'])
    assert args.mixer_list == ["a.jsonl", "0.5", "b.jsonl", "100"]
    args = _validated(["--model_name_or_path", "m", "--dataset_name", "org/p", "--dataset_config_name", "v2"])
    assert args.mixer_list == ["org/p:v2", "1.0"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset_name", "org/p", "--mixer_list", "a.jsonl", "1.0"], "--dataset_name, --mixer_list"),
        (["--dataset_name", "org/p", "--dataset_mixer", '{"a.jsonl": 1}'], "--dataset_name, --dataset_mixer"),
        (["--dataset_mixer", '{"a.jsonl": 1}', "--mixer_list", "b.jsonl", "1.0"], "--dataset_mixer, --mixer_list"),
        ([], "one of --mixer_list, --dataset_mixer or --dataset_name"),
        (["--mixer_list", "a.jsonl", "1.0", "--dataset_config_name", "v2"], "--dataset_config_name needs"),
    ],
)
def test_exactly_one_dataset_selection(flags, message):
    with pytest.raises(UserError, match=message):
        _validated(["--model_name_or_path", "m", *flags])


def test_concatenated_forward_false_is_our_separate_forward():
    assert _validated(BASE + ["--concatenated_forward", "false"]).separate_forward is True
    assert _validated(BASE).separate_forward is False


def test_tensor_parallel_degree_shards_with_fsdp2_instead(capsys):
    args = _validated(BASE + ["--fsdp_shard_degree", "4", "--fsdp_num_replicas", "2", "--tensor_parallel_degree", "2"])
    assert (args.fsdp, args.fsdp_shard_degree, args.fsdp_num_replicas, args.tensor_parallel_degree) == (True, 8, 2, 1)
    assert "--tensor_parallel_degree 2: no tensor parallelism here; FSDP2 shards" in capsys.readouterr().out
    args = _validated(BASE + ["--zero_stage", "3", "--tensor_parallel_degree", "2"])
    assert (args.fsdp, args.tensor_parallel_degree) == (False, 1)
    assert "no tensor parallelism here; DeepSpeed ZeRO partitions the weights" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--context_parallel_degree", "--cp_degree"])
def test_context_parallelism_stops_with_what_to_use_instead(flag):
    with pytest.raises(UserError, match=f"{flag} 2: context parallelism is not built here; for long sequences use"):
        _validated(BASE + [flag, "2"])


def test_output_dir_per_experiment_name_when_asked_as_open_instruct():
    args = _validated(BASE + ["--output_dir", "out", "--exp_name", "e", "--do_not_randomize_output_dir", "false"])
    assert args.output_dir == "out/e"
    assert _validated(BASE + ["--output_dir", "out", "--exp_name", "e"]).output_dir == "out"


def test_save_to_hub_and_use_fast_are_our_flags():
    args = _validated(BASE + ["--save_to_hub", "org/m", "--use_fast", "false"])
    assert (args.push_to_hub, args.hf_repo_id, args.use_slow_tokenizer) == (True, "org/m", True)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--transform_fn", "sft_tokenize_v1"], "--transform_fn: only"),
        (["--cache_mode", "hf"], "--cache_mode hf"),
        (["--optimizer_type", "muon", "--zero_stage", "3"], "--optimizer_type muon needs whole weight matrices"),
        (["--optimizer_kwargs", "[1]"], "--optimizer_kwargs must be a JSON object"),
        (["--report_to", "none", "wandb"], "--report_to none cannot be combined"),
        (["--cache_logprobs_only", "--loss_type", "simpo"], "--cache_logprobs_only: this loss needs no reference"),
        (["--zero_hpz_partition_size", "0"], "--zero_hpz_partition_size must be >= 1"),
    ],
)
def test_open_instruct_flag_problems_are_clear_errors(flags, message):
    with pytest.raises(UserError, match=message):
        _validated(BASE + flags)


# --- real open-instruct launch commands and recipes (copied from its repository, main 2026-08) ---------------

TULU3_DPO_8B = """--exp_name tulu3_8b_dpo --model_name_or_path allenai/Llama-3.1-Tulu-3-8B-SFT --model_revision main
--tokenizer_name allenai/Llama-3.1-Tulu-3-8B-SFT --tokenizer_revision main --use_slow_tokenizer
--mixer_list allenai/llama-3.1-tulu-3-8b-preference-mixture 1.0 --max_seq_length 2048 --per_device_train_batch_size 1
--gradient_accumulation_steps 16 --learning_rate 5e-07 --lr_scheduler_type linear --warmup_ratio 0.1
--weight_decay 0.0 --num_epochs 1 --loss_type dpo_norm --beta 5 --gradient_checkpointing --with_tracking
--logging_steps 1 --seed 8"""  # scripts/train/tulu3/dpo_8b.sh
OLMO3_7B_THINK_DPO = """--exp_name sm0922-rsn-dpo --model_name_or_path /weka/ckpt --tokenizer_name /weka/ckpt
--use_slow_tokenizer False --mixer_list scottgeng00/olmo-3-preference-mix-deltas_reasoning-yolo_scottmix-DECON 1.0
--max_seq_length 16384 --per_device_train_batch_size 1 --gradient_accumulation_steps 4 --learning_rate 8e-8
--lr_scheduler_type linear --weight_decay 0.0 --logging_steps 1 --gradient_checkpointing --chat_template_name
olmo_thinker --with_tracking --eval_workspace usable-olmo --eval_priority high --oe_eval_max_length 32768
--oe_eval_gpu_multiplier 2 --max_train_samples 150000 --oe_eval_tasks zebralogic::hamish_zs_reasoning_deepseek,ifeval::hamish_zs_reasoning_deepseek"""  # noqa: E501  scripts/train/olmo3/7b_think_dpo.sh
DEBUG_MULTI_NODE = """--exp_name olmo2-7b-DPO-debug-16k --model_name_or_path allenai/OLMo-2-1124-7B --chat_template_name olmo
--max_seq_length 16384 --per_device_train_batch_size 16 --packing --gradient_accumulation_steps 1 --learning_rate 1e-6
--lr_scheduler_type linear --warmup_ratio 0.1 --weight_decay 0.0 --num_epochs 1 --output_dir output/dpo_olmo2_debug/
--mixer_list allenai/tulu-3-wildchat-reused-on-policy-8b 7680 --seed 123 --logging_steps 1 --loss_type dpo_norm
--beta 5 --activation_memory_budget 0.1 --profiling --with_tracking --push_to_hub false
--try_launch_beaker_eval_jobs false --fsdp_shard_degree 4 --fsdp_num_replicas 2 --tensor_parallel_degree 2
--try_auto_save_to_beaker false"""  # scripts/train/debug/dpo/multi_node.sh (open_instruct/dpo.py)
HYBRID_CACHE = """--exp_name hybrid-7b-DPO-test --model_name_or_path allenai/Olmo-Hybrid-Instruct-DPO-7B --trust_remote_code
--mixer_list allenai/tulu-3-wildchat-reused-on-policy-8b 7680 --max_seq_length 16384 --per_device_train_batch_size 1
--gradient_accumulation_steps 4 --zero_hpz_partition_size 1 --learning_rate 1e-6 --lr_scheduler_type linear
--warmup_ratio 0.1 --weight_decay 0.0 --num_epochs 1 --logging_steps 1 --loss_type dpo_norm --beta 5 --packing
--activation_memory_budget 0.5 --chat_template_name olmo123 --with_tracking --push_to_hub false
--try_launch_beaker_eval_jobs false --try_auto_save_to_beaker false"""  # scripts/train/debug/dpo/multi_node_hybrid.sh
DGX_SPARK = """--exp_name spark_dpo_qwen3_ultrafeedback --model_name_or_path Qwen/Qwen3-0.6B --tokenizer_name Qwen/Qwen3-0.6B
--max_seq_length 1024 --per_device_train_batch_size 4 --gradient_accumulation_steps 16 --learning_rate 5e-7
--lr_scheduler_type linear --warmup_ratio 0.1 --weight_decay 0.0 --num_train_epochs 1 --logging_steps 10
--mixer_list argilla/ultrafeedback-binarized-preferences-cleaned 1.0 --add_bos --loss_type dpo_norm --beta 5
--seed 42 --output_dir /tmp/dpo_qwen3_ultrafeedback --gradient_checkpointing --report_to wandb --with_tracking
--try_launch_beaker_eval_jobs false"""  # scripts/train/dgx-spark/dpo_ultrafeedback.sh

OLMO2_7B_DPO_YAML = """model_name_or_path: allenai/OLMo-2-1124-7B-SFT
gradient_checkpointing: true
dataset_mixer:
    allenai/olmo-2-1124-13b-preference-mix: 1.0
tokenizer_name: allenai/OLMo-2-1124-7B-SFT
use_slow_tokenizer: false
max_seq_length: 2048
preprocessing_num_workers: 16
per_device_train_batch_size: 1
gradient_accumulation_steps: 4 # designed for 32 GPUs, so batch size 128
learning_rate: 5.0e-7
lr_scheduler_type: linear
warmup_ratio: 0.1
weight_decay: 0.0
num_epochs: 1
output_dir: output/dpo_7b
with_tracking: true
logging_steps: 1
use_lora: false
loss_type: dpo_norm
beta: 5
checkpointing_steps: 1000
hf_metadata_dataset: allenai/olmo-instruct-evals
add_bos: true
"""  # configs/train_configs/olmo2/olmo2_1124_7b_dpo.yaml
SIMPO_YAML = """model_name_or_path: /model
model_revision: main
gradient_checkpointing: true
tokenizer_name: /model
use_slow_tokenizer: true
dataset_name: princeton-nlp/llama3-ultrafeedback-armorm
max_seq_length: 2048
preprocessing_num_workers: 16
per_device_train_batch_size: 1
gradient_accumulation_steps: 16 # designed for 8 GPUs, so batch size 128
learning_rate: 5.0e-7
lr_scheduler_type: linear
warmup_ratio: 0.1
weight_decay: 0.0
num_epochs: 1
output_dir: /output
with_tracking: true
logging_steps: 1
use_lora: false
loss_type: simpo
gamma_beta_ratio: 0.3
beta: 10
"""  # configs/train_configs/dpo/tulu3_preview_test_simpo.yaml


@pytest.mark.parametrize(
    ("command", "checks"),
    [
        (TULU3_DPO_8B, {"gradient_accumulation_steps": 16, "seed": 8, "use_slow_tokenizer": True}),
        (OLMO3_7B_THINK_DPO, {"chat_template_name": "olmo_thinker", "use_slow_tokenizer": False}),
        (DEBUG_MULTI_NODE, {"fsdp": True, "fsdp_shard_degree": 8, "packing": True, "profiling": True}),
        (HYBRID_CACHE, {"chat_template_name": "olmo123", "zero_hpz_partition_size": 1, "push_to_hub": False}),
        (DGX_SPARK, {"report_to": ["wandb"], "num_epochs": 1, "add_bos": True}),
    ],
)
def test_real_open_instruct_commands_are_accepted(command, checks):
    args = _validated(command.split())
    assert {name: getattr(args, name) for name in checks} == checks


@pytest.mark.parametrize(
    ("recipe", "checks"),
    [
        (OLMO2_7B_DPO_YAML, {"mixer_list": ["allenai/olmo-2-1124-13b-preference-mix", "1.0"], "add_bos": True}),
        (SIMPO_YAML, {"mixer_list": ["princeton-nlp/llama3-ultrafeedback-armorm", "1.0"], "loss_type": ["simpo"]}),
    ],
)
def test_real_open_instruct_recipes_are_accepted(tmp_path, recipe, checks):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    args = _validated([str(path)])
    assert {name: getattr(args, name) for name in checks} == checks
