"""Run and model settings: ``TrainingConfig`` (every stage), ``ModelConfig`` (pretraining's architecture)."""

from open_instruct.api import ModelConfig, TrainingConfig

__all__ = ["ModelConfig", "TrainingConfig"]
