"""A model to pretrain from scratch: a Llama-shaped :class:`ModelConfig`, or any transformers config.

``ModelConfig`` names the few numbers that define a decoder (layers, hidden size, heads, vocabulary, context); it
becomes a ``LlamaConfig`` whose vocabulary defaults to the tokenizer's. A ``PretrainedConfig``, a dict of its fields
(with ``model_type``), or a folder / hub id holding ``config.json`` work too. Either way the result is written as a
``config.json`` folder, the one form the pretraining recipe reads (``--model_name_or_path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from open_instruct.errors import UserError
from open_instruct.files import atomic_write


@dataclass
class ModelConfig:
    """A Llama-shaped decoder. ``vocab_size`` None: the tokenizer's size; ``num_kv_heads`` None: ``num_heads``;
    ``intermediate_size`` None: about 8/3 x ``hidden_size`` rounded up to a multiple of 32."""

    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    vocab_size: int | None = None
    max_seq_len: int = 512  # context length (position range); also the default pretraining block size
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def problems(self) -> list[str]:
        """What is wrong with these numbers (empty when they make a model)."""
        found = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("num_layers", "hidden_size", "num_heads", "max_seq_len")
            if getattr(self, name) < 1
        ]
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads >= 1 and self.hidden_size % self.num_heads:
            found.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if kv < 1 or (self.num_heads >= 1 and self.num_heads % kv):
            found.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {kv}")
        if self.vocab_size is not None and self.vocab_size < 1:
            found.append(f"vocab_size must be >= 1, got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"dropout must be in [0, 1), got {self.dropout}")
        return found

    def to_transformers(self, tokenizer: Any) -> Any:
        """The ``LlamaConfig`` of this model for ``tokenizer`` (its size, BOS/EOS/pad ids)."""
        # transformers takes seconds to import: --help, validation and the planner never need it
        from transformers import LlamaConfig

        problems = self.problems()
        if problems:
            raise UserError(f"ModelConfig: {'; '.join(problems)}")
        vocab = self.vocab_size or len(tokenizer)
        if vocab < len(tokenizer):
            raise UserError(f"ModelConfig.vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
        intermediate = self.intermediate_size or -(-8 * self.hidden_size // 3 // 32) * 32
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=self.hidden_size,
            intermediate_size=intermediate,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            max_position_embeddings=self.max_seq_len,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            attention_dropout=self.dropout,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


def transformers_config(model_config: Any, tokenizer: Any) -> Any:
    """A ``PretrainedConfig`` from a ModelConfig, a PretrainedConfig, a dict (with ``model_type``, or ModelConfig's
    fields), or a folder / hub id with ``config.json``."""
    # transformers takes seconds to import: --help, validation and the planner never need it
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_config, ModelConfig):
        return model_config.to_transformers(tokenizer)
    if isinstance(model_config, PretrainedConfig):
        return model_config
    if isinstance(model_config, dict):
        values = dict(model_config)
        if "model_type" not in values:
            try:
                return ModelConfig(**values).to_transformers(tokenizer)
            except TypeError as err:
                raise UserError(f"model_config: {err} (a dict needs 'model_type' or ModelConfig's fields)") from err
        try:
            return AutoConfig.for_model(values.pop("model_type"), **values)
        except ValueError as err:
            raise UserError(f"model_config: {err}") from err
    if isinstance(model_config, str | Path):
        try:
            return AutoConfig.from_pretrained(str(model_config))
        except (OSError, ValueError) as err:
            raise UserError(f"model_config {str(model_config)!r}: no readable config.json: {err}") from err
    raise UserError(
        f"model_config must be a ModelConfig, a transformers PretrainedConfig, a dict or a config folder, "
        f"got {type(model_config).__name__}"
    )


def write_config_folder(config: Any, folder: Path) -> Path:
    """``folder/config.json`` (atomic), the architecture the pretraining recipe builds."""
    with atomic_write(folder) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(config.to_json_string())
    return folder
