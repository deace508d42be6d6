"""Flags as typed dataclasses (:mod:`.arguments`), command line and YAML parsing (:mod:`.cli`), validation.

``from open_instruct.config import TrainArguments, validate`` is the public import path; ``settings_of(args)`` builds
the per-concern settings objects (:mod:`open_instruct.settings`) every layer below reads. ``UserError`` is re-exported
for user code written against older versions; it lives in :mod:`open_instruct.errors`.
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
from open_instruct.settings import RunSettings


def settings_of(args: TrainArguments) -> RunSettings:
    """The per-concern settings of a run (model, data, batch, reference, engine, optim, checkpoint, tracking, hub,
    plan), read once from its parsed flags."""
    return RunSettings.of(args)


__all__ = [
    "CHAT_TEMPLATES",
    "DATASET_FORMATS",
    "NOT_YET_SUPPORTED",
    "SCHEDULERS",
    "DPOArguments",
    "TrainArguments",
    "UserError",
    "default_reference_cache_dir",
    "settings_of",
    "validate",
]
