"""The Python API, one surface: the config classes (:mod:`.configs`) and the stages that run them (:mod:`.stages`).

    from open_instruct.api import run_training, run_sft, run_dpo, TrainingConfig, ModelConfig, DPOConfig
    from open_instruct.api import TextDatasetConfig, SFTDatasetConfig, PreferenceDatasetConfig

``open_instruct`` and ``modern_llm`` import these very objects; ``ModelConfig`` (pretraining's architecture) lives in
:mod:`open_instruct.model.scratch` and is exported here so that the API is one import path.
"""

from open_instruct.api.configs import (
    HUB_FORMATS,
    DatasetSource,
    DPOConfig,
    PreferenceDatasetConfig,
    SFTDatasetConfig,
    TextDatasetConfig,
    TrainingConfig,
    accumulation_steps,
    arguments_from,
    dataset_arguments,
    dataset_path,
    preference_arguments,
    training_arguments,
    world_size,
)
from open_instruct.api.stages import (
    dpo_arguments,
    final_checkpoint,
    fresh_accelerate_state,
    plan_run,
    pretrain_arguments,
    run_dpo,
    run_sft,
    run_training,
    sft_arguments,
    source_tokenizer,
    unpack_checkpoint,
)
from open_instruct.model.scratch import ModelConfig

__all__ = [
    "HUB_FORMATS",
    "DPOConfig",
    "DatasetSource",
    "ModelConfig",
    "PreferenceDatasetConfig",
    "SFTDatasetConfig",
    "TextDatasetConfig",
    "TrainingConfig",
    "accumulation_steps",
    "arguments_from",
    "dataset_arguments",
    "dataset_path",
    "dpo_arguments",
    "final_checkpoint",
    "fresh_accelerate_state",
    "plan_run",
    "preference_arguments",
    "pretrain_arguments",
    "run_dpo",
    "run_sft",
    "run_training",
    "sft_arguments",
    "source_tokenizer",
    "training_arguments",
    "unpack_checkpoint",
    "world_size",
]
