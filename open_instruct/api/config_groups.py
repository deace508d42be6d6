"""The Python API's config fields under the ``--help`` groups (:mod:`open_instruct.config.help_groups`), for the
config classes' docstrings: ``python -m open_instruct.api.config_groups`` prints the blocks, and
tests/config/test_help.py checks each docstring holds its class's block.

A field's group is that of the ``TrainArguments`` flag it sets (:func:`open_instruct.api.configs.training_arguments`
and ``dataset_arguments``): the same name, or its entry in ``FLAG_OF``.
"""

from __future__ import annotations

import dataclasses
import textwrap

from open_instruct.config.help_groups import GROUP_OF, GROUPS

# API field -> the TrainArguments flag it sets, where the names differ.
FLAG_OF = {
    "run_name": "exp_name",
    "tokenizer_name": "tokenizer_name_or_path",
    "dataset_name": "mixer_list",
    "amount": "mixer_list",
    "split": "mixer_list_splits",
    "text_column": "mixer_list",  # which column of the mixer's files holds the text (pretraining)
    "eval_dataset_name": "eval_mixer_list",
    "eval_split": "eval_mixer_list_splits",
    "max_samples": "max_train_samples",
    "max_length": "max_response_length",
    "max_prompt_length": "max_seq_length",
    "block_size": "max_seq_length",
    "batch_size": "gradient_accumulation_steps",  # derived: batch_size / (micro_batch_size x processes)
    "micro_batch_size": "per_device_train_batch_size",
    "max_steps": "max_train_steps",
    "save_every": "checkpointing_steps",
    "save_format": "output_dir",
    "log_every": "logging_steps",
    "eval_every": "eval_steps",
    "reference_cache_dir": "reference_logprobs_cache_path",
}
ANY_FLAG = ("extra",)  # TrainingConfig.extra: any TrainArguments flag by name, listed after the groups
HEADING = "Fields by ``--help`` group:"


def field_groups(cls: type) -> list[tuple[str, list[str]]]:
    """(group title, the class's fields in it, in field order) for each group the class has, in ``--help`` order;
    then ("Any other flag", ["extra"]) when the class has ``extra``."""
    names = [f.name for f in dataclasses.fields(cls)]
    flags = {n: FLAG_OF.get(n, n) for n in names if n not in ANY_FLAG}
    groups = [(group.heading, [n for n, flag in flags.items() if GROUP_OF[flag] == group.key]) for group in GROUPS]
    found = [(title, members) for title, members in groups if members]
    extra = [n for n in names if n in ANY_FLAG]
    return found + ([("Any other flag", extra)] if extra else [])


def doc_block(cls: type, width: int = 112) -> str:
    """The block a config class's docstring ends with: one ``- Group: field, field`` item per group."""
    lines = [HEADING, ""]
    for title, members in field_groups(cls):
        lines += textwrap.wrap(f"- {title}: {', '.join(members)}", width, subsequent_indent="  ")
    return "\n".join(lines)


if __name__ == "__main__":
    from open_instruct.api import configs

    for config in configs.CONFIG_CLASSES:
        print(f"{config.__name__}:\n{doc_block(config)}\n")
