"""What a flag needs to have an effect, and what happens when it is given without it: one table, ``FLAG_RULES``.

A flag is *given* when its value differs from its default. A given flag whose ``applies(args)`` is false either stops
the run (``error``: one ``error:`` line, exit code 2) or prints one ``note:`` line saying it has no effect and why
(``note``: used where a shared recipe may carry the flag harmlessly). The flag-rules table of docs/flags.md is
generated from here (``python -m open_instruct.config.flag_rules --write``) and a test checks it is current.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from open_instruct.data.sources import is_data_file
from open_instruct.errors import say_note


@dataclass(frozen=True)
class FlagRule:
    """``applies(args)``: whether the flag can act; ``needs``: that condition in words; ``kind``: error or note;
    ``why``: the rest of the message."""

    needs: str
    applies: Callable[[Any], bool]
    kind: str
    why: str
    detail: Callable[[Any], str] | None = None  # names the offending value (a file) in the message
    overridden: bool = False  # ``needs`` names a flag that takes its place, not one it acts through

    @property
    def when(self) -> str:
        """When the rule fires, in words: ``without --use_lora``, ``alongside --warmup_steps``."""
        return f"{'alongside' if self.overridden else 'without'} {self.needs}"

    def message(self, flag: str, args: Any = None) -> str:
        """The error (without ``error:``) or the whole note line."""
        why = self.detail(args) if self.detail is not None and args is not None else self.why
        if self.kind == "error":
            return f"--{flag} needs {self.needs}: {why}"
        return f"note: --{flag} has no effect {self.when}: {why}"


def _lora(args: Any) -> bool:
    return bool(args.use_lora or args.use_qlora)


def _local(name: str | None) -> bool:
    return bool(name) and Path(str(name)).expanduser().is_dir()


def _hub_model(args: Any) -> bool:
    return not _local(args.model_name_or_path)


def _hub_tokenizer(args: Any) -> bool:
    return not _local(args.tokenizer_name_or_path or args.model_name_or_path)


def _eval_set(args: Any) -> bool:
    return bool(args.eval_mixer_list) or args.eval_fraction > 0


def _several_processes(args: Any) -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _deepspeed(args: Any) -> bool:
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return args.zero_stage is not None or bool(args.deepspeed_config) or launched


def _transformers_major() -> int:
    # transformers takes seconds to import: --help, validation and the planner never need it
    import transformers

    return int(transformers.__version__.split(".")[0])


def single_file_split_problems(mix: list[str], splits: list[str], flag: str, default: str) -> list[str]:
    """A split asked of a single data file that does not name it: the file has no splits, so its rows would silently be
    the same whatever the split. Accepted: ``train`` (what ``datasets`` calls a lone file's rows), the list's default,
    and a split the file name starts with (``test.jsonl``)."""

    names = mix[0::2]
    each = splits if len(splits) == len(names) else splits[:1] * len(names)
    problems = []
    for name, split in zip(names, each, strict=False):
        path = Path(name).expanduser()
        if split in ("train", default) or not (path.is_file() and is_data_file(path)):
            continue
        if not path.name.startswith((f"{split}.", f"{split}-", f"{split}_")):
            problems.append(
                f"--{flag} {split}: {name} is a single file and has no splits, so it would read the same rows as "
                f"'train'; pass a folder or hub dataset with a {split!r} split, or a file named {split}.jsonl"
            )
    return problems


def _split_problems(args: Any) -> list[str]:
    return single_file_split_problems(args.mixer_list, args.mixer_list_splits, "mixer_list_splits", "train")


def _eval_split_problems(args: Any) -> list[str]:
    return single_file_split_problems(
        args.eval_mixer_list, args.eval_mixer_list_splits, "eval_mixer_list_splits", "test"
    )


def _file_detail(problems: Callable[[Any], list[str]], fallback: str) -> Callable[[Any], str]:
    def detail(args: Any) -> str:
        found = problems(args)
        return found[0].partition(": ")[2] if found else fallback

    return detail


_LORA = "no adapters are trained (--use_qlora counts too)"
_SPLITS = "a single file has no splits: asked for another, it would give the same rows (pass a folder or hub dataset)"
_EVAL_SPLITS = "they name parts of the --eval_mixer_list datasets; a single file has no splits"
_WANDB = "nothing is logged to wandb"

FLAG_RULES: dict[str, FlagRule] = {
    "dry_run_gpu": FlagRule("--dry_run", lambda a: a.dry_run, "error", "it only sets what a dry run plans for"),
    "dry_run_num_processes": FlagRule(
        "--dry_run", lambda a: a.dry_run, "error", "it only sets what a dry run plans for"
    ),
    "dry_run_num_nodes": FlagRule("--dry_run", lambda a: a.dry_run, "error", "it only sets what a dry run plans for"),
    "dry_run_num_pairs": FlagRule("--dry_run", lambda a: a.dry_run, "error", "it only sets what a dry run plans for"),
    "dry_run_mfu": FlagRule("--dry_run", lambda a: a.dry_run, "error", "it only sets what a dry run plans for"),
    "lora_rank": FlagRule("--use_lora", _lora, "note", _LORA),
    "lora_alpha": FlagRule("--use_lora", _lora, "note", _LORA),
    "lora_dropout": FlagRule("--use_lora", _lora, "note", _LORA),
    "lora_target_modules": FlagRule("--use_lora", _lora, "note", _LORA),
    "merge_lora": FlagRule("--use_lora", _lora, "error", "there is no adapter to merge"),
    "keep_last_n_checkpoints": FlagRule(
        "--checkpointing_steps",
        lambda a: a.checkpointing_steps is not None,
        "note",
        "only the step checkpoints --checkpointing_steps saves are pruned",
    ),
    "wandb_project": FlagRule("--with_tracking", lambda a: a.with_tracking, "note", _WANDB),
    "wandb_entity": FlagRule("--with_tracking", lambda a: a.with_tracking, "note", _WANDB),
    "wandb_group_name": FlagRule("--with_tracking", lambda a: a.with_tracking, "note", _WANDB),
    "exp_name": FlagRule(
        "--with_tracking or --push_to_hub",
        lambda a: a.with_tracking or a.push_to_hub,
        "note",
        "it names the wandb run and the default hub repo only",
    ),
    "hf_entity": FlagRule(
        "--push_to_hub",
        lambda a: a.push_to_hub,
        "note",
        "it names the owner of the pushed repo (open-instruct's Hub dataset cache is not used here)",
    ),
    "push_checkpoints_to_hub": FlagRule(
        "--push_to_hub", lambda a: a.push_to_hub, "error", "checkpoints go to the Hub repo --push_to_hub sets up"
    ),
    "hf_repo_id": FlagRule("--push_to_hub", lambda a: a.push_to_hub, "error", "nothing is uploaded without it"),
    "hf_repo_revision": FlagRule("--push_to_hub", lambda a: a.push_to_hub, "error", "nothing is uploaded without it"),
    "hf_repo_private": FlagRule("--push_to_hub", lambda a: a.push_to_hub, "error", "nothing is uploaded without it"),
    "eval_steps": FlagRule("an evaluation set", _eval_set, "error", "pass --eval_mixer_list or --eval_fraction"),
    "eval_mixer_list_splits": FlagRule(
        "--eval_mixer_list datasets with those splits",
        lambda a: bool(a.eval_mixer_list) and not _eval_split_problems(a),
        "error",
        _EVAL_SPLITS,
        _file_detail(_eval_split_problems, _EVAL_SPLITS),
    ),
    "mixer_list_splits": FlagRule(
        "datasets with those splits",
        lambda a: not _split_problems(a),
        "error",
        _SPLITS,
        _file_detail(_split_problems, _SPLITS),
    ),
    "model_revision": FlagRule("a hub model", _hub_model, "note", "a local model folder is read as it is on disk"),
    "tokenizer_revision": FlagRule(
        "a hub tokenizer", _hub_tokenizer, "note", "a local tokenizer folder is read as it is on disk"
    ),
    "load_balancing_weight": FlagRule(
        "--load_balancing_loss", lambda a: a.load_balancing_loss, "note", "no router loss is added"
    ),
    "offload_optimizer": FlagRule(
        "DeepSpeed", _deepspeed, "error", "ZeRO offload flags need --zero_stage or --deepspeed_config"
    ),
    "offload_param": FlagRule(
        "DeepSpeed", _deepspeed, "error", "ZeRO offload flags need --zero_stage or --deepspeed_config"
    ),
    "reference_batch_size": FlagRule(
        "a reference pass",
        lambda a: a.needs_reference,
        "note",
        "the losses listed (or --reference_free) skip the reference pass",
    ),
    "warmup_ratio": FlagRule(
        "--warmup_steps",
        lambda a: a.warmup_steps is None,
        "note",
        "--warmup_steps sets the warmup length instead",
        overridden=True,
    ),
    "num_epochs": FlagRule(
        "--max_train_steps",
        lambda a: a.max_train_steps is None,
        "note",
        "--max_train_steps sets the length of training instead",
        overridden=True,
    ),
    "timeout": FlagRule(
        "a launcher with several processes", _several_processes, "note", "one process runs no collective operation"
    ),
    "low_cpu_mem_usage": FlagRule(
        "transformers < 5",
        lambda a: _transformers_major() < 5,
        "note",
        "transformers 5 always loads weights without the extra copy",
    ),
}

# --use_slow_tokenizer's note is said when the tokenizer loads (model/modeling.py: SLOW_TOKENIZER_NOTE): its condition,
# a tokenizer with no slow version, is known only once the files are read.


def rule_problems(args: Any, defaults: Any, say: Callable[[str], None] | None = None) -> list[str]:
    """The ``error`` rules broken by ``args`` (messages); the ``note`` rules' lines go to ``say`` (default: stderr
    of rank 0, once per process)."""
    say = say or say_note
    problems = []
    for flag, rule in FLAG_RULES.items():
        value, default = getattr(args, flag), getattr(defaults, flag)
        if value == default or rule.applies(args):
            continue
        if rule.kind == "error":
            problems.append(rule.message(flag, args))
        else:
            say(rule.message(flag, args))
    return problems


def rules_table() -> str:
    """The table of the rules in docs/flags.md, in Markdown."""
    lines = ["| flag | given | gives | why |", "| --- | --- | --- | --- |"]
    for flag, rule in FLAG_RULES.items():
        lines.append(f"| `--{flag}` | {rule.when} | {rule.kind} | {rule.why} |")
    lines.append(
        "| `--use_slow_tokenizer` | with a tokenizer that has no slow version | note | a tokenizer.json-only "
        "tokenizer loads fast |"
    )
    return "\n".join(lines)


START, END = "<!-- flag-rules:start -->", "<!-- flag-rules:end -->"
FLAGS_PAGE = "docs/flags.md"  # the page that holds the table, from the repository root


def with_table(page: str) -> str:
    """``page`` with the text between the flag-rules markers replaced by :func:`rules_table`."""
    head, _, rest = page.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{rules_table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> None:
    """Print the table, or with ``--write [PAGE]`` put it between the markers of PAGE (default docs/flags.md)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--write"] and len(argv) <= 2:
        path = Path(argv[1]) if len(argv) == 2 else Path(__file__).resolve().parents[2] / FLAGS_PAGE
        path.write_text(with_table(path.read_text()))
    else:
        print(rules_table())


if __name__ == "__main__":
    main()
