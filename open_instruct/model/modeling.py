"""Load the tokenizer and the policy model: revisions, attention kernel, quantization, embedding growth, LoRA."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from open_instruct.data.chat_templates import CHAT_TEMPLATES, DEFAULT_TEMPLATE, TOKENIZER_TEMPLATE_NAMES
from open_instruct.engine import gathered, unwrap_model
from open_instruct.errors import UserError, say_note
from open_instruct.files import is_local_path
from open_instruct.model.lora import LoraSettings, apply_lora, describe
from open_instruct.model.moe import require_moe
from open_instruct.model.overrides import compile_decoder_layers, model_config, yarn_parameters
from open_instruct.model.packed_kernels import (
    HALF_PRECISIONS,
    TORCH_VARLEN,
    register_packed_kernels,
    torch_varlen_available,
)
from open_instruct.settings import ModelSettings

ATTN_IMPLEMENTATIONS = ("flash_attention_3", "flash_attention_2", "sdpa", "eager", "flex_attention", TORCH_VARLEN)
EMBEDDING_MULTIPLE = 8
DEFAULT_TEMPLATE_NOTE = (
    f"note: tokenizer {{name!r}} has no chat template: using {DEFAULT_TEMPLATE!r}, HH-RLHF's "
    "'\\n\\nHuman: ...\\n\\nAssistant: ...' transcript (as the DPO paper), each reply ending with EOS; "
    "--chat_template_name (Python: chat_template_name=) picks another"
)
SLOW_TOKENIZER_NOTE = (
    "note: --use_slow_tokenizer has no effect: {name} ships no slow (Python) tokenizer, the fast one is used"
)


def check_model_path(name: str | None, what: str = "model") -> None:
    """A local-looking path that does not exist is an error before anything loads."""
    if name and is_local_path(name) and not Path(name).expanduser().exists():
        raise UserError(f"{what} path not found: {name}")


def parse_additional_model_arguments(text: str | None) -> dict[str, Any]:
    """``--additional_model_arguments`` as a dict; anything but a JSON object is a clear error."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--additional_model_arguments is not valid JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise UserError(f"--additional_model_arguments must be a JSON object, got {type(value).__name__}: {text!r}")
    return value


def _cuda_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _flash_available(version: int) -> bool:
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available  # heavy: on first use

    return bool(is_flash_attn_3_available() if version == 3 else is_flash_attn_2_available())


def _check_torch_varlen(capability: tuple[int, int] | None) -> None:
    if capability is None:
        raise UserError(f"--attn_implementation {TORCH_VARLEN} needs a CUDA GPU; none found (use sdpa)")
    if not torch_varlen_available():
        raise UserError(f"--attn_implementation {TORCH_VARLEN} needs torch.nn.attention.varlen (PyTorch >= 2.10)")


def resolve_attn_implementation(requested: str | None) -> tuple[str, str]:
    """(attention implementation, why): the requested one if usable, else the best available one.

    Best: flash-attention 3 on Hopper (compute capability 9.x), flash-attention 2 on Ampere or newer, when the package
    is installed; otherwise PyTorch's sdpa. ``eager`` only on request.
    """
    capability = _cuda_capability()
    if requested is not None:
        if requested not in ATTN_IMPLEMENTATIONS:
            raise UserError(
                f"--attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {requested!r}"
            )
        if requested == TORCH_VARLEN:
            _check_torch_varlen(capability)
            register_packed_kernels()  # from_pretrained and from_config accept registered names only
        if requested.startswith("flash_attention"):
            version = int(requested[-1])
            if capability is None:
                raise UserError(f"--attn_implementation {requested} needs a CUDA GPU; none found (use sdpa)")
            if not _flash_available(version):
                package = "flash_attn_3 (flash_attn_interface)" if version == 3 else "flash-attn"
                raise UserError(f"--attn_implementation {requested}: package {package} is not installed or unusable")
        return requested, "requested"
    if capability is None:
        return "sdpa", "default: no CUDA device"
    if capability[0] == 9 and _flash_available(3):
        return "flash_attention_3", f"default: compute capability {capability[0]}.{capability[1]}"
    if capability[0] >= 8 and _flash_available(2):
        return "flash_attention_2", f"default: compute capability {capability[0]}.{capability[1]}"
    return "sdpa", f"default: no usable flash-attention for compute capability {capability[0]}.{capability[1]}"


