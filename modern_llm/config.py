"""Run and model settings: ``TrainingConfig`` (every stage), ``ModelConfig`` (pretraining's architecture)."""

from open_instruct.api import TrainingConfig
from open_instruct.model.scratch import ModelConfig

__all__ = ["ModelConfig", "TrainingConfig"]
