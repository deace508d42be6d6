"""Flags as typed dataclasses (:mod:`.arguments`), command line and YAML parsing (:mod:`.cli`), validation.

``from open_instruct.config import TrainArguments, UserError, validate`` is the public import path.
"""

from open_instruct.config.arguments import (
    CHAT_TEMPLATES,
    DATASET_FORMATS,
    NOT_YET_SUPPORTED,
    SCHEDULERS,
    DPOArguments,
    TrainArguments,
    UserError,
    default_reference_cache_dir,
    validate,
)

__all__ = [
    "CHAT_TEMPLATES",
    "DATASET_FORMATS",
    "NOT_YET_SUPPORTED",
    "SCHEDULERS",
    "DPOArguments",
    "TrainArguments",
    "UserError",
    "default_reference_cache_dir",
    "validate",
]
