"""SFT stage: the same names as ``open_instruct`` (one implementation, in :mod:`open_instruct.api`)."""

from open_instruct.api import SFTDatasetConfig, TrainingConfig, run_sft

InstructionDatasetConfig = SFTDatasetConfig

__all__ = ["InstructionDatasetConfig", "SFTDatasetConfig", "TrainingConfig", "run_sft"]
