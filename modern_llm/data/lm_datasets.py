"""Raw text for pretraining (``.txt``, ``.jsonl``/parquet with a text column, or a hub dataset), packed into blocks."""

from open_instruct.api import TextDatasetConfig

__all__ = ["TextDatasetConfig"]
