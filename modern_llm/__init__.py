"""The ``modern_llm`` import paths of the documented API, as thin re-exports of ``open_instruct`` (one implementation).

    from modern_llm.config import ModelConfig, TrainingConfig
    from modern_llm.data.preference_datasets import PreferenceDatasetConfig
    from modern_llm.data.instruction_datasets import InstructionDatasetConfig
    from modern_llm.training.train_lm import run_training
    from modern_llm.training.train_sft import run_sft
    from modern_llm.training.train_dpo import DPOConfig, run_dpo

The three stages: ``run_training`` (pretraining from scratch) -> ``run_sft`` -> ``run_dpo``; each returns the path of
its final checkpoint, which the next one takes as it is.
"""
