"""SFT stage (``open_instruct.finetune.run_sft``)."""

from open_instruct.training.train_sft import SFTDatasetConfig, TrainingConfig, run_sft

InstructionDatasetConfig = SFTDatasetConfig

__all__ = ["InstructionDatasetConfig", "SFTDatasetConfig", "TrainingConfig", "run_sft"]
