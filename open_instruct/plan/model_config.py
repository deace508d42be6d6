"""A model's shape from its ``config.json`` alone: never its weights.

Where the config comes from, first match wins: a local folder; the copy shipped under ``configs/models/<org>/<name>/``
for the models our recipes name (so a plan works offline; skipped when ``--model_revision`` asks for another
revision); the Hugging Face cache or the Hub itself (``config.json`` only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from open_instruct.errors import UserError
from open_instruct.files import is_local_path

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


@dataclass(frozen=True)
class ModelShape:
    """What the memory and time models need to know of a decoder-only transformer."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    qk_norm: bool = False  # OLMo 2: RMSNorm on queries and keys (weights of heads x head_dim and kv x head_dim)
    attention_bias: bool = False
    experts: int = 0  # MoE: experts per layer (0: dense)
    experts_per_token: int = 0
    expert_intermediate: int = 0

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def attention_params(self) -> int:
        bias = (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        norms = (self.q_dim + self.kv_dim) if self.qk_norm else 0
        return 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim + bias + norms

    def mlp_params(self) -> int:
        if self.experts:
            return self.experts * 3 * self.hidden * self.expert_intermediate + self.experts * self.hidden
        return 3 * self.hidden * self.intermediate

    def layer_params(self) -> int:
        """One decoder layer: attention, MLP and its two RMSNorm weights."""
        return self.attention_params() + self.mlp_params() + 2 * self.hidden

    def parameters(self) -> int:
        """All parameters: embedding, layers, final norm, output layer unless tied."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * self.layer_params() + self.hidden + head

    def largest_module_params(self) -> int:
        """The most parameters one module holds directly (DeepSpeed's "largest layer"): the embedding, or an MLP."""
        if self.experts:  # transformers 5 keeps a layer's experts in one module
            return max(self.vocab * self.hidden, self.experts * 3 * self.hidden * self.expert_intermediate)
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


def shape_of(config: dict[str, Any]) -> ModelShape:
    """The shape of a Hugging Face ``config.json`` (Llama, OLMo 2, Qwen 2/3, Mistral and MoE variants)."""
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        shape = ModelShape(
            hidden=hidden,
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
            qk_norm=config.get("model_type") in ("olmo2", "olmo3", "qwen3", "qwen3_moe"),
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            experts=int(config.get("num_experts") or config.get("num_local_experts") or 0),
            experts_per_token=int(config.get("num_experts_per_tok") or 0),
            expert_intermediate=int(config.get("moe_intermediate_size") or config.get("intermediate_size")),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"model config: missing or invalid field {err}") from err
    return shape


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable config.json: {err}") from err


def _from_hub(name: str, revision: str | None) -> Path | None:
    """``config.json`` of a hub model from the cache or the Hub; None when neither has it (offline, no such repo)."""
    try:
        # huggingface_hub is only needed to read a Hub model's config
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (  # as above
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:
        return None
    try:
        return Path(hf_hub_download(name, "config.json", revision=revision))
    except (LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError, OSError, ValueError):
        return None


def resolve_model_config(name: str, revision: str | None = None) -> tuple[dict[str, Any], str]:
    """(the config, where it came from) for a local folder or hub id; an error names what was tried."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"model folder {name} has no config.json")
        return _read(local / "config.json"), str(local / "config.json")
    if is_local_path(name):
        raise UserError(f"model folder not found: {name}")
    shipped = SHIPPED_CONFIGS / name / "config.json"
    if revision is None and shipped.is_file():
        return _read(shipped), f"shipped {shipped.relative_to(SHIPPED_CONFIGS.parents[1])}"
    downloaded = _from_hub(name, revision)
    if downloaded is not None:
        return _read(downloaded), f"hub: {name}/config.json"
    raise UserError(
        f"model {name}: no local folder, no shipped config under configs/models/, and the Hub has no config.json "
        "for it (offline?); pass a folder holding its config.json"
    )
