"""``.pt`` checkpoints: a bare state dict as a starting checkpoint, rebuilt into a Hugging Face folder the engine can
load, and the single-file checkpoint our API's stages write (by default: ``<output_dir>/sft_final.pt``).

A ``.pt`` our stages write is a dict: ``format`` (:data:`PT_FORMAT`), ``state_dict``, ``model_config`` (the
transformers config as JSON), ``tokenizer_name`` (what the stage loaded) and ``tokenizer_files`` (the saved
tokenizer, chat template included, file name -> bytes), so it needs no other argument to train from. A bare state dict
from elsewhere needs a model config and a tokenizer passed along.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from open_instruct.errors import UserError
from open_instruct.files import atomic_write, is_local_path
from open_instruct.model.scratch import transformers_config

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")
PT_FORMAT = "open_instruct.pt_checkpoint/1"


def is_state_dict_file(path: str) -> bool:
    """Whether ``path`` names a single weights file rather than a model folder or hub id."""
    return Path(path).suffix in STATE_DICT_SUFFIXES and is_local_path(path)


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
    import torch  # heavy: the API imports this module to tell a weights file from a folder, without torch

    for key in ("state_dict", "model", "module"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise UserError(f"{path}: expected a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in payload.items()}


def read_payload(path: str) -> Any:
    """The object a ``.pt`` file holds (tensors and plain values only: no code is run)."""
    import torch  # heavy, as above

    if not Path(path).expanduser().is_file():
        raise UserError(f"state dict not found: {path}")
    try:
        return torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as err:  # pickles with code, damaged or truncated files
        raise UserError(f"{path}: cannot be read as a state dict: {err}") from err


def carried_tokenizer_name(path: str) -> str | None:
    """The tokenizer name a ``.pt`` written by our stages carries (None for a bare state dict)."""
    payload = read_payload(path)
    return payload.get("tokenizer_name") if isinstance(payload, dict) and payload.get("format") == PT_FORMAT else None


def _carried(payload: Any, tmp_tokenizer: Path) -> tuple[Any, str | None]:
    """(model config, tokenizer folder) that a ``.pt`` of ours carries, else (None, None)."""
    if not isinstance(payload, dict) or payload.get("format") != PT_FORMAT:
        return None, None
    config = transformers_config(json.loads(payload["model_config"]), None)
    files = payload.get("tokenizer_files") or {}
    if not files:
        return config, payload.get("tokenizer_name")
    tmp_tokenizer.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (tmp_tokenizer / Path(name).name).write_bytes(data)
    return config, str(tmp_tokenizer)


def state_dict_to_folder(path: str, tokenizer_name: str | None, model_config: Any, folder: Path) -> Path:
    """Load the state dict into a model built from ``model_config`` and save it with the tokenizer under ``folder``.

    A ``.pt`` of ours supplies both itself (an explicit ``tokenizer_name`` / ``model_config`` still wins)."""
    payload = read_payload(path)
    with tempfile.TemporaryDirectory() as scratch:
        carried_config, carried_tokenizer = _carried(payload, Path(scratch) / "tokenizer")
        config_source = model_config if model_config is not None else carried_config
        return _rebuild(path, payload, tokenizer_name or carried_tokenizer, config_source, folder)


def _rebuild(path: str, payload: Any, tokenizer_name: str | None, model_config: Any, folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig  # heavy, as above

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
        raise UserError(
            f"{path} is a bare state dict, so it also needs {' and '.join(missing)} "
            "(a .pt written by open_instruct's stages carries both)"
        )
    try:
        config = (
            config_source
            if isinstance(config_source, PretrainedConfig)
            else AutoConfig.from_pretrained(str(config_source))
        )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    except (OSError, ValueError) as err:
        raise UserError(f"could not read the model config / tokenizer for {path}: {err}") from err
    state = _unwrap(payload, path)
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


def write_pt_checkpoint(folder: str | Path, path: str | Path, tokenizer_name: str | None) -> Path:
    """The Hugging Face checkpoint in ``folder`` as one self-describing ``.pt`` file (weights, model config,
    tokenizer files and name), written atomically."""
    import torch  # heavy, as above
    from transformers import AutoModelForCausalLM, AutoTokenizer  # as above

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as scratch:
        AutoTokenizer.from_pretrained(folder).save_pretrained(scratch)
        files = {p.name: p.read_bytes() for p in sorted(Path(scratch).iterdir()) if p.is_file()}
    payload = {
        "format": PT_FORMAT,
        "state_dict": model.state_dict(),
        "model_config": model.config.to_json_string(),
        "tokenizer_name": tokenizer_name,
        "tokenizer_files": files,
    }
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_pt_checkpoint(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a ``.pt`` written by :func:`write_pt_checkpoint`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy, as above

    with tempfile.TemporaryDirectory() as scratch:
        folder = state_dict_to_folder(str(path), None, None, Path(scratch) / "model")
        return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
