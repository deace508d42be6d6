"""``--help``: flags in groups a new user reads in order (config/help_groups.py, the one place that says which), one
line per flag with its default, a short usage line; the API config docstrings list their fields in the same groups."""

from __future__ import annotations

import dataclasses
import inspect
import re
import time
from collections import Counter

import pytest

from open_instruct.api import configs
from open_instruct.api.config_groups import ANY_FLAG, FLAG_OF, doc_block, field_groups
from open_instruct.config import TrainArguments
from open_instruct.config.cli import build_parser
from open_instruct.config.help_groups import GROUP_OF, GROUPS
from open_instruct.config.help_text import render
from open_instruct.config.open_instruct_flags import CLUSTER_ONLY, NO_EFFECT_HERE, OpenInstructFlags
from open_instruct.config.stage_flags import DPO_ONLY, NOT_FOR_PRETRAINING
from tests.conftest import ROOT, run_python

ORDER = ["model", "data", "batch", "loss", "engine", "checkpoints", "tracking", "planning", "open_instruct"]
FIELDS = {f.name: f for f in dataclasses.fields(TrainArguments)}
HELP = build_parser().format_help()


def flag_lines(text: str) -> dict[str, list[str]]:
    """Flag name -> the lines that list it (a line lists the flag it starts with)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"  --(\w+)", line)
        if match:
            found.setdefault(match.group(1), []).append(line)
    return found


def headings(text: str) -> list[str]:
    return [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]


def test_every_flag_is_in_exactly_one_group():
    placed = Counter(name for group in GROUPS for name in group.flags)
    assert {name: n for name, n in placed.items() if n > 1} == {}
    assert sorted(set(FIELDS) - set(placed)) == [], "flags in no group: add them to config/help_groups.py"
    assert sorted(set(placed) - set(FIELDS)) == [], "group entries that are no flag"
    assert {f.name for f in dataclasses.fields(OpenInstructFlags)} <= set(GROUP_OF)


def test_groups_come_in_the_order_a_user_needs_them():
    assert [group.key for group in GROUPS] == ORDER
    assert headings(HELP) == [group.title for group in GROUPS]
    assert [group.heading for group in GROUPS][:3] == ["Model", "Data", "Batch and schedule"]


def test_open_instruct_and_no_effect_flags_come_last():
    last = GROUPS[-1]
    assert last.key == "open_instruct" and set(CLUSTER_ONLY) | set(NO_EFFECT_HERE) <= set(last.flags)
    tail = HELP.split(f"\n{last.title}:\n")[1]
    assert set(flag_lines(tail)) == set(last.flags)  # nothing but those, and all of them, after its heading


def test_head_of_the_help_text():
    lines = HELP.splitlines()
    assert re.fullmatch(
        r"usage: \S+ \[recipe\.yaml\] --model_name_or_path M --mixer_list DATA AMOUNT \[flags\]", lines[0]
    )
    assert len(lines[0]) < 100 and lines[1] == ""
    assert lines[2].startswith("DPO with a cached reference model.")
    assert lines[5] == "Model:" and lines[6].startswith("  --model_name_or_path M ")
    assert "docs/flags.md" in lines[-1]
    assert build_parser().format_usage() == lines[0] + "\n"


def test_each_flag_once_on_one_line_with_its_default():
    listed = flag_lines(HELP)
    assert sorted(listed) == sorted(FIELDS)
    assert {name: len(found) for name, found in listed.items() if len(found) != 1} == {}
    assert len([line for line in HELP.splitlines() if line.startswith("  ")]) == len(FIELDS)  # nothing wraps
    assert max(len(line) for line in HELP.splitlines()) <= 120
    for name, (line,) in listed.items():
        assert re.search(r" \(default [^;)]+(\)|;)", line), line
        default = FIELDS[name].default
        said = "(default: " in FIELDS[name].metadata["help"]
        if isinstance(default, int | float) and not isinstance(default, bool) and not said:
            shown = re.search(r"\(default ([^;)]+)", line).group(1)
            assert float(shown) == float(default), line
    assert "peak learning rate (default 5e-7)" in listed["learning_rate"][0]
    assert "(default 1; also --num_train_epochs)" in listed["num_epochs"][0]
    assert listed["hf_repo_private"][0].endswith("(default true)")
    assert listed["hf_repo_id"][0].endswith("(default <hf_entity>/<exp_name>)")  # the help's own "default:" words


def test_aliases_are_on_their_flags_line():
    listed = flag_lines(HELP)
    for name, field in FIELDS.items():
        for alias in field.metadata.get("aliases", ()):
            assert f"--{alias}" in listed[name][0]


def test_groups_without_flags_are_left_out():
    hints = {"learning_rate": float, "dry_run": bool}
    picked = dataclasses.make_dataclass(
        "Two", [(name, hints[name], dataclasses.field(default=FIELDS[name].default)) for name in hints]
    )
    text = render(picked, "prog")
    assert headings(text) == [GROUPS[2].title, GROUPS[7].title]
    assert set(flag_lines(text)) == set(hints)


def test_sft_and_pretraining_help_leave_out_the_flags_they_reject():
    for stage, rejected in (("sft", DPO_ONLY), ("pretrain", NOT_FOR_PRETRAINING)):
        listed = flag_lines(build_parser(stage=stage).format_help())
        assert not set(listed) & set(rejected)
        assert {"model_name_or_path", "learning_rate", "mixer_list"} <= set(listed)


@pytest.mark.parametrize(
    ("script", "intro"),
    [
        ("dpo_tune_cache.py", "DPO with a cached reference model."),
        ("finetune.py", "Supervised fine-tuning on chat data."),
        ("pretrain.py", "Pretraining on raw text"),
    ],
)
def test_help_of_each_stage_exits_0_fast(script, intro, tmp_path):
    start = time.monotonic()
    result = run_python([f"open_instruct/{script}", "--help"], tmp_path, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"usage: {script} [recipe.yaml] --model_name_or_path M --mixer_list DATA AMOUNT [flags]"
    assert lines[2].startswith(intro) and "Model:" in lines
    assert elapsed < 15, f"--help took {elapsed:.1f} s"


def test_help_imports_no_transformers(tmp_path):
    """--help must stay fast: transformers (seconds to import) is only loaded by a run."""
    code = (
        "import sys\nfrom open_instruct.dpo_tune_cache import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('transformers' in sys.modules)"
    )
    result = run_python(["-c", code], tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"


def test_api_config_docstrings_list_fields_by_the_same_groups():
    titles = [group.heading for group in GROUPS] + ["Any other flag"]
    for config in configs.CONFIG_CLASSES:
        groups = field_groups(config)
        assert inspect.getdoc(config).endswith(doc_block(config)), f"{config.__name__}: rerun config_groups"
        assert sorted(n for _, members in groups for n in members) == sorted(
            f.name for f in dataclasses.fields(config)
        )
        order = [titles.index(title) for title, _ in groups]
        assert order == sorted(order)
    assert field_groups(configs.TrainingConfig)[0] == ("Model", ["tokenizer_name"])
    assert [title for title, _ in field_groups(configs.DPOConfig)] == ["Data", "Loss"]


def test_api_fields_map_onto_real_flags():
    assert set(FLAG_OF.values()) <= set(FIELDS)
    values = configs.training_arguments(configs.TrainingConfig(with_tracking=True, tokenizer_name="t"))
    for name in (f.name for f in dataclasses.fields(configs.TrainingConfig)):
        flag = FLAG_OF.get(name, name)
        if name not in ANY_FLAG and name not in ("dataset_name", "eval_dataset_name", "eval_fraction", "batch_size"):
            assert flag in values or name == "save_format", name  # the dataset fields map in dataset_arguments


def test_the_readme_quotes_help_as_it_prints():
    """The README's excerpt of --help (a fenced block starting with the usage line) is what --help prints, line by
    line and in order ("..." skips lines)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```\n(usage: dpo_tune_cache\.py.*?)```", readme, flags=re.DOTALL)
    assert block, "README.md: no fenced block with the --help usage line"
    printed, position = [re.sub(r"^usage: \S+", "usage: PROG", line) for line in HELP.splitlines()], 0
    for line in block.group(1).splitlines():
        line = re.sub(r"^usage: dpo_tune_cache\.py", "usage: PROG", line)  # the program name is the script's
        if line == "...":
            continue
        assert line in printed[position:], f"README.md quotes a --help line that --help does not print: {line!r}"
        position = printed.index(line, position) + 1
