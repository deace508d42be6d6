"""Mixer semantics: fractions, counts and upsampling give exact row counts; splits, folders and eval mixes."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from open_instruct.data.mixer import parse_mixer_list
from open_instruct.data.sources import load_rows
from open_instruct.data.streaming import plan_mix
from open_instruct.errors import UserError
from tests.data_oracle import build_mix, build_train_eval_mix


def _write_rows(path, n: int, tag: str) -> None:
    rows = [{"prompt": f"{tag} question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def two_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_rows(a, 10, "a")
    _write_rows(b, 4, "b")
    return str(a), str(b)


def _prompts(pairs):
    return [p["prompt"][0]["content"] for p in pairs]


@pytest.mark.parametrize(
    ("amount_a", "amount_b", "want_a", "want_b"),
    [
        ("1.0", "1.0", 10, 4),
        ("0.5", "0.25", 5, 1),
        ("3", "4", 3, 4),
        ("25", "2.5", 25, 10),
        ("1", "0.3", 1, 1),
    ],
)
def test_amounts_give_exact_row_counts(two_files, amount_a, amount_b, want_a, want_b):
    a, b = two_files
    pairs, stats = build_mix(parse_mixer_list([a, amount_a, b, amount_b], ["train"]), seed=3)
    counts = Counter(p.split()[0] for p in _prompts(pairs))
    assert (counts["a"], counts["b"]) == (want_a, want_b)
    assert [p["index"] for p in pairs] == list(range(want_a + want_b))
    assert [d["taken"] for d in stats["datasets"]] == [want_a, want_b]


def test_upsampling_is_whole_repeats_plus_a_seeded_remainder(two_files):
    a, _ = two_files
    pairs, _ = build_mix(parse_mixer_list([a, "25"], ["train"]), seed=0)
    per_row = Counter(_prompts(pairs))
    assert sorted(Counter(per_row.values()).items()) == [(2, 5), (3, 5)]  # every row twice, 5 of them a third time
    again, _ = build_mix(parse_mixer_list([a, "25"], ["train"]), seed=0)
    other, _ = build_mix(parse_mixer_list([a, "25"], ["train"]), seed=1)
    assert _prompts(again) == _prompts(pairs)
    assert _prompts(other) != _prompts(pairs)


@pytest.mark.parametrize(
    ("values", "splits", "message"),
    [
        (["a.jsonl", "x"], ["train"], "must be a fraction with a decimal point"),
        (["a.jsonl", "1e3"], ["train"], "must be a fraction with a decimal point"),
        (["a.jsonl", "0"], ["train"], "must be > 0"),
        (["a.jsonl", "1.0", "b.jsonl"], ["train"], "pairs of DATASET AMOUNT"),
        (["a.jsonl", "1.0", "b.jsonl", "2"], ["train", "test", "dev"], "--mixer_list_splits needs 1 or 2 values"),
    ],
)
def test_bad_mixer_lists_are_rejected(values, splits, message):
    with pytest.raises(UserError, match=message):
        parse_mixer_list(values, splits)


def test_missing_and_unsupported_files_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="dataset file not found: .*nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"), "train")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported file type"):
        load_rows(str(tmp_path / "data.csv"), "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(UserError, match="bad.jsonl: line 2: malformed JSON"):
        load_rows(str(bad), "train")


def test_folders_pick_the_split_and_other_local_shapes(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "folder"
    (folder / "data").mkdir(parents=True)
    _write_rows(folder / "data" / "train-00000.jsonl", 3, "t")
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "e", "chosen": "x", "rejected": "y"}]), folder / "data" / "test-00000.parquet"
    )
    assert len(load_rows(str(folder), "train")) == 3
    assert load_rows(str(folder), "test")[0]["prompt"] == "e"
    # A folder whose file names say nothing about splits contributes every file.
    plain = tmp_path / "plain"
    plain.mkdir()
    _write_rows(plain / "one.jsonl", 2, "p")
    _write_rows(plain / "two.jsonl", 2, "q")
    assert len(load_rows(str(plain), "train")) == 4
    # gzip, column-oriented JSON and datasets.save_to_disk folders.
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"prompt": "z", "chosen": "1", "rejected": "2"}) + "\n")
    assert load_rows(str(tmp_path / "z.jsonl.gz"), "train")[0]["prompt"] == "z"
    (tmp_path / "cols.json").write_text(
        json.dumps({"prompt": ["p1", "p2"], "chosen": ["a", "b"], "rejected": ["c", "d"]})
    )
    assert [r["chosen"] for r in load_rows(str(tmp_path / "cols.json"), "train")] == ["a", "b"]
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([{"prompt": "s", "chosen": "1", "rejected": "2"}])}
    ).save_to_disk(str(saved))
    assert load_rows(str(saved), "train")[0]["prompt"] == "s"
    with pytest.raises(UserError, match="no split 'test'"):
        load_rows(str(saved), "test")


def test_mixer_list_splits_one_per_dataset(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    _write_rows(folder / "train.jsonl", 6, "tr")
    _write_rows(folder / "test.jsonl", 2, "te")
    pairs, _ = build_mix(parse_mixer_list([str(folder), "1.0", str(folder), "1.0"], ["train", "test"]), seed=0)
    assert Counter(p.split()[0] for p in _prompts(pairs)) == {"tr": 6, "te": 2}


def test_held_out_fraction_is_disjoint_and_exact(two_files):
    a, b = two_files
    entries = parse_mixer_list([a, "20", b, "1.0"], ["train"])
    train, evaluation, stats = build_train_eval_mix(entries, [], 0.5, seed=0)
    assert len(evaluation) == 5 + 2
    assert not set(_prompts(train)) & set(_prompts(evaluation))  # held out before upsampling: no leak
    assert Counter(p.split()[0] for p in _prompts(train)) == {"a": 20, "b": 2}
    assert [p["index"] for p in evaluation] == list(range(7))
    assert [d["held_out_for_eval"] for d in stats["datasets"]] == [5, 2]
    again = build_train_eval_mix(entries, [], 0.5, seed=0)
    assert _prompts(again[1]) == _prompts(evaluation)


def test_eval_mixer_list_and_conflicts(two_files):
    a, b = two_files
    train, evaluation, stats = build_train_eval_mix(
        parse_mixer_list([a, "1.0"], ["train"]), parse_mixer_list([b, "3"], ["test"]), 0.0, seed=0
    )
    assert len(train) == 10 and len(evaluation) == 3
    assert all(p.startswith("b ") for p in _prompts(evaluation))
    assert stats["eval_datasets"][0]["taken"] == 3
    with pytest.raises(UserError, match="not both"):
        plan_mix(parse_mixer_list([a, "1.0"], ["train"]), parse_mixer_list([b, "3"], ["test"]), 0.1, 0)
