"""samples.jsonl, the --sample_prompts file, the tracker tables and the console's side by side
(open_instruct/report/samples.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from open_instruct.errors import UserError
from open_instruct.report import samples
from tests.conftest import run_cli


def test_prompt_files_read_as_chats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("what is 2+2?\n\n  say hi | twice\n")
    assert samples.read_prompt_file(txt) == [
        [{"role": "user", "content": "what is 2+2?"}],
        [{"role": "user", "content": "  say hi | twice"}],
    ]
    jsonl = tmp_path / "p.jsonl"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}]
    jsonl.write_text(json.dumps({"prompt": "hello"}) + "\n\n" + json.dumps({"messages": chat, "id": 3}) + "\n")
    assert samples.read_prompt_file(jsonl) == [[{"role": "user", "content": "hello"}], chat]


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"prompt": 3}', "line 2: field 'prompt' must be a non-empty string"),
        ('{"prompt": "  "}', "line 2: field 'prompt' must be a non-empty string"),
        ('{"text": "hi"}', "line 2: no 'prompt' (string) or 'messages' (chat list) field"),
        ('{"messages": [{"role": "user"}]}', "line 2: field 'messages' must be"),
        ('{"messages": []}', "line 2: field 'messages' must be"),
    ],
)
def test_a_bad_row_names_file_line_and_field(tmp_path, second_line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + second_line + "\n")
    with pytest.raises(UserError) as err:
        samples.read_prompt_file(path)
    assert str(err.value).startswith(f"--sample_prompts {path} {message}")


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        samples.read_prompt_file(tmp_path / "missing.jsonl")
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(UserError, match="unsupported file type"):
        samples.read_prompt_file(tmp_path / "p.csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="holds no prompt"):
        samples.read_prompt_file(tmp_path / "empty.txt")


def test_a_bad_prompt_file_stops_the_cli_before_the_model_loads(tiny_model_dir, synthetic_data, tmp_path):
    """One ``error:`` line naming file, line and field, exit code 2, no output folder, no model loaded."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": "ok"}\n{"messages": "hi"}\n')
    out = tmp_path / "out"
    flags = ["--model_name_or_path", str(tiny_model_dir), "--mixer_list", str(synthetic_data[0]), "8"]
    result = run_cli([*flags, "--output_dir", str(out), "--sample_prompts", str(prompts)], tmp_path / "cache")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --sample_prompts {prompts} line 3: field 'messages' must be a non-empty list of "
                      "{role, content} strings"]  # fmt: skip
    assert "model:" not in result.stdout and not out.exists()


def _row(step, index, answer, prompt="p"):
    return {"step": step, "prompt_index": index, "prompt": prompt, "answer": answer, "tokens": 2, "seconds": 0.1}


def test_rows_append_and_a_cut_line_is_skipped(tmp_path):
    samples.append_rows(tmp_path, [_row("start", 0, "a"), _row("start", 1, "b")])
    with (tmp_path / samples.SAMPLES_FILE).open("a") as handle:
        handle.write('{"step": 3, "prompt_in')  # a kill in the middle of a write
    assert [r["answer"] for r in samples.read_rows(tmp_path)] == ["a", "b"]
    kept = samples.keep_rows(tmp_path, lambda row: row["prompt_index"] == 1)
    assert kept == [_row("start", 1, "b")]
    assert samples.read_rows(tmp_path) == kept
    assert samples.read_rows(tmp_path / "nowhere") == []


def test_side_by_side_shows_start_and_final_per_prompt(tmp_path):
    rows = [_row("start", 0, "old zero", "first?"), _row("start", 1, "old one", "second?")]
    rows += [_row(2, 0, "mid", "first?"), _row("final", 0, "new zero", "first?"), _row("final", 1, "", "second?")]
    samples.append_rows(tmp_path, rows)
    title, text = samples.side_by_side(tmp_path)
    assert title == f"sample answers, greedy (every occasion: {tmp_path / 'samples.jsonl'})"
    assert text.splitlines() == [
        "[0] prompt:",
        "      first?",
        "  before:",
        "      old zero",
        "  after :",
        "      new zero",
        "[1] prompt:",
        "      second?",
        "  before:",
        "      old one",
        "  after :",
        "      (empty)",
    ]
    assert "mid" not in text
    assert samples.side_by_side(tmp_path / "none") is None


def test_markdown_table_keeps_one_row_per_answer():
    table = samples.markdown_table([_row(4, 0, "a | b\nc")])
    assert table.splitlines() == [
        "| step | prompt_index | prompt | answer | tokens | seconds |",
        "|---|---|---|---|---|---|",
        "| 4 | 0 | p | a \\| b<br>c | 2 | 0.1 |",
    ]


class _Tracker:
    def __init__(self, name):
        self.name, self.logged = name, []

    def log(self, values, step):
        self.logged.append((values, step))


def test_wandb_gets_every_row_as_one_table_and_tensorboard_each_occasion():
    wandb = pytest.importorskip("wandb")
    start, mid = [_row("start", 0, "a")], [_row(2, 0, "b")]
    trackers = [_Tracker("wandb"), _Tracker("tensorboard")]
    samples.log_to_trackers(SimpleNamespace(trackers=trackers), start + mid, [(0, start), (2, mid)], 2)
    ((values, step),) = trackers[0].logged
    assert step == 2 and isinstance(values["samples"], wandb.Table)
    assert values["samples"].columns == list(samples.COLUMNS)
    assert values["samples"].data == [["start", "0", "p", "a", "2", "0.1"], ["2", "0", "p", "b", "2", "0.1"]]
    assert [(s, v["samples"].splitlines()[-1]) for v, s in trackers[1].logged] == [
        (0, "| start | 0 | p | a | 2 | 0.1 |"),
        (2, "| 2 | 0 | p | b | 2 | 0.1 |"),
    ]
