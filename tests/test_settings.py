"""The settings objects: each field is a flag of the same name and type, built from the parsed flags once, and a
change replaces a flag in every concern that holds it."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from open_instruct.config import TrainArguments, settings_of
from open_instruct.settings import BatchSettings, ModelSettings, RunSettings


def test_every_settings_field_is_a_flag_of_the_same_type() -> None:
    flags = typing.get_type_hints(TrainArguments)
    for concern in dataclasses.fields(RunSettings):
        cls = typing.get_type_hints(RunSettings)[concern.name]
        for name, hint in typing.get_type_hints(cls).items():
            if isinstance(getattr(TrainArguments, name, None), property):
                continue  # a value derived from the flags (whether the losses need the reference)
            assert name in flags, f"{cls.__name__}.{name} is no flag"
            assert hint == flags[name], f"{cls.__name__}.{name}: {hint}, the flag: {flags[name]}"


def test_settings_read_the_parsed_values_not_the_defaults() -> None:
    args = TrainArguments(
        model_name_or_path="m", per_device_train_batch_size=3, data_loader_seed=7, use_lora=True, push_to_hub=True
    )
    cfg = settings_of(args)
    assert cfg.model.model_name_or_path == "m" and cfg.model.use_lora
    assert cfg.batch.per_device_train_batch_size == 3 and cfg.engine.per_device_train_batch_size == 3
    assert cfg.batch.order_seed == 7 and BatchSettings.of(args, data_loader_seed=None).order_seed == args.seed
    assert cfg.hub.push_to_hub and cfg.hub.exp_name == args.exp_name
    assert cfg.reference.needs_reference == args.needs_reference  # a derived value, from the loss registry
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.use_lora = False  # type: ignore[misc]


def test_replaced_changes_a_flag_in_every_concern_that_holds_it() -> None:
    cfg = settings_of(TrainArguments(model_name_or_path="m"))
    changed = cfg.replaced(per_device_train_batch_size=5, gradient_checkpointing=True)
    holders = [c for c in vars(changed).values() if hasattr(c, "per_device_train_batch_size")]
    assert len(holders) >= 3 and all(c.per_device_train_batch_size == 5 for c in holders)
    assert changed.model.gradient_checkpointing and changed.engine.gradient_checkpointing
    assert cfg.batch.per_device_train_batch_size == 1  # the original is untouched
    with pytest.raises(KeyError, match="no_such_flag"):
        cfg.replaced(no_such_flag=1)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({}, False),
        ({"gradient_checkpointing": True}, True),
        ({"activation_memory_budget": 0.5}, True),
        ({"activation_checkpointing_mode": "selected_modules"}, True),
    ],
)
def test_one_checkpointing_rule_for_model_and_engine(flags: dict, expected: bool) -> None:
    cfg = settings_of(TrainArguments(model_name_or_path="m", **flags))
    assert cfg.model.checkpoints_every_layer is expected and cfg.engine.checkpoints_every_layer is expected
    assert ModelSettings.of(TrainArguments(**flags)).checkpoints_every_layer is expected
