"""How open-instruct's flags (:mod:`open_instruct.config.open_instruct_flags`) map onto this engine.

``normalize`` runs when the settings are built: the flags that are another spelling of one of ours are folded into
it (``--concatenated_forward false`` is ``--separate_forward``, ``--dataset_mixer``/``--dataset_name`` are a
``--mixer_list``, ``--use_fast false`` is ``--use_slow_tokenizer``, ``--save_to_hub`` is ``--push_to_hub``).
``problems`` lists what validation rejects; ``notice`` is the one line naming the AI2-cluster options a run was given.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any

from open_instruct.config.open_instruct_flags import CLUSTER_ONLY, NO_EFFECT_HERE
from open_instruct.errors import UserError

OUR_TRANSFORMS = ["preference_tulu_tokenize_and_truncate_v1", "preference_tulu_filter_v1"]


def _json_object(value: Any, flag: str) -> Any:
    """A JSON object given as text (command line) becomes a dict; anything else is returned as is."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise UserError(f"--{flag}: not valid JSON: {err}") from err
    return value


def mixer_of_dataset_mixer(mixer: dict[str, Any]) -> list[str]:
    """``{name: amount}`` as a ``--mixer_list`` (name amount ...)."""
    return [str(x) for item in mixer.items() for x in item]


def mixer_of_dataset_name(name: str, config_name: str | None) -> list[str]:
    """``--dataset_name`` (with its hub configuration, ``NAME:CONFIG``) as a ``--mixer_list`` of all its rows."""
    return [f"{name}:{config_name}" if config_name else name, "1.0"]


def normalize(args: Any) -> None:
    """Fold open-instruct's alternative spellings into our flags, in place (idempotent: a rebuilt copy of the
    settings normalizes to the same values)."""
    if not args.concatenated_forward:
        args.separate_forward = True
    args.concatenated_forward = not args.separate_forward
    if not args.use_fast:
        args.use_slow_tokenizer = True
    args.use_fast = not args.use_slow_tokenizer
    args.dataset_mixer = _json_object(args.dataset_mixer, "dataset_mixer")
    args.optimizer_kwargs = _json_object(args.optimizer_kwargs, "optimizer_kwargs") or {}
    if args.save_to_hub:
        args.push_to_hub = True
        args.hf_repo_id = args.hf_repo_id or args.save_to_hub
    if isinstance(args.report_to, str):
        args.report_to = args.report_to.replace(",", " ").split()
    if not args.mixer_list:
        # One selection mechanism given: it becomes the mixer list (two given are reported by ``problems``).
        if isinstance(args.dataset_mixer, dict) and args.dataset_name is None:
            # the mixer list now says the same; clearing the mapping keeps a recipe's YAML and flags identical
            args.mixer_list, args.dataset_mixer = mixer_of_dataset_mixer(args.dataset_mixer), None
        elif args.dataset_name is not None and args.dataset_mixer is None:
            args.mixer_list = mixer_of_dataset_name(args.dataset_name, args.dataset_config_name)
    _fold_tensor_parallel(args)
    if not args.do_not_randomize_output_dir:  # open-instruct's default: one folder per experiment name (once)
        args.output_dir = os.path.join(args.output_dir, args.exp_name)
        args.do_not_randomize_output_dir = True


def _selection_problems(args: Any) -> list[str]:
    """open-instruct's rule: exactly one of --dataset_name, --dataset_mixer, --mixer_list."""
    given = []
    if args.dataset_name is not None:
        given.append("--dataset_name")
    if args.dataset_mixer is not None:
        if not isinstance(args.dataset_mixer, dict):
            return ["--dataset_mixer must be a mapping of dataset -> amount"]
        given.append("--dataset_mixer")
    derived = (
        mixer_of_dataset_mixer(args.dataset_mixer) if "--dataset_mixer" in given else None,
        mixer_of_dataset_name(args.dataset_name, args.dataset_config_name) if "--dataset_name" in given else None,
    )
    if args.mixer_list and list(args.mixer_list) not in [d for d in derived if d is not None]:
        given.append("--mixer_list")
    if not given and not args.mixer_list:
        return ["give the training data with one of --mixer_list, --dataset_mixer or --dataset_name"]
    if len(given) > 1:
        return [f"give one dataset selection, not several: {', '.join(given)}"]
    if args.dataset_config_name and args.dataset_name is None:
        return ["--dataset_config_name needs --dataset_name"]
    return []


