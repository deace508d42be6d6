"""Every class of bad input: one ``error:`` line naming the file, 1-based line or row, and field; exit code 2; before
the model loads; nothing written (no output folder, no prepared-data or reference cache, no model)."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest

from open_instruct.data.sources import load_rows
from open_instruct.dpo_tune_cache import main
from tests.conftest import run_cli, small_run_args

SAY = "count up from 1 to 3"
GOOD = {
    "chosen": [{"role": "user", "content": SAY}, {"role": "assistant", "content": "1 2 3"}],
    "rejected": [{"role": "user", "content": SAY}, {"role": "assistant", "content": "1 0 -1"}],
}


def _flags(tmp_path: Path, model: Path, data: Path | str, **overrides) -> list[str]:
    """A small run whose outputs all lie under tmp_path (out, data_cache, ref_cache), flags overridable."""
    output_dir = overrides.pop("output_dir", tmp_path / "out")
    values = {
        "mixer_list": [str(data), "1.0"],
        "dataset_local_cache_dir": str(tmp_path / "data_cache"),
        "reference_logprobs_cache_path": str(tmp_path / "ref_cache"),
        **overrides,
    }
    return small_run_args(model, data, output_dir, **values)


def _nothing_written(tmp_path: Path) -> None:
    for name in ("out", "data_cache", "ref_cache"):
        assert not (tmp_path / name).exists(), f"{name} was written"


def _fails(argv: list[str], capsys, tmp_path: Path) -> str:
    """Run the entry in this process: exit code 2, one ``error:`` line on stderr, nothing written."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    _nothing_written(tmp_path)
    return err.removeprefix("error: ")


def _fails_cli(argv: list[str], tmp_path: Path) -> str:
    """The same through ``python -m open_instruct.dpo_tune_cache``: no traceback, one line, exit code 2."""
    result = run_cli(argv, tmp_path / "ref_cache", timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    _nothing_written(tmp_path)
    return lines[0].removeprefix("error: ")


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- 1. text encodings ----------------------------------------------------------------------------------------------


def test_a_non_utf8_byte_names_the_file_and_line(tmp_path, tiny_model_dir):
    data = tmp_path / "latin1.jsonl"
    lines = [json.dumps(GOOD).encode()] * 4
    lines[2] = lines[2].replace(b"1 2 3", "1 2 3 caf\u00e9".encode("latin-1"))  # é as one latin-1 byte
    data.write_bytes(b"\n".join(lines) + b"\n")
    column = lines[2].index(b"\xe9") + 1
    err = _fails_cli(_flags(tmp_path, tiny_model_dir, data), tmp_path)
    assert err == f"{data}: line 3: not UTF-8 text (byte 0xe9 at column {column}); save the file as UTF-8"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".jsonl.gz"])
def test_a_byte_order_mark_and_blank_lines_are_accepted(tmp_path, suffix):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    if suffix == ".json":
        body = "\n" + json.dumps(rows, indent=1) + "\n\n"
    else:
        body = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n  \n" + json.dumps(rows[2]) + "\n\n"
    raw = b"\xef\xbb\xbf" + body.encode()
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    assert load_rows(str(path), "train") == rows


def test_other_readers_name_the_line_too(tmp_path):
    from open_instruct.data.text import load_documents
    from open_instruct.errors import UserError

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"first document\n\nsecond \x80 document\n")
    with pytest.raises(UserError, match=r"corpus.txt: line 3: not UTF-8 text \(byte 0x80 at column 8\)"):
        load_documents(str(corpus), "train", "text")
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(json.dumps(GOOD).encode("utf-16"))
    with pytest.raises(UserError, match=r"utf16.jsonl: line 1: not UTF-8 .*\(it looks like UTF-16\)"):
        load_rows(str(utf16), "train")
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UserError, match="deep.jsonl: line 1: JSON nested too deeply"):
        load_rows(str(deep), "train")


def test_a_yaml_recipe_that_is_not_utf8_names_its_line(tmp_path, tiny_model_dir, synthetic_data, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"beta: 0.1\nexp_name: \xff\n")
    err = _fails([str(recipe), *_flags(tmp_path, tiny_model_dir, synthetic_data[0])], capsys, tmp_path)
    assert err == f"{recipe}: line 2: not UTF-8 text (byte 0xff)"


