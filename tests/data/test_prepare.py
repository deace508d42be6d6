"""Prepared-data cache (reuse, invalidation by each input, damage), statistics, and the --cache_dataset_only exit."""

from __future__ import annotations

import json
import pathlib
import random
import re
import statistics as pystats

import pytest

from open_instruct.config import TrainArguments
from open_instruct.data import prepare as prepare_module
from open_instruct.data.chat_templates import CHAT_TEMPLATES
from open_instruct.data.collate import PaddedPairCollator
from open_instruct.data.prepare import prepare_preference_data
from open_instruct.data.statistics import write_statistics
from open_instruct.data.synthetic import build_tokenizer, write_task
from open_instruct.errors import UserError
from open_instruct.settings import DataSettings
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def word_tokenizer():
    return build_tokenizer()


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    write_task(folder, n_train=48, n_test=16, seed=0)
    return folder


def _settings(data_dir, cache_dir, **overrides) -> DataSettings:
    values = {
        "model_name_or_path": "unused",
        "mixer_list": [str(data_dir / "train.jsonl"), "1.0"],
        "max_seq_length": 64,
        "dataset_local_cache_dir": str(cache_dir),
        "per_device_train_batch_size": 4,
        "seed": 1,
    }
    values.update(overrides)
    return DataSettings.of(TrainArguments(**values))


def test_cache_is_reused_without_retokenizing(data_dir, tmp_path, word_tokenizer, monkeypatch):
    settings = _settings(data_dir, tmp_path / "cache")
    first = prepare_preference_data(settings, word_tokenizer)
    assert first.statistics["cache"]["status"] == "written"

    def fail(*_, **__):
        raise AssertionError("tokenized again although the cache holds these inputs")

    monkeypatch.setattr(prepare_module, "tokenize_unique", fail)
    monkeypatch.setattr(prepare_module, "plan_mix", fail)
    second = prepare_preference_data(settings, word_tokenizer)
    assert second.statistics["cache"]["status"] == "loaded"
    assert second.records == first.records
    assert {k: v for k, v in second.statistics.items() if k != "cache"} == {
        k: v for k, v in first.statistics.items() if k != "cache"
    }


def _change_file(data_dir):
    path = data_dir / "train.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same rows, other order


def _other_tokenizer(tok):
    other = build_tokenizer()
    other.add_tokens(["newword"])
    return other