def check_model_options(model: ModelSettings) -> None:
    """Environment checks of the model flags (CUDA, packages, attention), run before any data or model work."""
    parse_additional_model_arguments(model.additional_model_arguments)
    resolve_attn_implementation(model.attn_implementation)
    precision = model.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if model.attn_implementation == TORCH_VARLEN and precision not in HALF_PRECISIONS:
        raise UserError(
            f"--attn_implementation {TORCH_VARLEN} runs in bf16/fp16 only: add --mixed_precision bf16 (got {precision})"
        )
    if model.use_qlora:
        if not torch.cuda.is_available():
            raise UserError("--use_qlora needs a CUDA GPU (bitsandbytes 4-bit NF4); none found on this machine")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--use_qlora needs bitsandbytes: pip install 'open_instruct[qlora]'")


def note_slow_tokenizer(use_slow_tokenizer: bool, tokenizer: Any, name: str) -> None:
    """``--use_slow_tokenizer`` asks ``use_fast=False``; a tokenizer that has only a ``tokenizer.json`` (no slow
    Python version) still loads fast, and the run says so instead of ignoring the flag."""
    if use_slow_tokenizer and getattr(tokenizer, "is_fast", False):
        say_note(SLOW_TOKENIZER_NOTE.format(name=name))


def load_tokenizer(model: ModelSettings) -> Any:
    """The tokenizer, with our chat template when one is named (``hh_rlhf`` when it has none) and a pad token."""
    from transformers import AutoTokenizer  # heavy: imported when a tokenizer loads, not with the module

    name = model.tokenizer_name_or_path or model.model_name_or_path
    check_model_path(name, "tokenizer")
    revision = model.tokenizer_revision or (model.model_revision if name == model.model_name_or_path else None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=revision, use_fast=not model.use_slow_tokenizer, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(f"could not load tokenizer {name!r}: {err}") from err
    note_slow_tokenizer(model.use_slow_tokenizer, tokenizer, name)
    if model.chat_template_name in TOKENIZER_TEMPLATE_NAMES:
        print(f"--chat_template_name {model.chat_template_name}: the tokenizer's own chat template (as open-instruct)")
    elif model.chat_template_name:
        tokenizer.chat_template = CHAT_TEMPLATES[model.chat_template_name]
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATES[DEFAULT_TEMPLATE]
        say_note(DEFAULT_TEMPLATE_NOTE.format(name=name))
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def _quantization_config() -> Any:
    from transformers import BitsAndBytesConfig  # heavy: QLoRA runs only

    # quant_storage bf16 lets a sharding engine shard the packed 4-bit weights like ordinary bf16 tensors.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def grow_embeddings(model: Any, min_rows: int, multiple: int = EMBEDDING_MULTIPLE) -> tuple[int, int]:
    """Grow input and output embeddings to ``min_rows`` rounded up to ``multiple``; new rows get the mean of the old.

    The mean row gives an added token (e.g. a pad token) an average embedding and, in the output layer, an average
    logit, so the model's distribution over the old vocabulary barely moves. Works on engine-partitioned weights.
    Returns (old rows, new rows).
    """
    old = model.get_input_embeddings().num_embeddings  # num_embeddings stays right when the engine partitions .weight
    if min_rows <= old:
        return old, old
    model.resize_token_embeddings(min_rows, pad_to_multiple_of=multiple, mean_resizing=False)
    params = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not params[0]:
        params.append(head.weight)
    with gathered(params), torch.no_grad():
        for weight in params:
            weight[old:] = weight[:old].float().mean(dim=0).to(weight.dtype)
    return old, model.get_input_embeddings().num_embeddings


def load_model(model: ModelSettings, tokenizer: Any, log: Callable[[str], None] = print) -> Any:
    """The policy model; its embeddings grow (to a multiple of 8) when the tokenizer gained tokens; LoRA if asked."""
    from transformers import AutoModelForCausalLM  # heavy: imported when a model loads, not with the module

    check_model_path(model.model_name_or_path)
    extra = parse_additional_model_arguments(model.additional_model_arguments)
    if "torch_dtype" in extra:  # the transformers 4 name of ``dtype``; it must replace our fp32 default, not clash
        extra["dtype"] = extra.pop("torch_dtype")
    attn, why = resolve_attn_implementation(model.attn_implementation)
    log(f"model: attention implementation {attn} ({why})")
    options: dict[str, Any] = {"dtype": torch.float32}
    config = model_config(model, log)  # --config_name, --rope_scaling_factor (None: the checkpoint's own)
    if config is not None:
        options["config"] = config
    if model.use_qlora:
        check_model_options(model)
        from transformers.integrations import is_deepspeed_zero3_enabled  # heavy, as above

        options.update(dtype=torch.bfloat16, quantization_config=_quantization_config())
        # ZeRO-3 places (and shards) the weights itself; transformers refuses a device_map with it.
        if not is_deepspeed_zero3_enabled():
            options["device_map"] = {"": torch.cuda.current_device()}
    try:
        policy = AutoModelForCausalLM.from_pretrained(
            model.model_name_or_path,
            revision=model.model_revision,
            trust_remote_code=model.trust_remote_code,
            attn_implementation=attn,
            low_cpu_mem_usage=model.low_cpu_mem_usage,
            **{**options, **extra},
        )
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"could not load model {model.model_name_or_path!r}: {err}") from err
    if model.load_balancing_loss:
        experts, top_k = require_moe(policy.config, model.model_name_or_path)
        log(
            f"model: MoE with {experts} experts, top-{top_k}; load-balancing loss weight {model.load_balancing_weight}"
        )
    old, new = grow_embeddings(policy, len(tokenizer))
    if new != old:
        log(
            f"model: embeddings grown from {old} to {new} rows for a tokenizer of {len(tokenizer)} tokens "
            f"(new rows = mean of the old ones)"
        )
    if policy.config.pad_token_id is None:
        policy.config.pad_token_id = tokenizer.pad_token_id
    if model.checkpoints_every_layer and not model.use_qlora:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    if model.use_lora or model.use_qlora:
        policy = apply_lora(
            policy,
            LoraSettings(
                rank=model.lora_rank,
                alpha=model.lora_alpha,
                dropout=model.lora_dropout,
                target_modules=tuple(model.lora_target_modules),
                quantized=model.use_qlora,
                gradient_checkpointing=model.checkpoints_every_layer,
            ),
        )
        log(f"model: {'QLoRA (4-bit NF4 base)' if model.use_qlora else 'LoRA'}: {describe(policy)}")
    if model.compile_model:
        compile_decoder_layers(policy, log)
    return policy


def logprob_model_options(model: ModelSettings, policy: Any) -> dict[str, Any]:
    """The model settings that change log-probs besides the weights (hashed apart): part of the reference-cache key."""
    return {
        "model_revision": model.model_revision,
        "tokenizer_revision": model.tokenizer_revision,
        "additional_model_arguments": parse_additional_model_arguments(model.additional_model_arguments),
        "quantization": "nf4-double-bf16" if model.use_qlora else None,
        "vocab_rows": unwrap_model(policy).get_input_embeddings().num_embeddings,
        # a different config or RoPE scaling changes every log-prob (default values keep older cache keys)
        **({"config_name": model.config_name} if model.config_name else {}),
        **({"rope_scaling": yarn_parameters(model)} if model.rope_scaling_factor else {}),
    }
