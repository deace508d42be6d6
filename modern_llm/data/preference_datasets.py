"""Preference pairs for DPO (``Anthropic/hh-rlhf``, ``stanfordnlp/SHP``, local files, rows in memory)."""

from open_instruct.api import PreferenceDatasetConfig

__all__ = ["PreferenceDatasetConfig"]