# --- 2. broken compression ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda raw: gzip.compress(raw)[:-20], "Compressed file ended before the end-of-stream marker was reached"),
        (lambda raw: raw, "Not a gzipped file"),
        (lambda raw: gzip.compress(raw)[:10] + b"\x00" * 40 + gzip.compress(raw)[50:], ""),
    ],
    ids=["truncated", "not_gzip", "corrupt"],
)
def test_broken_compression_names_the_file(tmp_path, tiny_model_dir, capsys, damage, reason):
    data = tmp_path / "pairs.jsonl.gz"
    data.write_bytes(damage(("".join(json.dumps(GOOD) + "\n" for _ in range(40))).encode()))
    err = _fails(_flags(tmp_path, tiny_model_dir, data), capsys, tmp_path)
    assert err.startswith(f"{data}: not a readable gzip file (damaged or truncated): ") and reason in err


# --- 3. valid JSON of the wrong shape -------------------------------------------------------------------------------

WRONG_SHAPES = [
    ("[1, 2]", "row 2 (line 3): expected a JSON object (one row), got a JSON list"),
    ('"just a string"', "row 2 (line 3): expected a JSON object (one row), got a JSON string"),
    (
        {"chosen": "not a list", "rejected": GOOD["rejected"]},
        "row 2 (line 3): bad_messages: field 'chosen' must be a non-empty list of {role, content} messages, got str",
    ),
    (
        {"chosen": 7, "rejected": GOOD["rejected"]},
        "row 2 (line 3): bad_messages: field 'chosen' must be a non-empty list of {role, content} messages, got int",
    ),
    (
        {"chosen": [GOOD["chosen"][0], {"content": "1 2 3"}], "rejected": GOOD["rejected"]},
        "row 2 (line 3): bad_messages: field 'chosen' message 2 must have 'role' and 'content'",
    ),
    (
        {"chosen": [GOOD["chosen"][0], "1 2 3"], "rejected": GOOD["rejected"]},
        "row 2 (line 3): bad_messages: field 'chosen' message 2 must have 'role' and 'content'",
    ),
    (
        {"chosen": GOOD["chosen"], "rejected": [GOOD["rejected"][0], {"role": "assistant", "content": ["1"]}]},
        "row 2 (line 3): bad_messages: field 'rejected' message 2 content must be a string, got list",
    ),
    (
        {"chosen": GOOD["chosen"], "rejected": [GOOD["rejected"][0], {"role": 3, "content": "1"}]},
        "row 2 (line 3): bad_role: field 'rejected' message 2: role of type int is not one of",
    ),
]


@pytest.mark.parametrize("bad,message", WRONG_SHAPES, ids=[m.split(": ", 2)[-1][:30] for _, m in WRONG_SHAPES])
def test_valid_json_of_the_wrong_shape_names_file_row_and_field(tmp_path, tiny_model_dir, capsys, bad, message):
    data = _jsonl(tmp_path / "shapes.jsonl", [GOOD, "", bad, GOOD])  # a blank line 2: row 2 is line 3
    err = _fails(_flags(tmp_path, tiny_model_dir, data), capsys, tmp_path)
    assert err.startswith(f"{data}: {message}"), err


def test_wrong_shapes_in_json_and_prompt_formats(tmp_path, tiny_model_dir, capsys):
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps([GOOD, GOOD, 5]))
    assert _fails(_flags(tmp_path, tiny_model_dir, listed), capsys, tmp_path) == (
        f"{listed}: row 3: expected a JSON object (one row), got a JSON number"
    )
    scalar = tmp_path / "scalar.json"
    scalar.write_text('"rows"')
    assert _fails(_flags(tmp_path, tiny_model_dir, scalar), capsys, tmp_path).endswith("got a JSON string")
    prompts = _jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": SAY, "chosen": "1 2 3", "rejected": "3 2 1"},
            {"prompt": {"text": SAY}, "chosen": "a", "rejected": "b"},
        ],
    )
    err = _fails(_flags(tmp_path, tiny_model_dir, prompts), capsys, tmp_path)
    assert err.startswith(f"{prompts}: row 2 (line 2): bad_messages: field 'prompt' must be a non-empty list")


# --- 4. roles -------------------------------------------------------------------------------------------------------


def _with_role(role: str, where: str = "chosen") -> dict:
    row = json.loads(json.dumps(GOOD))
    row["chosen"].insert(1, {"role": role, "content": "between"})
    row["rejected"].insert(1, {"role": role, "content": "between"})
    return row


