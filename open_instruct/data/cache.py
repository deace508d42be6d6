"""The prepared-data cache: tokenized training and evaluation pairs saved with ``datasets`` under a content key.

The key hashes everything the tokenized pairs depend on: each dataset's content (sha256 of local files; name and
split for Hub datasets, whose content ``datasets`` itself caches), amounts and splits, format, invalid-row policy,
seed, sample cap, evaluation mix, tokenizer (vocabulary, merges, special tokens), chat template, ``add_bos``,
``max_seq_length``, and the source code of the data modules (a change to the preparation code invalidates old
entries). A folder appears under its final name only once complete (written under a temporary name, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

_DATA_MODULES = ("formats", "sources", "mixer", "tokenize", "chat_templates", "statistics", "prepare", "cache")


def code_fingerprint() -> str:
    """sha256 of the data-preparation source files."""
    digest = hashlib.sha256()
    folder = Path(__file__).resolve().parent
    for name in _DATA_MODULES:
        digest.update((folder / f"{name}.py").read_bytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's behaviour: its full serialized model (fast) or vocabulary (slow), specials."""
    if getattr(tokenizer, "is_fast", False):
        body = tokenizer.backend_tokenizer.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "model": hashlib.sha256(body.encode()).hexdigest(),
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": tokenizer.chat_template,
        "size": len(tokenizer),
    }


def cache_key(inputs: dict[str, Any]) -> str:
    """Hex key of a JSON-serialisable description of the inputs (the code fingerprint is added here)."""
    payload = json.dumps({**inputs, "code": code_fingerprint()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def entry_path(cache_dir: str | Path, key: str) -> Path:
    """The folder of one prepared dataset."""
    return Path(cache_dir).expanduser() / key


def load(cache_dir: str | Path, key: str) -> tuple[list[dict], list[dict], dict[str, Any]] | None:
    """(training records, evaluation records, statistics) from the cache, or None when absent or unreadable."""
    import datasets

    path = entry_path(cache_dir, key)
    meta = path / "statistics.json"
    if not meta.is_file():
        return None
    try:
        stats = json.loads(meta.read_text())
        train = datasets.load_from_disk(str(path / "train")).to_list()
        evaluation = datasets.load_from_disk(str(path / "eval")).to_list() if (path / "eval").is_dir() else []
    except Exception:  # a damaged entry is rebuilt, never used
        return None
    if len(train) != stats.get("kept"):
        return None
    return train, evaluation, stats


def save(cache_dir: str | Path, key: str, train: list[dict], evaluation: list[dict], stats: dict[str, Any]) -> Path:
    """Write one entry atomically (temporary folder, then rename); a damaged entry under the key is replaced."""
    import datasets

    path = entry_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    quiet = not sys.stderr.isatty() and not datasets.are_progress_bars_disabled()  # bars only on terminals
    if quiet:
        datasets.disable_progress_bars()
    try:
        datasets.Dataset.from_list(train).save_to_disk(str(tmp / "train"))
        if evaluation:
            datasets.Dataset.from_list(evaluation).save_to_disk(str(tmp / "eval"))
    finally:
        if quiet:
            datasets.enable_progress_bars()
    (tmp / "statistics.json").write_text(json.dumps(stats, indent=2, default=str))
    old = path.with_name(f".{key}.{os.getpid()}.old")
    if path.exists():
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:  # another process just wrote the same key from the same inputs: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return path
