"""open-instruct's model options on a Hugging Face model: ``--config_name``, YaRN ``--rope_scaling_*`` and
``--compile_model`` (whether layers checkpoint: ``ModelSettings.checkpoints_every_layer``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from open_instruct.errors import UserError
from open_instruct.settings import ModelSettings


def is_olmo_core_config_name(name: str) -> bool:
    """An olmo-core model config name (``olmo3_7B``, open-instruct's dpo.py), not a folder or a hub id."""
    return "/" not in name and not Path(name).expanduser().exists()


def yarn_parameters(model: ModelSettings) -> dict[str, Any]:
    """The YaRN RoPE settings of ``--rope_scaling_*``."""
    return {
        "rope_type": "yarn",
        "factor": model.rope_scaling_factor,
        "beta_fast": model.rope_scaling_beta_fast,
        "beta_slow": model.rope_scaling_beta_slow,
        "original_max_position_embeddings": model.rope_scaling_old_context_len,
    }


def model_config(model: ModelSettings, log: Callable[[str], None] = print) -> Any:
    """The config to build the model with when ``--config_name`` or ``--rope_scaling_factor`` asks for one, else
    None (the checkpoint's own config.json)."""
    # transformers takes seconds to import: --help, validation and the planner never need it
    from transformers import AutoConfig

    source = model.model_name_or_path
    if model.config_name:
        if is_olmo_core_config_name(model.config_name):
            log(
                f"model: --config_name {model.config_name} is an olmo-core model config name; this engine builds "
                f"the Hugging Face model from {model.model_name_or_path}'s config.json"
            )
        else:
            source = model.config_name
    if source == model.model_name_or_path and model.rope_scaling_factor is None:
        return None
    try:
        config = AutoConfig.from_pretrained(
            source, revision=model.model_revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(f"could not load model config {source!r}: {err}") from err
    if model.rope_scaling_factor is not None:
        yarn = yarn_parameters(model)
        current = getattr(config, "rope_parameters", None)
        if isinstance(current, dict):  # transformers >= 5: one mapping with rope_theta in it
            config.rope_parameters = {**current, **yarn}
        else:
            config.rope_scaling = yarn
        log(f"model: YaRN RoPE scaling x{model.rope_scaling_factor} from {model.rope_scaling_old_context_len} tokens")
    return config


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's decoder layers: the modules whose class the model names as never to be split."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_decoder_layers(model: Any, log: Callable[[str], None] = print) -> int:
    """``torch.compile`` each decoder layer in place (parameter names and the state dict stay the same)."""
    layers = decoder_layers(model)
    if not layers:
        raise UserError("--compile_model: found no decoder layers in this model (its _no_split_modules is empty)")
    for layer in layers:
        layer.compile()
    log(f"model: torch.compile on {len(layers)} decoder layers (compiled at the first steps)")
    return len(layers)
