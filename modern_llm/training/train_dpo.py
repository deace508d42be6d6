"""DPO stage (``open_instruct.api.run_dpo``)."""

from open_instruct.training.train_dpo import DPOConfig, PreferenceDatasetConfig, TrainingConfig, run_dpo

__all__ = ["DPOConfig", "PreferenceDatasetConfig", "TrainingConfig", "run_dpo"]
