"""Streaming preparation: validate and plan the mix on row numbers, then tokenize in bounded chunks into Arrow.

Pass 1 streams every dataset once through the format checks (errors name file, line and field before anything
expensive) and keeps only the numbers of the valid rows. The mix (fractions, counts, upsampling, held-out evaluation
rows, ``--max_train_samples``) is then drawn on those numbers with the rules and seeds of
:mod:`open_instruct.data.mixer` (the tests check it picks the pairs, in order, that a mix held in memory picks).
Pass 2 streams each dataset again and tokenizes every row the mix uses once (a repeated row is not tokenized twice),
in chunks of :data:`CHUNK` pairs, in ``workers`` processes whose results are written in input order (so the output
is byte-identical for any number of workers), into a scratch Arrow file. Each split is then written in mix order by
gathering rows from that file a chunk at a time. Memory holds a few chunks and a few integers per pair.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from open_instruct.data.formats import ALL_ROLES, CHAT_ROLES, normalize
from open_instruct.data.mixer import MixEntry, check_rows, held_out_positions, sample_indices, target_rows
from open_instruct.data.pair_table import LIST_COLUMNS, PairRecords, PairTableWriter, columns_from_records
from open_instruct.data.sources import iter_rows
from open_instruct.data.tokenize import IGNORE_INDEX, NO_REPLY_TOKENS, PROMPT_TOO_LONG, TokenizeStats, tokenize_each
from open_instruct.errors import UserError

CHUNK = 256  # pairs per tokenization task: the unit of memory (a few MB of Python objects per 1k tokens) and of work
_DROP_REASONS = (None, PROMPT_TOO_LONG, NO_REPLY_TOKENS)
_POSITION_BITS = 40  # (dataset, row) packed in one int64: up to 2^40 rows per dataset


@dataclass
class TokenizeSettings:
    """What tokenization depends on besides the pairs."""

    max_seq_length: int
    add_bos: bool
    max_response_length: int | None


@dataclass
class MixPlan:
    """The mix as row numbers: ``datasets`` (training then evaluation entries, with their formats) and, for each
    split, the (dataset number, row number) of every pair in order."""

    entries: list[MixEntry]
    formats: list[str]
    train: np.ndarray  # [N, 2] int64
    eval: np.ndarray  # [M, 2] int64
    stats: dict[str, Any]


def _scan(
    entries: list[MixEntry], format_name: str, skip_invalid: bool, roles: frozenset[str]
) -> list[tuple[list[int], dict]]:
    """Pass 1: (valid row numbers, report) per dataset; raises on the first invalid dataset."""
    scanned = []
    for entry in entries:
        valid: list[int] = []
        keep = lambda i, _pair, valid=valid: valid.append(i)  # noqa: E731
        report = check_rows(entry.name, iter_rows(entry.name, entry.split), format_name, skip_invalid, keep, roles)
        if not valid:
            raise UserError(f"{entry.name} (split {entry.split!r}): no valid rows to take {entry.amount} from")
        scanned.append((valid, {**report, "split": entry.split, "amount": entry.amount}))
    return scanned


def _mix(scanned: list[tuple[list[int], dict]], first: int, rng: random.Random) -> list[tuple[int, int]]:
    """Each dataset's AMOUNT of its valid rows, drawn in turn from ``rng``: (dataset number from ``first``, row)."""
    mixed = []
    for number, (valid, report) in enumerate(scanned):
        taken = sample_indices(len(valid), target_rows(report["amount"], len(valid)), rng)
        report["taken"] = len(taken)
        mixed.extend((first + number, valid[i]) for i in taken)
    return mixed