def test_an_unknown_role_is_refused_naming_file_row_and_field(tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "roles.jsonl", [GOOD, GOOD, _with_role("wizard")])
    err = _fails(_flags(tmp_path, tiny_model_dir, data), capsys, tmp_path)
    assert err.startswith(
        f"{data}: row 3 (line 3): bad_role: field 'chosen' message 2: role 'wizard' is not one of assistant, system, "
    )


def test_tool_messages_only_where_the_chat_template_renders_them(tmp_path, tiny_model_dir, capsys):
    from open_instruct.data.chat_templates import CHAT_TEMPLATES
    from open_instruct.data.synthetic import CHAT_TEMPLATE
    from open_instruct.data.tokenize import template_roles

    class Template:
        def __init__(self, template: str) -> None:
            self.chat_template = template

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, _ = render_jinja_template(
                [messages], chat_template=self.chat_template, add_generation_prompt=add_generation_prompt,
                bos_token="<s>", eos_token="</s>",
            )  # fmt: skip
            return rendered[0]

    assert template_roles(Template(CHAT_TEMPLATES["tulu"])) == {"system", "user", "assistant"}
    assert template_roles(Template(CHAT_TEMPLATE)) == {"system", "user", "assistant", "tool"}
    refuses = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    assert template_roles(Template(refuses + "{{ m['content'] }}{% endfor %}")) == {"user", "assistant", "tool"}

    data = _jsonl(tmp_path / "tools.jsonl", [_with_role("tool")] * 4)
    # The tulu template drops a tool message: refused.
    err = _fails(_flags(tmp_path, tiny_model_dir, data, chat_template_name="tulu"), capsys, tmp_path)
    assert err.startswith(
        f"{data}: row 1 (line 1): bad_role: field 'chosen' message 2: role 'tool': the chat template does not render "
    )
    # The tiny model's own template renders every role: the rows are prepared.
    main(_flags(tmp_path, tiny_model_dir, data, cache_dataset_only="true"))
    stats = json.loads((tmp_path / "out" / "dataset_statistics.json").read_text())
    assert stats["datasets"][0]["valid"] == 4


def test_sft_conversations_check_roles_too():
    from open_instruct.data.formats import ALL_ROLES, RowError
    from open_instruct.data.sft import conversation

    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "t"}, GOOD["chosen"][1]]}
    with pytest.raises(RowError, match="field 'messages' message 2: role 'tool': the chat template does not render"):
        conversation(chat)
    assert conversation(chat, ALL_ROLES)[1] == {"role": "tool", "content": "t"}
    with pytest.raises(RowError, match="message 1: role 'wizard' is not one of assistant, system, user"):
        conversation({"messages": [{"role": "wizard", "content": "q"}, GOOD["chosen"][1]]})


# --- 5. paths that exist as the wrong kind of thing -----------------------------------------------------------------


def _path_case(tmp_path: Path, model: Path, data: Path, case: str) -> tuple[list[str], str]:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    flags = {
        "output_dir_is_a_file": ({"output_dir": str(a_file)}, f"--output_dir {a_file} is a file, not a folder"),
        "output_dir_under_a_file": (
            {"output_dir": str(a_file / "run")},
            f"--output_dir {a_file / 'run'}: {a_file} is a file, so no folder can be made under it",
        ),
        "model_is_a_file": (
            {"model_name_or_path": str(model / "config.json")},
            f"--model_name_or_path {model / 'config.json'} is a file; expected a model folder",
        ),
        "model_folder_without_config": (
            {"model_name_or_path": str(data.parent)},
            f"--model_name_or_path {data.parent} holds no config.json",
        ),
        "dataset_of_unknown_kind": (
            {"mixer_list": [str(a_file), "1.0"]},
            f"--mixer_list {a_file}: unsupported file type; use .jsonl, .json, .parquet",
        ),
        "reference_cache_is_a_file": (
            {"reference_logprobs_cache_path": str(a_file)},
            f"--reference_logprobs_cache_path {a_file} is a file, not a folder",
        ),
        "data_cache_under_a_file": (
            {"dataset_local_cache_dir": str(a_file / "cache")},
            f"--dataset_local_cache_dir {a_file / 'cache'}: {a_file} is a file",
        ),
        "resume_from_a_file": (
            {"resume_from_checkpoint": str(a_file)},
            f"--resume_from_checkpoint {a_file} is a file; expected a step_N folder",
        ),
        "deepspeed_config_is_a_folder": (
            {"deepspeed_config": str(data.parent)},
            f"--deepspeed_config {data.parent} is a folder; expected a file",
        ),
    }
    overrides, message = flags[case]
    return _flags(tmp_path, model, data, **overrides), message


