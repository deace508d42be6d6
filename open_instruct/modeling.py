"""Load the tokenizer and the policy model from a local folder or a hub id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from open_instruct.config import DPOArguments, UserError


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def check_model_path(name: str | None, what: str = "model") -> None:
    """A local-looking path that does not exist is an error before anything loads."""
    if name and _looks_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"{what} path not found: {name}")


def load_tokenizer(args: DPOArguments) -> Any:
    """The tokenizer, with our chat template when one is named and a pad token guaranteed."""
    from transformers import AutoTokenizer

    from open_instruct.data.chat_templates import CHAT_TEMPLATES

    name = args.tokenizer_name_or_path or args.model_name_or_path
    check_model_path(name, "tokenizer")
    revision = args.tokenizer_revision or (args.model_revision if name == args.model_name_or_path else None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=revision, use_fast=not args.use_slow_tokenizer, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(f"could not load tokenizer {name!r}: {err}") from err
    if args.chat_template_name:
        tokenizer.chat_template = CHAT_TEMPLATES[args.chat_template_name]
    if not tokenizer.chat_template:
        raise UserError(f"tokenizer {name!r} has no chat template; pass --chat_template_name")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def load_model(args: DPOArguments, tokenizer: Any) -> Any:
    """The policy model; its embeddings grow (to a multiple of 8) when the tokenizer gained tokens."""
    from transformers import AutoModelForCausalLM

    check_model_path(args.model_name_or_path)
    extra = json.loads(args.additional_model_arguments) if args.additional_model_arguments else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, revision=args.model_revision, trust_remote_code=args.trust_remote_code,
            attn_implementation=args.attn_implementation or "sdpa", low_cpu_mem_usage=args.low_cpu_mem_usage,
            dtype=torch.float32, **extra,
        )
    except (OSError, ValueError) as err:
        raise UserError(f"could not load model {args.model_name_or_path!r}: {err}") from err
    embedding = model.get_input_embeddings().weight
    # Under ZeRO-3 each rank holds an empty shard (shape [0]); ds_shape is the full shape. transformers gathers the
    # partitioned weights inside resize_token_embeddings.
    if len(tokenizer) > getattr(embedding, "ds_shape", embedding.shape)[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    if args.gradient_checkpointing or args.activation_memory_budget < 1.0:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model
