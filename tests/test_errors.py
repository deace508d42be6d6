"""Bad input: one clear line naming the problem (file, line/row, field), exit code 2, before any training."""

from __future__ import annotations

import json

import pytest

from open_instruct.dpo_tune_cache import main
from tests.conftest import run_cli, small_run_args


def run_main(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def args(model, data, out, **overrides):
    return small_run_args(model, data, out, **overrides)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {
    "chosen": [{"role": "user", "content": "count up from 1 to 3"}, {"role": "assistant", "content": "1 2 3"}],
    "rejected": [{"role": "user", "content": "count up from 1 to 3"}, {"role": "assistant", "content": "1 0 -1"}],
}


def test_missing_model_path(tmp_path, synthetic_data, capsys):
    err = run_main(args(tmp_path / "no_such_model", synthetic_data[0], tmp_path / "o"), capsys)
    assert "model path not found" in err and "no_such_model" in err


def test_missing_dataset_file(tmp_path, tiny_model_dir, capsys):
    missing = tmp_path / "missing.jsonl"
    err = run_main(args(tiny_model_dir, missing, tmp_path / "o", mixer_list=[str(missing), "1.0"]), capsys)
    assert f"dataset file not found: {missing}" in err


def test_malformed_json_names_file_and_line(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"chosen": [oops'])
    err = run_main(args(tiny_model_dir, data, tmp_path / "o", mixer_list=[str(data), "1.0"]), capsys)
    assert f"{data}: line 3: malformed JSON" in err


def test_missing_fields_names_found_and_expected(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "fields.jsonl", [GOOD, GOOD, {"chosen": GOOD["chosen"], "rejection": "x"}])
    err = run_main(args(tiny_model_dir, data, tmp_path / "o", mixer_list=[str(data), "1.0"]), capsys)
    assert f"{data}: row 3 (line 3): missing_field" in err
    assert (
        "missing field(s) rejected" in err and "found chosen, rejection" in err and "expected chosen, rejected" in err
    )


def test_unrecognised_columns_name_found_and_expected(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "answer": "a"}])
    err = run_main(args(tiny_model_dir, data, tmp_path / "o", mixer_list=[str(data), "1.0"]), capsys)
    assert "row 1" in err and "['answer', 'question']" in err and "{chosen, rejected}" in err


@pytest.mark.parametrize(
    "override,message",
    [
        ({"learning_rate": "-1e-5"}, "--learning_rate must be >= 0"),
        ({"beta": "0"}, "--beta must be > 0"),
        ({"per_device_train_batch_size": "0"}, "--per_device_train_batch_size must be >= 1"),
    ],
)
def test_out_of_range_config(tmp_path, tiny_model_dir, synthetic_data, capsys, override, message):
    err = run_main(args(tiny_model_dir, synthetic_data[0], tmp_path / "o", **override), capsys)
    assert message in err


def test_cli_exit_code_and_single_line(tmp_path, tiny_model_dir, synthetic_data):
    result = run_cli(args(tiny_model_dir, synthetic_data[0], tmp_path / "o", beta="-1"), tmp_path / "cache")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: invalid configuration: --beta must be > 0, got -1.0"]
    assert not (tmp_path / "o").exists()  # nothing started
