"""Every documented import path of the Python API names the very objects of ``open_instruct.api``: one implementation,
no second copy behind another path, and no re-export layer left in ``open_instruct.training``."""

from __future__ import annotations

import importlib

import pytest

import open_instruct.api as api
from open_instruct import errors

STAGES_AND_CONFIGS = (
    "run_training",
    "run_sft",
    "run_dpo",
    "TrainingConfig",
    "ModelConfig",
    "DPOConfig",
    "TextDatasetConfig",
    "SFTDatasetConfig",
    "PreferenceDatasetConfig",
)

# module -> {name there: name in open_instruct.api}
DOCUMENTED = {
    "open_instruct": {name: name for name in STAGES_AND_CONFIGS},
    "open_instruct.api": {name: name for name in api.__all__},
    "modern_llm.config": {"ModelConfig": "ModelConfig", "TrainingConfig": "TrainingConfig"},
    "modern_llm.data.preference_datasets": {"PreferenceDatasetConfig": "PreferenceDatasetConfig"},
    "modern_llm.data.instruction_datasets": {
        "InstructionDatasetConfig": "SFTDatasetConfig",
        "SFTDatasetConfig": "SFTDatasetConfig",
    },
    "modern_llm.data.lm_datasets": {"TextDatasetConfig": "TextDatasetConfig"},
    "modern_llm.training.train_lm": {
        name: name for name in ("ModelConfig", "TextDatasetConfig", "TrainingConfig", "run_training")
    },
    "modern_llm.training.train_sft": {
        "InstructionDatasetConfig": "SFTDatasetConfig",
        **{name: name for name in ("SFTDatasetConfig", "TrainingConfig", "run_sft")},
    },
    "modern_llm.training.train_dpo": {
        name: name for name in ("DPOConfig", "PreferenceDatasetConfig", "TrainingConfig", "run_dpo")
    },
}

# What the repository's tests, scripts and docs import from open_instruct.api beyond the stages and configs.
USED_HELPERS = (
    "dataset_arguments",
    "dpo_arguments",
    "final_checkpoint",
    "fresh_accelerate_state",
    "plan_run",
    "preference_arguments",
    "pretrain_arguments",
    "training_arguments",
)


@pytest.mark.parametrize("module", sorted(DOCUMENTED))
def test_documented_path_names_the_api_objects(module):
    """``from <module> import <name>`` gives ``open_instruct.api``'s object itself, and ``__all__`` lists it."""
    found = importlib.import_module(module)
    for name, api_name in DOCUMENTED[module].items():
        assert getattr(found, name) is getattr(api, api_name), f"{module}.{name}"
    if module != "open_instruct":
        assert set(DOCUMENTED[module]) <= set(found.__all__), module


def test_open_instruct_exports_the_api_and_user_error():
    """The lazy top-level names: the API's objects, and the one ``UserError`` (which ``open_instruct.config`` shares)."""
    import open_instruct
    import open_instruct.config

    assert open_instruct.UserError is errors.UserError is open_instruct.config.UserError
    assert set(open_instruct.__all__) == {*STAGES_AND_CONFIGS, "UserError"}


def test_helpers_used_across_the_repository_import_from_the_api():
    """The helpers tests and scripts reach for live in the API package, exported from ``open_instruct.api``."""
    for name in (*STAGES_AND_CONFIGS, *USED_HELPERS):
        assert name in api.__all__, name
        module = getattr(api, name).__module__
        assert module.startswith("open_instruct.api.") or name == "ModelConfig", (name, module)
    assert api.ModelConfig.__module__ == "open_instruct.model.scratch"


@pytest.mark.parametrize("stage", ["train_lm", "train_sft", "train_dpo"])
def test_no_stage_re_export_module_in_training(stage):
    """The stages live in ``open_instruct.api`` only: ``open_instruct.training.train_*`` are gone."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"open_instruct.training.{stage}")


@pytest.mark.parametrize(("entry", "gone"), [("finetune", "run_sft"), ("pretrain", "run_training")])
def test_entry_scripts_hold_no_api_function(entry, gone):
    """An entry script keeps its command line and ``run``; its Python API function lives in ``open_instruct.api``."""
    module = importlib.import_module(f"open_instruct.{entry}")
    assert callable(module.run) and callable(module.main)
    assert not hasattr(module, gone)
