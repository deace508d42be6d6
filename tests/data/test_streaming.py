"""Streaming preparation equals the in-memory one; workers do not change a byte; errors still come first; caches."""

from __future__ import annotations

import json
import shutil

import pytest

from open_instruct.config import TrainArguments
from open_instruct.data import prepare as prepare_module
from open_instruct.data.chat_templates import CHAT_TEMPLATES
from open_instruct.data.mixer import parse_mixer_list
from open_instruct.data.pair_table import PairRecords
from open_instruct.data.prepare import prepare_preference_data
from open_instruct.data.sampler import pair_dataloader
from open_instruct.errors import UserError
from open_instruct.settings import DataSettings
from open_instruct.training.reference_cache import dataset_fingerprint
from tests.data_helpers import train_bpe_tokenizer
from tests.data_oracle import prepare_in_memory
from tests.scale_data import HH_FIXTURE, hh_rows, write_multiturn


@pytest.fixture(scope="module")
def bpe():
    tokenizer = train_bpe_tokenizer([r[s] for r in hh_rows(200) for s in ("chosen", "rejected")], vocab_size=1000)
    tokenizer.chat_template = CHAT_TEMPLATES["tulu"]
    return tokenizer


@pytest.fixture(scope="module")
def multiturn(tmp_path_factory):
    return write_multiturn(tmp_path_factory.mktemp("mt") / "multiturn.jsonl", 150, seed=3)


def _settings(tmp_path, mixer_list, **overrides) -> DataSettings:
    values = {
        "model_name_or_path": "unused",
        "mixer_list": mixer_list,
        "skip_invalid_rows": True,
        "max_seq_length": 192,
        "dataset_local_cache_dir": str(tmp_path / "cache"),
        "per_device_train_batch_size": 4,
        "seed": 5,
    }
    values.update(overrides)
    return DataSettings.of(TrainArguments(**values))


def _without_runtime(stats):
    return json.loads(json.dumps({k: v for k, v in stats.items() if k not in ("cache", "padding")}, default=str))


MIXES = {
    # real HH rows (messy ones dropped), some prompts too long, replies cut; a held-out evaluation fraction
    "hh_eval_fraction": lambda mt: ([str(HH_FIXTURE), "1.0"], {"eval_fraction": 0.1, "add_bos": True}),
    # a fraction that rounds to no row still holds one out (mixer.hold_out's rule, drawn on row numbers)
    "tiny_eval_fraction": lambda mt: ([str(mt), "1.0"], {"eval_fraction": 0.003, "max_seq_length": 768}),
    # upsampling (a count above the valid rows, a fraction above 1), a cap on the mix, two formats mixed
    "upsample_cap": lambda mt: (
        [str(HH_FIXTURE), "700", str(mt), "1.5"],
        {"max_train_samples": 900, "max_seq_length": 768},
    ),
    # a separate evaluation mix, reply cut by max_response_length
    "eval_mix": lambda mt: (
        [str(mt), "0.6"],
        {
            "eval_mixer_list": [str(HH_FIXTURE), "50"],
            "eval_mixer_list_splits": ["train"],
            "max_response_length": 40,
            "max_seq_length": 768,
        },
    ),
}


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_streaming_equals_in_memory(mix, bpe, multiturn, tmp_path, monkeypatch):
    monkeypatch.setattr("open_instruct.data.streaming.CHUNK", 64)  # several chunks, partial last one
    mixer_list, overrides = MIXES[mix](multiturn)
    settings = _settings(tmp_path, mixer_list, **overrides)
    train_entries = parse_mixer_list(settings.mixer_list, settings.mixer_list_splits)
    eval_list, eval_splits = settings.eval_mixer_list, settings.eval_mixer_list_splits
    eval_entries = parse_mixer_list(eval_list, eval_splits) if eval_list else []
    records, eval_records, stats = prepare_in_memory(settings, bpe, train_entries, eval_entries)
    data = prepare_preference_data(settings, bpe)
    assert isinstance(data.records, PairRecords) and len(data.records) == len(records) > 40
    assert list(data.records) == records and list(data.eval_records) == eval_records
    assert _without_runtime(data.statistics) == _without_runtime(stats)
    assert stats["dropped"] or stats["truncated"]  # the cut and drop paths are exercised
    assert data.records.fingerprint() == dataset_fingerprint(records)
    assert data.eval_records.fingerprint() == dataset_fingerprint(eval_records) if eval_records else True


def test_workers_give_identical_bytes_and_share_the_cache_key(bpe, multiturn, tmp_path, monkeypatch):
    monkeypatch.setattr("open_instruct.data.streaming.CHUNK", 32)
    mixer_list = [str(HH_FIXTURE), "300", str(multiturn), "1.0"]
    one = prepare_preference_data(_settings(tmp_path / "one", mixer_list, eval_fraction=0.1), bpe)
    two = prepare_preference_data(
        _settings(tmp_path / "two", mixer_list, eval_fraction=0.1, preprocessing_num_workers=2), bpe
    )
    path_one, path_two = one.statistics["cache"]["path"], two.statistics["cache"]["path"]
    assert path_one.rsplit("/", 1)[1] == path_two.rsplit("/", 1)[1]  # the worker count is not in the key
    for name in ("train.arrow", "eval.arrow", "statistics.json", "manifest.json"):
        assert (tmp_path / "one" / "cache").exists()
        assert open(f"{path_one}/{name}", "rb").read() == open(f"{path_two}/{name}", "rb").read(), name


