"""DPO stage: the same names as ``open_instruct`` (one implementation, in :mod:`open_instruct.api`)."""

from open_instruct.api import DPOConfig, PreferenceDatasetConfig, TrainingConfig, run_dpo

__all__ = ["DPOConfig", "PreferenceDatasetConfig", "TrainingConfig", "run_dpo"]
