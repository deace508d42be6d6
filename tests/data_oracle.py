"""The in-memory preference preparation: every pair a dict in memory, the reference the streaming one is tested against.

:func:`open_instruct.data.streaming.plan_mix` draws the mix on row numbers with the same calls and seeds as
:func:`build_train_eval_mix` here, so both pick the same pairs in the same order; :func:`prepare_in_memory` then
tokenizes them with :func:`open_instruct.data.tokenize.tokenize_pairs`. The data benchmark times :func:`build_mix`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from open_instruct.data.formats import CHAT_ROLES
from open_instruct.data.mixer import MixEntry, check_rows, hold_out, sample_indices, target_rows
from open_instruct.data.sources import iter_rows
from open_instruct.data.statistics import build_statistics
from open_instruct.data.tokenize import IGNORE_INDEX, template_roles, tokenize_pairs
from open_instruct.errors import UserError
from open_instruct.settings import DataSettings


def normalize_rows(
    name: str, rows: list[dict[str, Any]], format_name: str, skip_invalid: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Check every row of one dataset in one pass; returns (valid pairs, each with ``source`` (name, row number),
    and the report with counts per failure reason)."""
    pairs: list[dict[str, Any]] = []
    report = check_rows(name, ((row, None) for row in rows), format_name, skip_invalid, _appender(pairs, name))
    return pairs, report


def _appender(pairs: list[dict[str, Any]], name: str) -> Callable[[int, dict], None]:
    return lambda i, pair: pairs.append({**pair, "source": (name, i)})


def _load_valid(
    entries: list[MixEntry], format_name: str, skip_invalid: bool, roles: frozenset[str]
) -> list[tuple[list, dict]]:
    loaded = []
    for entry in entries:
        pairs: list[dict[str, Any]] = []
        rows = iter_rows(entry.name, entry.split)
        report = check_rows(entry.name, rows, format_name, skip_invalid, _appender(pairs, entry.name), roles)
        if not pairs:
            raise UserError(f"{entry.name} (split {entry.split!r}): no valid rows to take {entry.amount} from")
        loaded.append((pairs, {**report, "split": entry.split, "amount": entry.amount}))
    return loaded


def _mix(loaded: list[tuple[list, dict]], rng: random.Random) -> list[dict[str, Any]]:
    mixed: list[dict[str, Any]] = []
    for pairs, report in loaded:
        taken = sample_indices(len(pairs), target_rows(report["amount"], len(pairs)), rng)
        report["taken"] = len(taken)
        mixed.extend(pairs[i] for i in taken)
    return [{"index": index, **pair} for index, pair in enumerate(mixed)]


def build_train_eval_mix(
    train_entries: list[MixEntry],
    eval_entries: list[MixEntry],
    eval_fraction: float,
    seed: int,
    format_name: str = "auto",
    skip_invalid: bool = False,
    roles: frozenset[str] = CHAT_ROLES,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(training pairs, evaluation pairs, statistics). The evaluation mix is ``eval_entries`` or, with
    ``eval_fraction`` > 0, that fraction of each training dataset's valid rows, held out before upsampling.
    Both lists carry their own ``index`` from 0."""
    if eval_entries and eval_fraction > 0:
        raise UserError("give --eval_mixer_list or --eval_fraction, not both")
    loaded = _load_valid(train_entries, format_name, skip_invalid, roles)
    held: list[dict[str, Any]] = []
    if eval_fraction > 0:
        for number, (pairs, report) in enumerate(loaded):
            kept, out = hold_out(pairs, eval_fraction, seed + 1 + number)
            loaded[number] = (kept, {**report, "held_out_for_eval": len(out)})
            held.extend(out)
    rng = random.Random(seed)
    train = _mix(loaded, rng)
    stats: dict[str, Any] = {"datasets": [report for _, report in loaded]}
    if eval_entries:
        eval_loaded = _load_valid(eval_entries, format_name, skip_invalid, roles)
        evaluation = _mix(eval_loaded, rng)
        stats["eval_datasets"] = [report for _, report in eval_loaded]
    else:
        evaluation = [{**pair, "index": index} for index, pair in enumerate(held)]
    return train, evaluation, stats


def build_mix(
    entries: list[MixEntry], seed: int, format_name: str = "auto", skip_invalid: bool = False
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load, validate and mix the datasets; each pair gets its global ``index``. Returns (pairs, statistics)."""
    pairs, _, stats = build_train_eval_mix(entries, [], 0.0, seed, format_name, skip_invalid)
    return pairs, stats


def _cap(pairs: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """At most ``limit`` pairs: a seeded subset of the whole mix (not the first datasets' rows), order kept."""
    if limit is None or len(pairs) <= limit:
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def token_lengths(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per pair: prompt, chosen reply, rejected reply and the longer full sequence, in tokens."""
    prompt, chosen, rejected, sequence = [], [], [], []
    for r in records:
        n_prompt = sum(1 for x in r["chosen_labels"] if x == IGNORE_INDEX)
        prompt.append(n_prompt)
        chosen.append(len(r["chosen_input_ids"]) - n_prompt)
        rejected.append(sum(1 for x in r["rejected_labels"] if x != IGNORE_INDEX))
        sequence.append(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "sequence": sequence}


def _eval_summary(pairs: int, tokenized: Any) -> dict[str, Any]:
    return {"pairs": pairs, "kept": tokenized.kept, "dropped": tokenized.dropped, "truncated": tokenized.truncated}


def prepare_in_memory(
    data: DataSettings, tokenizer: Any, train_entries: list[MixEntry], eval_entries: list[MixEntry]
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The whole preparation with every pair in memory: (records, evaluation records, statistics)."""
    train_pairs, eval_pairs, mix_stats = build_train_eval_mix(
        train_entries,
        eval_entries,
        data.eval_fraction,
        data.seed,
        data.dataset_format,
        data.skip_invalid_rows,
        template_roles(tokenizer),
    )
    train_pairs = _cap(train_pairs, data.max_train_samples, data.seed)
    settings = (data.max_seq_length, data.add_bos, data.max_response_length)
    records, tok_stats = tokenize_pairs(tokenizer, train_pairs, *settings)
    if not records:
        raise UserError(f"no trainable pairs left out of {len(train_pairs)} (dropped: {tok_stats.dropped})")
    stats = build_statistics(mix_stats, len(train_pairs), tok_stats, token_lengths(records))
    eval_records: list[dict[str, Any]] = []
    if eval_pairs:
        eval_records, eval_tok = tokenize_pairs(tokenizer, eval_pairs, *settings)
        stats["eval"] = _eval_summary(len(eval_pairs), eval_tok)
    return records, eval_records, stats