CHANGES = {
    "file content": ({}, _change_file, None),
    "amount": ({"mixer_list": ["{train}", "20"]}, None, None),
    "split": ({"mixer_list": ["{dir}", "1.0"], "mixer_list_splits": ["test"]}, None, None),
    "format": ({"dataset_format": "messages"}, None, None),
    "skip_invalid_rows": ({"skip_invalid_rows": True}, None, None),
    "seed": ({"seed": 2}, None, None),
    "max_train_samples": ({"max_train_samples": 10}, None, None),
    "max_seq_length": ({"max_seq_length": 32}, None, None),
    "add_bos": ({"add_bos": True}, None, None),
    "eval_fraction": ({"eval_fraction": 0.25}, None, None),
    "eval_mixer_list": ({"eval_mixer_list": ["{dir}/test.jsonl", "1.0"]}, None, None),
    "chat_template": ({}, None, lambda tok: setattr(tok, "chat_template", CHAT_TEMPLATES["zephyr"])),
    "tokenizer": ({}, None, "other"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_input_invalidates_the_cache(change, data_dir, tmp_path):
    overrides, mutate_files, mutate_tokenizer = CHANGES[change]
    cache = tmp_path / "cache"
    base = prepare_preference_data(_settings(data_dir, cache), build_tokenizer())
    tokenizer = build_tokenizer()
    if mutate_tokenizer == "other":
        tokenizer = _other_tokenizer(tokenizer)
    elif mutate_tokenizer:
        mutate_tokenizer(tokenizer)
    if mutate_files:
        mutate_files(data_dir)
    fill = {"train": str(data_dir / "train.jsonl"), "dir": str(data_dir)}
    overrides = {k: [x.format(**fill) for x in v] if isinstance(v, list) else v for k, v in overrides.items()}
    changed = prepare_preference_data(_settings(data_dir, cache, **overrides), tokenizer)
    assert changed.statistics["cache"]["status"] == "written"
    assert changed.statistics["cache"]["path"] != base.statistics["cache"]["path"]
    again = prepare_preference_data(_settings(data_dir, cache, **overrides), tokenizer)
    assert again.statistics["cache"]["status"] == "loaded" and again.records == changed.records


@pytest.mark.parametrize("damage", ["missing", "truncated", "one byte changed"])
def test_a_damaged_entry_is_rebuilt(damage, data_dir, tmp_path, word_tokenizer, capsys):
    settings = _settings(data_dir, tmp_path / "cache")
    first = prepare_preference_data(settings, word_tokenizer)
    expected = list(first.records)
    entry = first.statistics["cache"]["path"]
    del first
    train = pathlib.Path(entry) / "train.arrow"
    if damage == "missing":
        train.unlink()
    elif damage == "truncated":
        train.write_bytes(train.read_bytes()[:100])
    else:  # a token id in the middle of the file: the Arrow file still opens, only the checksum tells
        data = bytearray(train.read_bytes())
        data[len(data) // 2] ^= 0x01
        train.write_bytes(bytes(data))
    second = prepare_preference_data(settings, word_tokenizer)
    err = capsys.readouterr().err
    assert err.startswith(f"data: prepared-data cache {train} is ") and err.strip().endswith("; rebuilding it"), err
    assert len(err.strip().splitlines()) == 1 and list(second.records) == expected
    assert second.statistics["cache"]["status"] == "written"
    assert prepare_preference_data(settings, word_tokenizer).statistics["cache"]["status"] == "loaded"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_statistics_match_an_independent_computation(data_dir, tmp_path, word_tokenizer):
    settings = _settings(
        data_dir, tmp_path / "cache", max_seq_length=24, eval_fraction=0.25, per_device_train_batch_size=5
    )
    data = prepare_preference_data(settings, word_tokenizer)
    stats = data.statistics
    assert stats["kept"] == len(data.records) and len(data.eval_records) == stats["eval"]["kept"] == 12
    assert stats["pairs"] == 36 == stats["kept"] + sum(stats["dropped"].values())
    rejected = [sum(1 for x in r["rejected_labels"] if x != -100) for r in data.records]
    prompt = [r["chosen_labels"].count(-100) for r in data.records]
    assert stats["tokens"]["rejected"]["mean"] == pytest.approx(pystats.fmean(rejected))
    assert stats["tokens"]["prompt"]["p50"] == pytest.approx(pystats.median(prompt))
    assert stats["tokens"]["prompt"]["p95"] == pytest.approx(pystats.quantiles(prompt, n=20, method="inclusive")[-1])
    assert stats["tokens"]["rejected"]["max"] == max(rejected)
    # Padding waste: the real collator on the same seeded batches, pad slots counted from its attention mask.
    order = list(range(len(data.records)))
    random.Random(settings.seed).shuffle(order)
    collate, pad = PaddedPairCollator(word_tokenizer.pad_token_id), 0
    total = 0
    for start in range(0, len(order), 5):
        mask = collate([data.records[i] for i in order[start : start + 5]])["attention_mask"]
        pad, total = pad + int((mask == 0).sum()), total + mask.numel()
    assert stats["padding"] == {"batch_size": 5, "waste_fraction": pytest.approx(pad / total)}
    path = write_statistics(stats, tmp_path / "out")
    assert json.loads(path.read_text())["kept"] == stats["kept"]


@pytest.mark.slow
def test_cache_dataset_only_prepares_and_exits_without_a_model(tiny_model_dir, data_dir, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "prepared"
    result = run_cli(
        [
            "--tokenizer_name_or_path",
            str(tiny_model_dir),
            "--mixer_list",
            str(data_dir / "train.jsonl"),
            "1.0",
            "--max_seq_length",
            "64",
            "--cache_dataset_only",
            "--dataset_local_cache_dir",
            str(cache),
            "--output_dir",
            str(out),
        ],
        tmp_path / "ref",
    )
    assert result.returncode == 0, result.stderr
    assert "--cache_dataset_only: prepared data cached at" in result.stdout
    stats = json.loads((out / "dataset_statistics.json").read_text())
    assert stats["kept"] == 48 and stats["cache"]["status"] == "written"
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists()


def test_malformed_row_stops_before_tokenizing_with_file_row_and_reason(tmp_path, word_tokenizer, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    rows = [{"prompt": "a b", "chosen": "c", "rejected": "d"}, {"prompt": "a b", "chosen": "c", "rejected": "c"}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(prepare_module, "tokenize_unique", None)  # never reached
    settings = DataSettings.of(
        TrainArguments(
            model_name_or_path="unused", mixer_list=[str(bad), "1.0"], dataset_local_cache_dir=str(tmp_path / "c")
        )
    )
    with pytest.raises(
        UserError, match=f"^{re.escape(str(bad))}: row 2 \\(line 2\\): identical_replies: .*1 invalid of 2 rows"
    ):
        prepare_preference_data(settings, word_tokenizer)
