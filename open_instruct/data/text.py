"""Raw text for pretraining: documents from local files or the Hub, tokenized, joined and cut into equal blocks.

A ``.txt`` (or ``.txt.gz``) file holds one document per non-empty line; ``.jsonl``/``.json``/parquet files, saved
datasets and hub names (:func:`open_instruct.data.sources.load_rows`) hold one per row, in a text column (``text`` by
default). Each document is followed by EOS, the token stream is cut into blocks of ``--max_seq_length`` tokens and the
tail shorter than a block is dropped. Every block is a full causal-LM example: its labels are its tokens.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from open_instruct.data.mixer import hold_out, parse_mixer_list, sample_indices, target_rows
from open_instruct.data.sources import iter_lines, load_rows
from open_instruct.errors import UserError
from open_instruct.settings import DataSettings

TEXT_SUFFIXES = (".txt", ".txt.gz")


def is_text_file(name: str) -> bool:
    """Whether ``name`` is a plain-text corpus file."""
    return name.endswith(TEXT_SUFFIXES)


def _read_lines(path: Path) -> list[str]:
    return [line.rstrip("\n") for _, line in iter_lines(path) if line.strip()]


def load_documents(name: str, split: str, text_column: str) -> list[str]:
    """Every document of one dataset; a row without a string ``text_column`` is an error naming file and row."""
    path = Path(name).expanduser()
    if is_text_file(name):
        if not path.is_file():
            raise UserError(f"text file not found: {name}")
        return _read_lines(path)
    rows = load_rows(name, split)
    documents = []
    for i, row in enumerate(rows, start=1):
        value = row.get(text_column)
        if not isinstance(value, str):
            found = "missing" if value is None else f"a {type(value).__name__}"
            raise UserError(f"{name}: row {i}: field {text_column!r} must be a string, is {found} (see text_column)")
        if value.strip():
            documents.append(value)
    return documents


def mix_documents(mixer_list: list[str], splits: list[str], text_column: str, seed: int) -> list[str]:
    """The documents of a ``NAME AMOUNT ...`` mix (amounts as in :mod:`open_instruct.data.mixer`), seeded."""
    rng = random.Random(seed)
    mixed: list[str] = []
    for entry in parse_mixer_list(mixer_list, splits):
        documents = load_documents(entry.name, entry.split, text_column)
        if not documents:
            raise UserError(f"{entry.name}: no non-empty documents")
        mixed.extend(
            documents[i] for i in sample_indices(len(documents), target_rows(entry.amount, len(documents)), rng)
        )
    return mixed


def pack_blocks(documents: list[str], tokenizer: Any, block_size: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(block records ``{index, input_ids, labels}``, statistics): documents + EOS, joined, cut into blocks."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token to separate documents")
    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n_blocks = len(stream) // block_size
    records = [
        {"index": i, "input_ids": block, "labels": block}
        for i in range(n_blocks)
        for block in [stream[i * block_size : (i + 1) * block_size]]
    ]
    stats = {
        "documents": len(documents),
        "tokens": len(stream),
        "blocks": n_blocks,
        "block_size": block_size,
        "dropped_tail_tokens": len(stream) - n_blocks * block_size,
    }
    return records, stats


def prepare_text_data(
    data: DataSettings, tokenizer: Any, text_column: str = "text"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]:
    """(training blocks, evaluation blocks or None, statistics) for the run's mix and evaluation settings.

    ``--eval_fraction`` holds out whole documents (before packing), so no evaluation text is trained on.
    """
    documents = mix_documents(data.mixer_list, data.mixer_list_splits, text_column, data.seed)
    if data.max_train_samples is not None:
        documents = documents[: data.max_train_samples]
    held: list[str] = []
    if data.eval_mixer_list:
        held = mix_documents(data.eval_mixer_list, data.eval_mixer_list_splits, text_column, data.seed)
    elif data.eval_fraction > 0:
        kept, held_rows = hold_out([{"text": d} for d in documents], data.eval_fraction, data.seed)
        documents, held = [r["text"] for r in kept], [r["text"] for r in held_rows]
    records, stats = pack_blocks(documents, tokenizer, data.max_seq_length)
    if not records:
        raise UserError(
            f"the training text has {stats['tokens']} tokens, fewer than one block of --max_seq_length "
            f"{data.max_seq_length}"
        )
    eval_records = None
    if held:
        eval_records, eval_stats = pack_blocks(held, tokenizer, data.max_seq_length)
        if not eval_records:
            raise UserError(
                f"the evaluation text has {eval_stats['tokens']} tokens, fewer than one block of "
                f"--max_seq_length {data.max_seq_length}"
            )
        stats["eval"] = eval_stats
    return records, eval_records, stats