def _fold_tensor_parallel(args: Any) -> None:
    """``--tensor_parallel_degree N``: the N ranks that would split each matmul shard the weights instead: with FSDP2,
    or with ZeRO when the run uses it (the degree is then 1, so folding again changes nothing)."""
    degree = args.tensor_parallel_degree
    if not (1 < degree < math.inf):  # NaN and infinities are left for validation's range check to name
        return
    args.tensor_parallel_degree = 1
    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if args.zero_stage is not None or args.deepspeed_config or deepspeed_launch:
        how = "DeepSpeed ZeRO partitions the weights over all ranks"
    else:
        args.fsdp = True
        if args.fsdp_shard_degree is not None:
            args.fsdp_shard_degree *= degree
        shard = f"--fsdp_shard_degree {args.fsdp_shard_degree}" if args.fsdp_shard_degree else "all ranks"
        how = f"FSDP2 shards the weights over {shard}"
    if os.environ.get("RANK", "0") == "0":
        print(
            f"note: --tensor_parallel_degree {degree}: no tensor parallelism here; {how} instead, and each rank "
            "takes its own micro-batch (the global batch is printed at start)"
        )


def _parallel_problems(args: Any) -> list[str]:
    problems = []
    for flag, value in (("context_parallel_degree", args.context_parallel_degree), ("cp_degree", args.cp_degree)):
        if value not in (None, 1):
            problems.append(
                f"--{flag} {value}: context parallelism is not built here; for long sequences use "
                "--gradient_checkpointing (or --activation_memory_budget < 1), --max_tokens_per_batch and --packing"
            )
    if args.zero_hpz_partition_size is not None and args.zero_hpz_partition_size < 1:
        problems.append(f"--zero_hpz_partition_size must be >= 1, got {args.zero_hpz_partition_size}")
    return problems


def problems(args: Any) -> list[str]:
    """What validation rejects among open-instruct's flags (each with the flag's name and what to do)."""
    found = _selection_problems(args) + _parallel_problems(args)
    if list(args.transform_fn) != OUR_TRANSFORMS:
        found.append(f"--transform_fn: only {' '.join(OUR_TRANSFORMS)} (the DPO tokenization) is built here")
    if args.cache_mode != "local":
        found.append("--cache_mode hf (a Hub dataset cache) is not supported; the prepared-data cache is local")
    if not isinstance(args.optimizer_kwargs, dict):
        found.append("--optimizer_kwargs must be a JSON object")
    if args.optimizer_type == "muon" and (args.zero_stage is not None or args.deepspeed_config or args.fsdp):
        found.append(
            "--optimizer_type muon needs whole weight matrices: it runs on the plain data-parallel engine here, not "
            "with --zero_stage / --deepspeed_config / --fsdp"
        )
    if args.optimizer_type == "muon" and (args.use_8bit_optimizer or args.dpo_use_paged_optimizer):
        found.append(
            "--use_8bit_optimizer / --dpo_use_paged_optimizer are AdamW variants; not with --optimizer_type muon"
        )
    if args.cache_logprobs_only and not args.needs_reference:
        found.append("--cache_logprobs_only: this loss needs no reference log-probs (nothing to cache)")
    if "none" in args.report_to and len(args.report_to) > 1:
        found.append("--report_to none cannot be combined with trackers")
    return found


def _has_tensorboard() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def trackers(report_to: list[str]) -> list[str]:
    """accelerate's tracker names for ``--report_to`` (``all``: wandb, and tensorboard when it is installed)."""
    if "none" in report_to:
        return []
    if "all" in report_to:
        return ["wandb", "tensorboard"] if _has_tensorboard() else ["wandb"]
    return list(dict.fromkeys(report_to))


def check_trackers(args: Any) -> None:
    """Before any work: a tracker asked for by name must be installed."""
    if args.with_tracking and "tensorboard" in trackers(args.report_to) and not _has_tensorboard():
        raise UserError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")


def notice(given: list[str]) -> str | None:
    """One line naming the AI2-cluster (and no-effect) options among the flags given, or None when there are none."""
    cluster = [f"--{name}" for name in CLUSTER_ONLY if name in given]
    inert = [f"--{name}" for name in NO_EFFECT_HERE if name in given]
    parts = []
    if cluster:
        parts.append(f"{', '.join(cluster)}: AI2-cluster options, no effect outside that cluster")
    if inert:
        parts.append(f"{', '.join(inert)}: open-instruct options with nothing to do in this engine")
    return "note: " + "; ".join(parts) if parts else None