PATH_CASES = [
    "output_dir_is_a_file",
    "output_dir_under_a_file",
    "model_is_a_file",
    "model_folder_without_config",
    "dataset_of_unknown_kind",
    "reference_cache_is_a_file",
    "data_cache_under_a_file",
    "resume_from_a_file",
    "deepspeed_config_is_a_folder",
]


@pytest.mark.parametrize("case", PATH_CASES)
def test_a_path_of_the_wrong_kind_is_refused_before_anything_loads(
    tmp_path, tiny_model_dir, synthetic_data, case, capsys
):
    argv, message = _path_case(tmp_path, tiny_model_dir, synthetic_data[0], case)
    err = _fails(argv, capsys, tmp_path)
    assert err.startswith(message), err
    assert (tmp_path / "a_file").read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_a_dataset_that_is_neither_file_nor_folder(tmp_path, tiny_model_dir, capsys):
    pipe = tmp_path / "pairs.jsonl"
    os.mkfifo(pipe)
    err = _fails(_flags(tmp_path, tiny_model_dir, pipe), capsys, tmp_path)
    assert err == f"--mixer_list {pipe} is neither a file nor a folder"


def test_the_recipe_file_is_a_folder(tmp_path, tiny_model_dir, synthetic_data, capsys):
    err = _fails([str(tmp_path), *_flags(tmp_path, tiny_model_dir, synthetic_data[0])], capsys, tmp_path)
    assert err == f"config file {tmp_path} is a folder; expected a YAML file"


# --- 6. split names -------------------------------------------------------------------------------------------------


def _hub_layout(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    for split, n in (("train_prefs", 3), ("train_sft", 5), ("test_prefs", 2)):
        rows = [{"prompt": f"{split} {i}", "chosen": "a", "rejected": "b"} for i in range(n)]
        _jsonl(root / "data" / f"{split}-00000-of-00001.jsonl", rows)
    return root


def test_a_split_that_no_file_matches_exactly_is_an_error(tmp_path, tiny_model_dir, capsys):
    folder = _hub_layout(tmp_path / "ultrafeedback")
    err = _fails_cli(_flags(tmp_path, tiny_model_dir, folder), tmp_path)
    assert err == (
        f"dataset folder {folder}: no file or folder is named for split 'train' exactly; it holds the split(s) "
        "test_prefs, train_prefs, train_sft: pick one with --mixer_list_splits (or --eval_mixer_list_splits)"
    )
    # Asked by its exact name, a split reads its own file only.
    assert [r["prompt"] for r in load_rows(str(folder), "train_prefs")] == [f"train_prefs {i}" for i in range(3)]


def test_split_folders_and_plain_folders(tmp_path):
    by_folder = tmp_path / "by_folder"
    for split in ("train", "validation"):
        (by_folder / split).mkdir(parents=True)
        _jsonl(by_folder / split / "part.jsonl", [{"prompt": split, "chosen": "a", "rejected": "b"}])
    assert [r["prompt"] for r in load_rows(str(by_folder), "validation")] == ["validation"]
    from open_instruct.errors import UserError

    with pytest.raises(UserError, match="no file or folder is named for split 'test' exactly; it holds the split"):
        load_rows(str(by_folder), "test")
    plain = tmp_path / "plain"  # names that say nothing about splits: every file, as before
    plain.mkdir()
    for name in ("a", "b"):
        _jsonl(plain / f"{name}.jsonl", [{"prompt": name, "chosen": "a", "rejected": "b"}])
    assert len(load_rows(str(plain), "train")) == 2


# --- 7. unwritable output -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_output_folder_that_cannot_be_created(tmp_path, tiny_model_dir, synthetic_data):
    argv = _flags(tmp_path, tiny_model_dir, synthetic_data[0], output_dir="/proc/open_instruct_run")
    err = _fails_cli(argv, tmp_path)
    assert err.startswith("--output_dir /proc/open_instruct_run cannot be written: ")
    assert not Path("/proc/open_instruct_run").exists()


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder(tmp_path, tiny_model_dir, synthetic_data, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        argv = _flags(tmp_path, tiny_model_dir, synthetic_data[0], output_dir=str(locked / "run"))
        err = _fails(argv, capsys, tmp_path)
    finally:
        locked.chmod(0o755)
    assert err.startswith(f"--output_dir {locked / 'run'} cannot be written: permission denied")
    assert list(locked.iterdir()) == []
