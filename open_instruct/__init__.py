"""open_instruct-dpo: pretraining, supervised fine-tuning and DPO with a cached reference, from the CLI or Python.

from open_instruct import run_training, run_sft, run_dpo, TrainingConfig, ModelConfig, DPOConfig
from open_instruct import TextDatasetConfig, SFTDatasetConfig, PreferenceDatasetConfig
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module; imported on first use so that `import open_instruct.config` (the CLI) stays light.
_EXPORTS = {
    "run_dpo": "open_instruct.api",
    "DPOConfig": "open_instruct.api",
    "TrainingConfig": "open_instruct.api",
    "PreferenceDatasetConfig": "open_instruct.api",
    "SFTDatasetConfig": "open_instruct.api",
    "TextDatasetConfig": "open_instruct.api",
    "ModelConfig": "open_instruct.api",
    "run_training": "open_instruct.api",
    "run_sft": "open_instruct.api",
    "UserError": "open_instruct.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'open_instruct' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
