"""``--help`` of every stage: a short usage line, one line per flag with its default, the flags in the groups of
:mod:`open_instruct.config.help_groups` (groups a stage has no flag of are left out), a closing pointer to the docs.

A flag's line is ``--name METAVAR  what it does (default D; also --alias)``: the text is the flag's ``short`` entry
here when its help is long, else its help's first sentence; the default is the help's ``(default: ...)`` when it
says one (the field's default is then a placeholder such as None), else the field's default.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from open_instruct.config.fields import base_type, field_default
from open_instruct.config.help_groups import GROUPS
from open_instruct.config.open_instruct_flags import _NO_EFFECT
from open_instruct.config.stage_flags import DPO_ONLY, NOT_FOR_PRETRAINING

NAME_WIDTH = 33  # the flag column; a longer name pushes its text right instead of wrapping
DOCS = "docs/flags.md for every flag's rules, aliases and YAML form; README for a first run"

_REFERENCE = ("reference_logprobs_cache_path",)  # accepted by every stage (a shared recipe), read by DPO only
# stage -> (one-line intro, flags the stage rejects: not listed in its help)
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "dpo": ("DPO with a cached reference model. A YAML recipe sets flags; flags given after it override them.", ()),
    "sft": (
        "Supervised fine-tuning on chat data. A YAML recipe sets flags; flags given after it override them.",
        (*DPO_ONLY, *_REFERENCE),
    ),
    "pretrain": (
        "Pretraining on raw text (--text_column NAME, default text). A YAML recipe sets flags; flags override it.",
        (*NOT_FOR_PRETRAINING, *_REFERENCE),
    ),
}

METAVARS = {
    "model_name_or_path": "M",
    "tokenizer_name_or_path": "T",
    "mixer_list": "DATA AMOUNT ...",
    "eval_mixer_list": "DATA AMOUNT ...",
    "learning_rate": "LR",
    "output_dir": "DIR",
    "resume_from_checkpoint": "DIR",
    "deepspeed_config": "FILE",
    "checkpointing_steps": "N|epoch",
    "reference_logprobs_cache_path": "DIR",
    "dataset_local_cache_dir": "DIR",
    "dataset_mix_dir": "DIR",
    "sample_prompts": "FILE",
}

# One-line texts for flags whose help is too long for one line (the full text stays in the field's help).
SHORT = {
    "attn_implementation": "attention kernel: flash_attention_2, sdpa, eager, ...",
    "packing": "padding-free: sequences end to end in one row",
    "share_prompt": "packed rows hold each pair's prompt once",
    "max_tokens_per_batch": "token budget per micro-batch, instead of a fixed number of pairs",
    "max_tokens_per_forward": "token budget of one forward/backward pass",
    "group_by_length": "batch pairs of similar length (less padding)",
    "preemption_signals": "signals that checkpoint and exit 75 (requeue)",
    "push_checkpoints_to_hub": "also upload each step_N checkpoint (branch step_N)",
    "dry_run": "check flags, model config, data, output; print the plan",
    "rank_failure_timeout": "seconds a rank may go silent before every rank stops (0: off)",
    "fsdp": "train with PyTorch FSDP2 instead of DeepSpeed",
    "tensor_parallel_degree": "> 1: FSDP2 shards the weights over more ranks instead",
    "config_name": "model config to build the model with instead",
    "do_not_randomize_output_dir": "write into --output_dir as given (false: <output_dir>/<exp_name>)",
    "optimizer_type": "adamw, or muon on the decoder's 2-D weights",
    "logprob_chunk_size": "tokens per chunk of the chunked log-probs",
    "report_to": "trackers for --with_tracking: wandb, tensorboard, all, none",
    "zero_hpz_partition_size": "ZeRO++: ranks holding a 2nd copy of ZeRO-3 weights",
    "activation_checkpointing_mode": "budget or selected_modules (every layer)",
    "use_liger_kernel": "Liger kernels (CUDA; elsewhere a note and chunked log-probs)",
    "low_cpu_mem_usage": "load weights without a full extra copy in CPU memory",
    "preprocessing_num_workers": "processes that tokenize the data (same result for any number)",
    "eval_fraction": "hold out this fraction of each training dataset for evaluation",
    "fsdp_shard_degree": "FSDP2: ranks each parameter is sharded over",
    "fsdp_num_replicas": "FSDP2: model replicas (HSDP when > 1)",
    "dry_run_num_processes": "processes (GPUs) to plan for",
    "num_sample_prompts": "prompts answered greedily at start, each evaluation, end (0: off)",
    "sample_prompts": "prompts to answer: .txt or .jsonl",
    "dry_run_num_pairs": "training examples to plan for when a dataset's size cannot be read",
    "dry_run_mfu": "model FLOPs utilisation for the time estimate",
    "skip_cache": "do not load the prepared-data cache: prepare again",
    "zero_stage": "DeepSpeed ZeRO stage 0-3 (overrides --deepspeed_config's)",
    "ld_alpha": "LD-DPO: weight of log-probs past the shorter reply",
    "label_smoothing": "assumed label noise (cDPO, robust, ...)",
    "loss_type": "loss name(s), summed with --loss_weights",
    "mixer_list": "training data: DATASET AMOUNT pairs",
    "get_tokenizer_fn": "open-instruct's tokenizer loader",
    "transform_fn": "open-instruct's pipeline (DPO default only)",
    "target_columns": "open-instruct's kept columns; no effect here",
    "activation_checkpointing_modules": "olmo-core block globs; no effect here",
    "dataset_name": "one Hub dataset or path, all of it (as --mixer_list)",
    "dataset_mixer": "JSON mapping dataset -> amount (another way to give --mixer_list)",
    "max_response_length": "max tokens per reply, EOS included",
    "dataset_mix_dir": "also save the mixed, tokenized training pairs here (JSONL)",
    "sync_each_batch": "sync gradients on every micro-batch (less memory)",
    "additional_model_arguments": "JSON object of extra from_pretrained keyword arguments",
    "use_qlora": "LoRA on a 4-bit NF4 base model (CUDA and bitsandbytes)",
    "merge_lora": "also save merged full weights into <output_dir>/merged",
    "separate_forward": "chosen, rejected in two forwards",
    "profiling": "trace a few steps with the torch profiler",
    "dataset_local_cache_dir": "prepared-data cache folder",
    "mixer_list_splits": "split per dataset, or one for all",
    "eval_mixer_list": "evaluation data, as --mixer_list",
    "cache_mode": "prepared-data cache: local only (hf not supported)",
    "save_to_hub": "push the final model to this Hub repo",
    "eval_steps": "evaluate every N optimizer steps and at the end",
    "lora_target_modules": "module-name suffixes that get adapters",
    "deepspeed_config": "DeepSpeed JSON config ('auto' fields filled in)",
    "log_grad_norm": "log the gradient norm (before clipping)",
    "loss_implementation": "olmo-core's LM loss kernel; no effect here",
    "config_hash": "open-instruct's dataset-cache hash; ours hashes inputs",
    "use_fast": "use the fast tokenizer (false: as --use_slow_tokenizer)",
    "fsdp_offload_params": "FSDP2: keep shards, gradients, optimizer state on CPU",
    "max_grad_norm": "clip gradients to this norm (<= 0: off)",
    "optimizer_kwargs": "JSON of extra optimizer arguments",
    "lr_scheduler_type": "schedule after warmup: linear, cosine or constant",
}

_DEFAULT_IN_HELP = re.compile(r"\s*\(default: ([^()]*(?:\([^()]*\)[^()]*)*)\)")


def _metavar(field: dataclasses.Field, annotation: Any) -> str:
    if field.name in METAVARS:
        return METAVARS[field.name]
    kind, is_list = base_type(annotation)
    if kind is bool:
        return ""
    choices = field.metadata.get("choices")
    if choices and len(f"--{field.name} {{{','.join(choices)}}}") <= NAME_WIDTH:
        one = "{" + ",".join(choices) + "}"
    else:
        one = {int: "N", float: "X"}.get(kind, "NAME")
    return f"{one} ..." if is_list else one


def _value(value: Any) -> str:
    """A default as a user would type it: 5e-7, true, q_proj k_proj, unset."""
    if value is None or value == "" or value == [] or value == {}:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return re.sub(r"e([+-])0+(\d)", r"e\1\2", f"{value:g}").replace("e+", "e")
    if isinstance(value, list):
        return " ".join(_value(v) for v in value)
    return str(value)


def describe(field: dataclasses.Field) -> tuple[str, str]:
    """(one-line text, default in words) of a flag."""
    help_text = field.metadata.get("help", "")
    said = _DEFAULT_IN_HELP.search(help_text)
    if said:  # its first clause: "what accelerate launch says, else no" -> "what accelerate launch says"
        default = re.split(r", | or ", said.group(1))[0] if len(said.group(1)) > 24 else said.group(1)
    else:
        default = _value(field_default(field))
        if len(default) > 24:  # a long list (lora_target_modules): its first items
            default = default[:21].rsplit(" ", 1)[0] + " ..."
    if field.name in SHORT:
        return SHORT[field.name], default
    if help_text == _NO_EFFECT:
        return "AI2-cluster option, no effect here", default
    text = _DEFAULT_IN_HELP.sub("", help_text)
    text = re.split(r"(?<=[a-z)])\. ", text, maxsplit=1)[0].rstrip(".")
    first = text.split(" ", 1)[0]
    if first[:1].isupper() and (first[1:].islower() or len(first) == 1):  # "Peak" -> "peak"; LoRA, JSON stay
        text = text[0].lower() + text[1:]
    return text, default


def flag_line(field: dataclasses.Field, annotation: Any) -> str:
    """``  --name METAVAR   text (default D; also --alias)``."""
    names = f"--{field.name} {_metavar(field, annotation)}".rstrip()
    text, default = describe(field)
    extra = [f"--{a}" for a in field.metadata.get("aliases", ())]
    tail = f"default {default}" + (f"; also {', '.join(extra)}" if extra else "")
    return f"  {names:<{NAME_WIDTH}} {text} ({tail})"


def usage(prog: str) -> str:
    """The usage line: the two flags every run needs, not every flag."""
    return f"usage: {prog} [recipe.yaml] --model_name_or_path M --mixer_list DATA AMOUNT [flags]\n"


def render(cls: type, prog: str, stage: str = "dpo") -> str:
    """The whole ``--help`` text of ``stage`` for the flags of dataclass ``cls``."""
    intro, hidden = STAGES[stage]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    booleans = "Booleans: --flag, --flag true, --flag false (or --no_flag). -h, --help: this text."
    lines = [usage(prog).rstrip(), "", intro, booleans]
    for group in GROUPS:
        shown = [name for name in group.flags if name in fields and name not in hidden]
        if not shown:
            continue
        lines += ["", f"{group.title}:"]
        lines += [flag_line(fields[name], hints[name]) for name in shown]
    lines += ["", f"More: {DOCS}."]
    return "\n".join(lines) + "\n"
