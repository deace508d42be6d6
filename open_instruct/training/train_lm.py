"""Pretraining stage: the same names as ``open_instruct`` (one implementation, in :mod:`open_instruct.pretrain`)."""

from open_instruct.api import TextDatasetConfig, TrainingConfig
from open_instruct.model.scratch import ModelConfig
from open_instruct.pretrain import run_training

__all__ = ["ModelConfig", "TextDatasetConfig", "TrainingConfig", "run_training"]
