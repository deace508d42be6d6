"""Pretraining stage: the same names as ``open_instruct`` (one implementation, in :mod:`open_instruct.api`)."""

from open_instruct.api import ModelConfig, TextDatasetConfig, TrainingConfig, run_training

__all__ = ["ModelConfig", "TextDatasetConfig", "TrainingConfig", "run_training"]
