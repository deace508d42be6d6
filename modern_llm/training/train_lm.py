"""Pretraining stage (``open_instruct.pretrain.run_training``)."""

from open_instruct.training.train_lm import ModelConfig, TextDatasetConfig, TrainingConfig, run_training

__all__ = ["ModelConfig", "TextDatasetConfig", "TrainingConfig", "run_training"]
