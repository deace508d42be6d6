"""The data half of the recipe: mix and validate the datasets, tokenize, count what was kept and dropped, cache.

    data = prepare_preference_data(cfg.data, tokenizer)   # data.records, data.eval_records, data.statistics

The pairs are prepared into ``--dataset_local_cache_dir`` and read back memory-mapped; a second run with the same
inputs only reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from open_instruct.data import cache
from open_instruct.data.mixer import MixEntry, parse_mixer_list
from open_instruct.data.sources import source_fingerprint
from open_instruct.data.statistics import build_statistics, padding_waste_of_lengths, write_statistics
from open_instruct.data.streaming import MixPlan, TokenizeSettings, plan_mix, tokenize_unique, write_split
from open_instruct.data.tokenize import TOKENIZATION_VERSION, template_roles
from open_instruct.errors import UserError
from open_instruct.settings import DataSettings

__all__ = ["PreparedData", "prepare_preference_data", "save_mixed_pairs", "write_statistics"]


@dataclass
class PreparedData:
    """Tokenized training pairs (``index`` 0..N-1), evaluation pairs (own ``index`` 0..M-1), and what it took.

    The records are memory-mapped from the prepared-data cache (:class:`PairRecords`): a sequence of dict records
    whose token ids are read only when a batch asks for them.
    """

    records: Sequence[dict[str, Any]]
    statistics: dict[str, Any]
    eval_records: Sequence[dict[str, Any]] = field(default_factory=list)


def _key_inputs(data: DataSettings, tokenizer: Any, train: list[MixEntry], evaluation: list[MixEntry]) -> dict:
    """What the prepared-data cache key hashes: the sources, the mix and tokenization settings, the tokenizer."""

    def describe(entries: list[MixEntry]) -> list[dict[str, Any]]:
        return [{"amount": e.amount, **source_fingerprint(e.name, e.split)} for e in entries]

    return {
        "train": describe(train),
        "eval": describe(evaluation),
        "eval_fraction": data.eval_fraction,
        "format": data.dataset_format,
        "skip_invalid_rows": data.skip_invalid_rows,
        "seed": data.seed,
        "max_train_samples": data.max_train_samples,
        "max_seq_length": data.max_seq_length,
        "max_response_length": data.max_response_length,
        "add_bos": data.add_bos,
        "tokenizer": cache.tokenizer_fingerprint(tokenizer),
        "tokenization": TOKENIZATION_VERSION,
    }


def _no_pairs_left(pairs: int, dropped: dict[str, int], max_seq_length: int) -> UserError:
    """The error when tokenization keeps no training pair."""
    return UserError(
        f"no trainable pairs left out of {pairs} (dropped: {dropped}); check --max_seq_length {max_seq_length}"
    )


def _eval_summary(pairs: int, tokenized: Any) -> dict[str, Any]:
    """The evaluation split's counts in the statistics."""
    return {"pairs": pairs, "kept": tokenized.kept, "dropped": tokenized.dropped, "truncated": tokenized.truncated}


def _build_entry(data: DataSettings, tokenizer: Any, plan: MixPlan, folder: Path) -> dict[str, Any]:
    """Pass 2 of the streaming preparation into ``folder``: the split files and statistics; returns the manifest."""
    settings = TokenizeSettings(data.max_seq_length, data.add_bos, data.max_response_length)
    scratch = folder / "unique.arrow"
    unique, keys, meta = tokenize_unique(plan, tokenizer, settings, data.preprocessing_num_workers or 1, scratch)
    tok_stats, lengths, train_manifest = write_split(plan.train, unique, keys, meta, folder / "train.arrow")
    if tok_stats.kept == 0:
        raise _no_pairs_left(len(plan.train), tok_stats.dropped, data.max_seq_length)
    stats = build_statistics(plan.stats, len(plan.train), tok_stats, lengths=lengths)
    manifest: dict[str, Any] = {"train": train_manifest}
    if len(plan.eval):
        eval_tok, _, manifest["eval"] = write_split(plan.eval, unique, keys, meta, folder / "eval.arrow")
        stats["eval"] = _eval_summary(len(plan.eval), eval_tok)
    del unique
    scratch.unlink()
    (folder / "statistics.json").write_text(json.dumps(stats, indent=2, default=str))
    return manifest


def prepare_preference_data(data: DataSettings, tokenizer: Any) -> PreparedData:
    """Mix, validate, tokenize (or load all that from the cache). Malformed rows are reported before any model loads.

    The training mix is ``data.mixer_list``; the evaluation mix comes from ``data.eval_mixer_list`` or
    ``data.eval_fraction`` (empty when neither is set). Preparation streams: its memory is bounded by a chunk of
    pairs, not by the dataset (see :mod:`open_instruct.data.streaming`).
    """
    train_entries = parse_mixer_list(data.mixer_list, data.mixer_list_splits)
    eval_entries = (
        parse_mixer_list(data.eval_mixer_list, data.eval_mixer_list_splits, "--eval_mixer_list")
        if data.eval_mixer_list
        else []
    )
    key = cache.cache_key(_key_inputs(data, tokenizer, train_entries, eval_entries))
    path = cache.entry_path(data.dataset_local_cache_dir, key)
    # --overwrite_cache / --skip_cache: prepare again; the new entry replaces the old one atomically.
    fresh = data.overwrite_cache or data.skip_cache
    cached = None if fresh else cache.load(data.dataset_local_cache_dir, key)
    status = "loaded"
    if cached is None:
        plan = plan_mix(
            train_entries,
            eval_entries,
            data.eval_fraction,
            data.seed,
            data.dataset_format,
            data.skip_invalid_rows,
            data.max_train_samples,
            template_roles(tokenizer),
        )  # pass 1: every row checked, errors raised here
        cache.write_entry(
            data.dataset_local_cache_dir, key, lambda folder: _build_entry(data, tokenizer, plan, folder)
        )
        cached, status = cache.load(data.dataset_local_cache_dir, key), "rewritten" if fresh else "written"
        if cached is None:
            raise UserError(f"the prepared-data cache just written at {path} cannot be read back")
    records, eval_records, stats = cached
    stats["cache"] = {"status": status, "path": str(path)}
    batch = data.per_device_train_batch_size
    chosen, rejected = records.lengths("chosen_input_ids"), records.lengths("rejected_input_ids")
    stats["padding"] = {
        "batch_size": batch,
        "waste_fraction": padding_waste_of_lengths(chosen, rejected, batch, data.seed),
    }
    return PreparedData(records, stats, eval_records)


def save_mixed_pairs(records: Sequence[dict[str, Any]], folder: str | Path) -> Path:
    """``--dataset_mix_dir``: the mixed, tokenized training pairs as ``train_pairs.jsonl`` (one pair per line, in
    training-table order), written to a temporary name and renamed."""
    path = Path(folder) / "train_pairs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as handle:
        for record in records:
            handle.write(
                json.dumps({k: int(v) if k == "index" else [int(x) for x in v] for k, v in record.items()}) + "\n"
            )
    os.replace(tmp, path)
    return path
