"""Chat data for SFT: ``{"messages": [...]}`` rows (preference rows contribute their chosen side)."""

from open_instruct.api import SFTDatasetConfig

InstructionDatasetConfig = SFTDatasetConfig

__all__ = ["InstructionDatasetConfig", "SFTDatasetConfig"]
