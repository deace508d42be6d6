"""SFT stage: the same names as ``open_instruct`` (one implementation, in :mod:`open_instruct.finetune`)."""

from open_instruct.api import SFTDatasetConfig, TrainingConfig
from open_instruct.finetune import run_sft

__all__ = ["SFTDatasetConfig", "TrainingConfig", "run_sft"]
