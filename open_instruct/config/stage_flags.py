"""Flags a stage other than DPO rejects (an error, never ignored): the SFT and pretraining entries read them."""

from __future__ import annotations

from open_instruct.objectives.losses import hyperparameter_names

# Flags that only mean something for a preference loss: passing one to SFT is an error, never ignored.
DPO_ONLY = (
    "loss_type",
    "loss_weights",
    *hyperparameter_names(),
    "reference_free",
    "separate_forward",
    "cache_logprobs_only",
    # preference-pair preparation: the prepared-pairs cache and its JSONL copy
    "dataset_mix_dir",
    "overwrite_cache",
    "skip_cache",
    "data_loader_seed",  # the SFT loader shuffles with --seed
    "reference_batch_size",
    "dataset_format",
    # pair batching (packing, token budget, length grouping) is built for preference pairs only so far
    "packing",
    "share_prompt",
    "max_tokens_per_batch",
    "max_tokens_per_forward",
    "group_by_length",
    # SFT has no checkpoint resume yet, so a stop signal keeps its default action
    "preemption_signals",
)
