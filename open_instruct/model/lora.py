"""LoRA / QLoRA through ``peft``: wrap the policy, run the reference with adapters off, save adapter and merged weights.

The log-prob code unwraps a ``PeftModel`` to its base model and calls the decoder directly. That still trains the
adapters: ``peft`` replaces the targeted ``nn.Linear`` modules of the base model in place, so every entry point into the
base model goes through the LoRA layers (``tests/model/test_lora.py`` checks it).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from open_instruct.engine import engine_of
from open_instruct.errors import UserError
from open_instruct.files import move_contents

MERGED_DIR = "merged"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; ``target_modules`` are module-name suffixes (or the single value ``all-linear``)."""

    rank: int = 64
    alpha: float = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    quantized: bool = False
    gradient_checkpointing: bool = False


def _peft_config(settings: LoraSettings) -> Any:
    # peft is optional (LoRA runs only)
    from peft import LoraConfig, TaskType

    targets: Any = list(settings.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def apply_lora(model: Any, settings: LoraSettings) -> Any:
    """The model wrapped as a ``PeftModel``: base weights frozen, adapters on the target modules trainable."""
    # peft is optional (LoRA runs only)
    from peft import get_peft_model, prepare_model_for_kbit_training

    if settings.quantized:  # fp32 norms/head and input grads for a 4-bit base, as QLoRA prescribes
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    try:
        return get_peft_model(model, _peft_config(settings))
    except ValueError as err:  # peft's message names the missing target modules
        raise UserError(f"--lora_target_modules {' '.join(settings.target_modules)}: {err}") from err


def find_peft_model(model: Any) -> Any | None:
    """The ``PeftModel`` inside DDP / engine wrappers, or None when the model has no adapters."""
    # peft is optional (LoRA runs only)
    from peft import PeftModel

    # isinstance, not hasattr: an engine's wrapper may forward unknown attributes to the module it wraps.
    while not isinstance(model, PeftModel) and hasattr(model, "module"):
        model = model.module
    return model if isinstance(model, PeftModel) else None


def describe(model: Any) -> str:
    """One line: how many modules carry adapters and how many parameters train."""
    peft_model = find_peft_model(model)
    if peft_model is None:
        return "no adapters"
    trainable, total = peft_model.get_nb_trainable_parameters()
    adapted = [
        name
        for name, module in peft_model.named_modules()
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and len(module.lora_A) > 0
    ]
    kinds = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in adapted}))
    return (
        f"LoRA on {len(adapted)} modules ({kinds}); {trainable:,} of {total:,} parameters train "
        f"({100 * trainable / max(total, 1):.2f}%)"
    )


@contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """Run the enclosed forwards on the base model (adapters off); a no-op for a model without adapters."""
    peft_model = find_peft_model(model)
    with peft_model.disable_adapter() if peft_model is not None else nullcontext():
        yield


def merged_model(peft_model: Any, state_dict: dict[str, torch.Tensor]) -> Any:
    """A plain ``transformers`` model with the adapters of ``state_dict`` folded into the base weights.

    Built from the (possibly engine-gathered) full ``state_dict`` on a meta-device skeleton, so the live training model is
    never modified and only one extra copy of the weights exists.
    """
    # peft is optional (LoRA runs only)
    from peft import get_peft_model

    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    with torch.device("meta"):
        skeleton = get_peft_model(type(base)(config), copy.deepcopy(peft_model.peft_config["default"]))
    owned = {name: value.detach().to("cpu", copy=True) for name, value in state_dict.items()}
    missing, unexpected = skeleton.load_state_dict(owned, strict=False, assign=True)
    meta_left = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if meta_left:
        raise RuntimeError(f"merging LoRA: weights missing from the saved state: {meta_left[:5]}")
    if unexpected:
        raise RuntimeError(f"merging LoRA: unexpected weights in the saved state: {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):  # assign=True loaded the two names as separate tensors
        skeleton.get_base_model().tie_weights()
    return skeleton.merge_and_unload()


def save_lora_model(accelerator: Any, model: Any, tokenizer: Any, output_dir: str | Path, merge: bool) -> Path:
    """Write the adapter (``adapter_config.json``, ``adapter_model.safetensors``) and tokenizer into ``output_dir``;
    with ``merge`` also full merged weights and the tokenizer into ``output_dir/merged``.

    Every rank takes part (a sharding engine gathers the weights); the main process writes into a temporary folder and renames
    each item into place.
    """
    output_dir = Path(output_dir)
    state_dict = engine_of(accelerator).full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        peft_model = find_peft_model(accelerator.unwrap_model(model))
        tmp = output_dir / ".final_model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        # "auto": peft adds the (resized) embedding matrices when the vocabulary grew, e.g. for an added pad token.
        peft_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, save_embedding_layers="auto")
        tokenizer.save_pretrained(tmp)
        if merge:
            merged = merged_model(peft_model, state_dict)
            merged.save_pretrained(tmp / MERGED_DIR, safe_serialization=True)
            tokenizer.save_pretrained(tmp / MERGED_DIR)
            del merged
        move_contents(tmp, output_dir)
    accelerator.wait_for_everyone()
    return output_dir