def _hold_out(valid: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """:func:`open_instruct.data.mixer.hold_out` on row numbers."""
    out = held_out_positions(len(valid), fraction, seed)
    return [v for i, v in enumerate(valid) if i not in out], [v for i, v in enumerate(valid) if i in out]


def plan_mix(
    train_entries: list[MixEntry],
    eval_entries: list[MixEntry],
    eval_fraction: float,
    seed: int,
    format_name: str = "auto",
    skip_invalid: bool = False,
    max_train_samples: int | None = None,
    roles: frozenset[str] = CHAT_ROLES,
) -> MixPlan:
    """Validate every dataset (pass 1) and draw the training and evaluation mixes as row numbers."""
    if eval_entries and eval_fraction > 0:
        raise UserError("give --eval_mixer_list or --eval_fraction, not both")
    scanned = _scan(train_entries, format_name, skip_invalid, roles)
    held: list[tuple[int, int]] = []
    if eval_fraction > 0:
        for number, (valid, report) in enumerate(scanned):
            kept, out = _hold_out(valid, eval_fraction, seed + 1 + number)
            scanned[number] = (kept, {**report, "held_out_for_eval": len(out)})
            held.extend((number, row) for row in out)
    rng = random.Random(seed)
    train = _mix(scanned, 0, rng)
    stats: dict[str, Any] = {"datasets": [report for _, report in scanned]}
    evaluation = held
    eval_scanned = []
    if eval_entries:
        eval_scanned = _scan(eval_entries, format_name, skip_invalid, roles)
        evaluation = _mix(eval_scanned, len(train_entries), rng)
        stats["eval_datasets"] = [report for _, report in eval_scanned]
    if max_train_samples is not None and len(train) > max_train_samples:  # a seeded subset of the mix, order kept
        keep = sorted(random.Random(seed).sample(range(len(train)), max_train_samples))
        train = [train[i] for i in keep]
    formats = [report["format"] for _, report in scanned + eval_scanned]
    entries = list(train_entries) + list(eval_entries)
    return MixPlan(entries, formats, _as_array(train), _as_array(evaluation), stats)


def _as_array(rows: list[tuple[int, int]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


# --- pass 2: tokenization, in this process or in workers ------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, settings: TokenizeSettings) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; the pool is the parallelism
    # The pool stops its workers with SIGTERM: a stop-signal handler inherited through the fork (the run's, which only
    # records the signal) would keep them alive and the pool's join would wait forever.
    for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_DFL)
    _WORKER.update(tokenizer=tokenizer, settings=settings)


def _tokenize_chunk(rows: list[dict[str, Any]], format_name: str) -> tuple[dict, np.ndarray]:
    """Normalize and tokenize raw rows -> (list columns of every row, dropped rows empty; meta [n, 8] int64)."""
    settings: TokenizeSettings = _WORKER["settings"]
    pairs = [normalize(row, format_name, roles=ALL_ROLES) for row in rows]  # roles were checked in pass 1
    results = tokenize_each(
        _WORKER["tokenizer"], pairs, settings.max_seq_length, settings.add_bos, settings.max_response_length
    )
    empty = {name: [] for name in LIST_COLUMNS}
    records = [r.record if r.record is not None else empty for r in results]
    meta = np.zeros((len(results), 8), dtype=np.int64)
    for i, (result, record) in enumerate(zip(results, records)):
        chosen_prompt = sum(1 for x in record["chosen_labels"] if x == IGNORE_INDEX)
        rejected_prompt = sum(1 for x in record["rejected_labels"] if x == IGNORE_INDEX)
        meta[i] = (
            _DROP_REASONS.index(result.drop_reason),
            result.truncated,
            result.boundary_merge,
            result.eos_stripped,
            len(record["chosen_input_ids"]),
            len(record["rejected_input_ids"]),
            chosen_prompt,
            rejected_prompt,
        )
    return columns_from_records(records), meta


def _needed_rows(plan: MixPlan, dataset: int) -> np.ndarray:
    rows = np.concatenate([plan.train[plan.train[:, 0] == dataset, 1], plan.eval[plan.eval[:, 0] == dataset, 1]])
    return np.unique(rows)


def _chunks(plan: MixPlan) -> Iterator[tuple[list[dict], str]]:
    """(raw rows, format) of every row the mix uses, dataset by dataset, rows in file order, CHUNK at a time."""
    for number, entry in enumerate(plan.entries):
        needed = _needed_rows(plan, number)
        if len(needed) == 0:
            continue
        chunk, cursor = [], 0
        for row_number, (row, _) in enumerate(iter_rows(entry.name, entry.split)):
            if cursor < len(needed) and row_number == needed[cursor]:
                chunk.append(row)
                cursor += 1
                if len(chunk) == CHUNK:
                    yield chunk, plan.formats[number]
                    chunk = []
                if cursor == len(needed):
                    break
        if chunk:
            yield chunk, plan.formats[number]


def _ordered_results(chunks: Iterator[tuple[list[dict], str]], workers: int, tokenizer: Any, settings: Any):
    """Tokenized chunks in input order, from ``workers`` processes with at most ``2 * workers`` chunks in flight."""
    if workers <= 1:
        _WORKER.update(tokenizer=tokenizer, settings=settings)
        try:
            for rows, format_name in chunks:
                yield _tokenize_chunk(rows, format_name)
        finally:
            _WORKER.clear()
        return
    # fork: workers inherit the tokenizer instead of unpickling it; TOKENIZERS_PARALLELISM set before the fork keeps
    # the tokenizers library from warning about it.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer, settings))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    try:
        pending: deque = deque()
        for rows, format_name in chunks:
            pending.append(pool.apply_async(_tokenize_chunk, (rows, format_name)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


def tokenize_unique(
    plan: MixPlan, tokenizer: Any, settings: TokenizeSettings, workers: int, scratch: Path
) -> tuple[PairRecords, np.ndarray, np.ndarray]:
    """Pass 2: tokenize every (dataset, row) the mix uses once, into ``scratch``; returns (that table, read a batch
    at a time; its sorted packed keys; per-row meta [U, 8])."""
    writer = PairTableWriter(scratch)
    metas = []
    for columns, meta in _ordered_results(_chunks(plan), workers, tokenizer, settings):
        writer.write(np.arange(len(meta), dtype=np.int64), columns)
        metas.append(meta)
    _, batch_rows = writer.close()
    keys = np.unique(np.concatenate([_pack(plan.train), _pack(plan.eval)]))
    meta = np.concatenate(metas) if metas else np.zeros((0, 8), dtype=np.int64)
    if len(meta) != len(keys):  # a file shrank between the two passes
        raise UserError(f"a dataset changed while it was being prepared ({len(meta)} of {len(keys)} rows found)")
    table = PairRecords(path=scratch, memory_map=False, batch_rows=batch_rows)
    return table, keys, meta


def _pack(rows: np.ndarray) -> np.ndarray:
    return (rows[:, 0] << _POSITION_BITS) | rows[:, 1]


def write_split(
    rows: np.ndarray, unique: PairRecords, keys: np.ndarray, meta: np.ndarray, path: Path
) -> tuple[TokenizeStats, dict[str, np.ndarray], dict[str, Any]]:
    """Write one split's kept pairs in mix order to ``path`` (``index`` renumbered from 0) and their (chosen, rejected)
    lengths [N, 2] to ``<stem>_lengths.npy`` beside it; returns (tokenize statistics over the mix, token lengths per
    kept pair: prompt, chosen reply, rejected reply and the longer sequence; the split's manifest: rows, fingerprint
    and rows per record batch)."""
    positions = np.searchsorted(keys, _pack(rows))
    row_meta = meta[positions]
    stats = TokenizeStats()
    dropped = row_meta[:, 0] != 0
    for code, reason in enumerate(_DROP_REASONS):
        if code and (n := int((row_meta[:, 0] == code).sum())):
            stats.dropped[reason] = n
    kept_meta = row_meta[~dropped]
    stats.kept = len(kept_meta)
    stats.truncated = int(kept_meta[:, 1].sum())
    stats.boundary_merges = int(kept_meta[:, 2].sum())
    stats.eos_stripped = int(row_meta[:, 3].sum())
    writer = PairTableWriter(path)
    kept_positions = positions[~dropped]
    for start in range(0, len(kept_positions), CHUNK):
        _, columns = unique.gather(kept_positions[start : start + CHUNK])
        index = np.arange(start, start + len(columns[LIST_COLUMNS[0]][0]) - 1, dtype=np.int64)
        writer.write(index, columns)
    fingerprint, batch_rows = writer.close()
    # The samplers' lengths column, apart from the token ids so reading it touches none of their pages.
    np.save(lengths_path(path), kept_meta[:, 4:6].astype(np.int32))
    lengths = {
        "prompt": kept_meta[:, 6],
        "chosen": kept_meta[:, 4] - kept_meta[:, 6],
        "rejected": kept_meta[:, 5] - kept_meta[:, 7],
        "sequence": np.maximum(kept_meta[:, 4], kept_meta[:, 5]),
    }
    return stats, lengths, {"rows": stats.kept, "fingerprint": fingerprint, "batch_rows": batch_rows}


def lengths_path(table_path: Path) -> Path:
    """Where the (chosen, rejected) lengths of a split table live: ``train.arrow`` -> ``train_lengths.npy``."""
    return table_path.with_name(f"{table_path.stem}_lengths.npy")