def test_tokenizing_workers_do_not_inherit_the_runs_stop_signal_handlers():
    """The recipe installs its stop-signal handlers (which only record a signal) before preparing data; the pool's
    workers are forked with them, and the pool stops them with SIGTERM: they must die of it, not record it (the pool's
    join then waited forever)."""
    import multiprocessing
    import signal

    from open_instruct.data.streaming import _init_worker
    from open_instruct.training import preemption

    preemption.install(preemption.parse_signals("SIGTERM,SIGINT,SIGUSR1"))
    try:
        pool = multiprocessing.get_context("fork").Pool(1, _init_worker, (None, None))
        try:
            handlers = [
                pool.apply(signal.getsignal, (sig,)) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
            ]
        finally:
            pool.close()  # the sentinel, not SIGTERM: this test must fail, not hang, without the fix
            pool.join()
    finally:
        preemption.uninstall()
    assert handlers == [signal.SIG_DFL] * 3


def test_loaders_read_the_memory_mapped_records_like_lists(bpe, multiturn, tmp_path):
    data = prepare_preference_data(_settings(tmp_path, [str(multiturn), "1.0"]), bpe)
    as_list = list(data.records)
    assert data.records.lengths("chosen_input_ids").tolist() == [len(r["chosen_input_ids"]) for r in as_list]
    assert data.records.lengths("rejected_labels").tolist() == [len(r["rejected_labels"]) for r in as_list]
    for options in ({"group_by_length": True}, {"max_tokens": 2000, "packing": True}, {}):
        mapped = pair_dataloader(data.records, 0, 4, seed=1, shuffle=False, **options)
        listed = pair_dataloader(as_list, 0, 4, seed=1, shuffle=False, **options)
        for a, b in zip(mapped, listed, strict=True):
            assert all((a[k] == b[k]).all() for k in a)


def test_old_cache_format_is_read(bpe, multiturn, tmp_path, capsys):
    import datasets

    settings = _settings(tmp_path, [str(multiturn), "1.0"], eval_fraction=0.2)
    fresh = prepare_preference_data(settings, bpe)
    expected, expected_eval = list(fresh.records), list(fresh.eval_records)
    entry = fresh.statistics["cache"]["path"]
    del fresh
    stats = json.loads(open(f"{entry}/statistics.json").read())
    shutil.rmtree(entry)
    datasets.Dataset.from_list(expected).save_to_disk(f"{entry}/train")  # what the older code wrote
    datasets.Dataset.from_list(expected_eval).save_to_disk(f"{entry}/eval")
    open(f"{entry}/statistics.json", "w").write(json.dumps(stats))
    old = prepare_preference_data(settings, bpe)
    assert "older datasets format" in capsys.readouterr().err
    assert old.statistics["cache"]["status"] == "loaded"
    assert list(old.records) == expected and list(old.eval_records) == expected_eval
    assert old.records.fingerprint() == dataset_fingerprint(expected)


@pytest.mark.parametrize("kind", ["row", "json"])
def test_malformed_row_mid_file_names_its_line_before_tokenizing(kind, tmp_path, bpe, monkeypatch):
    rows = hh_rows(300)
    lines = [json.dumps({"chosen": r["chosen"] + f" {k}", "rejected": r["rejected"] + f" {k}."}) for k, r in
             enumerate(rows * 20)]  # fmt: skip
    bad_line = 4321  # 1-based
    lines[bad_line - 1] = (
        '{"chosen": "x", "rejected": ' if kind == "json" else json.dumps({"chosen": rows[0]["chosen"]})
    )
    data = tmp_path / "big.jsonl"
    data.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(prepare_module, "tokenize_unique", None)  # never reached
    with pytest.raises(UserError) as err:
        prepare_preference_data(_settings(tmp_path, [str(data), "1.0"], skip_invalid_rows=False), bpe)
    message = str(err.value)
    if kind == "json":
        assert message.startswith(f"{data}: line {bad_line}: malformed JSON")
    else:  # no blank lines: row N is line N
        assert message.startswith(f"{data}: row {bad_line} (line {bad_line}): missing_field")
        assert "rejected" in message


def test_arrow_numpy_conversions_are_exact_views_and_never_import_pandas(tmp_path):
    """pair_table's own conversions (pyarrow's import pandas): values and slices agree, the records round-trip
    through a written file, and a process that writes and reads records never loads pandas."""
    import subprocess
    import sys

    import numpy as np
    import pyarrow as pa

    from open_instruct.data.pair_table import arrow_array, numpy_view

    values = np.array([5, -3, 7, 11, 2], dtype=np.int64)
    array = arrow_array(values)
    assert array.type == pa.int64() and array.to_pylist() == values.tolist()
    assert numpy_view(array.slice(1, 3)).tolist() == [-3, 7, 11]  # the slice's offset is honoured
    lists = pa.ListArray.from_arrays(arrow_array(np.array([0, 2, 2, 5], np.int32)), arrow_array(np.arange(5, 10)))
    sliced = lists.slice(1)
    assert numpy_view(sliced.offsets).tolist() == [2, 2, 5] and numpy_view(sliced.values).tolist() == [5, 6, 7, 8, 9]
    with_null = pa.array([1, None, 3], pa.int32())
    assert np.isnan(numpy_view(with_null)[1])  # nulls: pyarrow's own conversion, never a view of garbage
    probe = f"""
import sys
import numpy as np
from open_instruct.data.pair_table import LIST_COLUMNS, PairRecords, PairTableWriter
writer = PairTableWriter({str(tmp_path / "t.arrow")!r})
columns = {{name: (np.array([0, 2, 3]), np.array([4, 5, 6])) for name in LIST_COLUMNS}}
writer.write(np.array([10, 11]), columns)
writer.close()
records = PairRecords(path={str(tmp_path / "t.arrow")!r})
print([r["index"] for r in records], records[1][LIST_COLUMNS[0]], "pandas" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[10, 11] [6] False", out
