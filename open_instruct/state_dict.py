"""A bare ``.pt`` state dict as a starting checkpoint: rebuilt into a Hugging Face folder the engine can load."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from open_instruct.config import UserError

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


def is_state_dict_file(path: str) -> bool:
    """Whether ``path`` names a single weights file rather than a model folder or hub id."""
    return Path(path).suffix in STATE_DICT_SUFFIXES and (Path(path).is_file() or path.startswith((".", "/", "~")))


def _config_source(tokenizer_name: str | None, model_config: Any) -> Any:
    if model_config is not None:
        return model_config
    if tokenizer_name is None:
        return None
    local = Path(tokenizer_name).expanduser()
    if local.is_dir():
        return tokenizer_name if (local / "config.json").is_file() else None
    return tokenizer_name  # a hub id: its repo normally holds the model config too


def _unwrap(payload: Any, path: str) -> dict[str, Any]:
    """The tensor mapping inside common training-script wrappers ({"state_dict": ...}, {"model": ...}, DDP prefixes)."""
    import torch

    for key in ("state_dict", "model", "module"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise UserError(f"{path}: expected a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in payload.items()}


def state_dict_to_folder(path: str, tokenizer_name: str | None, model_config: Any, folder: Path) -> Path:
    """Load the state dict into a model built from ``model_config`` and save it with the tokenizer under ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

    if not Path(path).expanduser().is_file():
        raise UserError(f"state dict not found: {path}")
    config_source = _config_source(tokenizer_name, model_config)
    missing = []
    if tokenizer_name is None:
        missing.append("a tokenizer (run_dpo(tokenizer_name=...) or TrainingConfig.tokenizer_name)")
    if config_source is None:
        missing.append(
            "a model config (run_dpo(model_config=...): a folder or hub id with config.json, or a "
            "PretrainedConfig; a tokenizer folder that holds config.json also serves)"
        )
    if missing:
        raise UserError(f"{path} is a bare state dict, so it also needs {' and '.join(missing)}")
    try:
        config = (
            config_source
            if isinstance(config_source, PretrainedConfig)
            else AutoConfig.from_pretrained(str(config_source))
        )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    except (OSError, ValueError) as err:
        raise UserError(f"could not read the model config / tokenizer for {path}: {err}") from err
    try:
        state = _unwrap(torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True), path)
    except (RuntimeError, OSError, EOFError) as err:  # pickles with code, damaged or truncated files
        raise UserError(f"{path}: cannot be read as a state dict: {err}") from err
    model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {t.data_ptr() for name, t in model.state_dict().items() if name in state}
    params = model.state_dict()
    absent = [k for k in result.missing_keys if params[k].data_ptr() not in loaded]  # tied copies are fine
    if absent or result.unexpected_keys:
        raise UserError(
            f"{path} does not match the model config ({type(config).__name__}): missing "
            f"{absent[:5] or 'none'}, unexpected {result.unexpected_keys[:5] or 'none'}"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
