"""The prepared-data cache: tokenized training and evaluation pairs saved with ``datasets`` under a content key.

The key hashes everything the tokenized pairs depend on: each dataset's content (sha256 of local files; name and
split for Hub datasets, whose content ``datasets`` itself caches), amounts and splits, format, invalid-row policy,
seed, sample cap, evaluation mix, tokenizer (vocabulary, merges, special tokens), chat template, ``add_bos``,
``max_seq_length``, and the source code of the data modules (a change to the preparation code invalidates old
entries). The number of tokenization workers is not in the key: the output is the same for any number.
A folder appears under its final name only once complete (written under a temporary name, then renamed). It holds
``train.arrow`` and ``eval.arrow`` (Arrow IPC files, memory-mapped by every reader), ``statistics.json`` and
``manifest.json`` (format version; rows, fingerprint and record-batch sizes of each split), and ``train_lengths.npy``
(``eval_lengths.npy``): the (chosen, rejected) token count of every pair, what the samplers read. Entries of the older format (``datasets``
folders) are still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from open_instruct.data.pair_table import PairRecords
from open_instruct.data.streaming import lengths_path
from open_instruct.disk_space import free_bytes, human, injected_write_fault, tree_bytes
from open_instruct.errors import UserError
from open_instruct.integrity import describe, files_problem, folder_files

_DATA_MODULES = (
    "formats",
    "sources",
    "mixer",
    "tokenize",
    "chat_templates",
    "statistics",
    "prepare",
    "cache",
    "streaming",
    "pair_table",
)


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


FORMAT_VERSION = 2  # 1: datasets.save_to_disk folders train/ and eval/; 2: Arrow IPC files and a manifest


def _warn(message: str) -> None:
    print(f"data: {message}", file=sys.stderr, flush=True)


def _load_v1(path: Path, stats: dict[str, Any]) -> tuple[PairRecords, PairRecords]:
    """An entry written by the older code (``datasets`` folders): read memory-mapped as it is."""
    import datasets  # deferred: about 2 s to import, needed only for an entry in the older format

    train = PairRecords.from_table(datasets.load_from_disk(str(path / "train")).data.table)
    evaluation = PairRecords([])
    if (path / "eval").is_dir():
        evaluation = PairRecords.from_table(datasets.load_from_disk(str(path / "eval")).data.table)
    _warn(f"prepared-data cache {path} is in the older datasets format; reading it as it is")
    return train, evaluation


def _open_split(path: Path, split: str, manifest: dict[str, Any]) -> PairRecords:
    """One split memory-mapped, its batch sizes and lengths from the manifest and the lengths file, so opening it
    reads nothing from the token ids."""
    lengths = np.load(lengths_path(path / f"{split}.arrow"))
    if lengths.shape != (manifest["rows"], 2) or sum(manifest["batch_rows"]) != manifest["rows"]:
        raise ValueError(f"{split}: lengths {lengths.shape} or batches disagree with {manifest['rows']} rows")
    return PairRecords(
        path=path / f"{split}.arrow",
        fingerprint=manifest["fingerprint"],
        batch_rows=manifest["batch_rows"],
        lengths=lengths,
    )


def load(cache_dir: str | Path, key: str) -> tuple[PairRecords, PairRecords, dict[str, Any]] | None:
    """(training records, evaluation records, statistics), memory-mapped from the cache; None when absent or
    unreadable (then rebuilt, with a one-line message when an entry was there)."""
    path = entry_path(cache_dir, key)
    meta = path / "statistics.json"
    if not path.exists():
        return None
    try:
        stats = json.loads(meta.read_text())
        manifest_file = path / "manifest.json"
        if manifest_file.is_file():
            manifest = json.loads(manifest_file.read_text())
            if manifest.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {manifest.get('version')}, expected {FORMAT_VERSION}")
            if problem := files_problem(path, manifest.get("files", {})):
                _warn(f"prepared-data cache {problem}; rebuilding it")
                return None
            train = _open_split(path, "train", manifest["train"])
            evaluation = _open_split(path, "eval", manifest["eval"]) if "eval" in manifest else PairRecords([])
        else:
            train, evaluation = _load_v1(path, stats)
    except Exception as err:  # a damaged entry is rebuilt, never used
        _warn(f"prepared-data cache {path} is unreadable ({type(err).__name__}: {err}); rebuilding it")
        return None
    if len(train) != stats.get("kept"):
        _warn(f"prepared-data cache {path} holds {len(train)} pairs, expected {stats.get('kept')}; rebuilding it")
        return None
    return train, evaluation, stats


def write_entry(cache_dir: str | Path, key: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Create one entry atomically: ``build(folder)`` writes ``train.arrow`` (and ``eval.arrow``) into a temporary
    folder and returns the manifest; then the folder is renamed to the key (a damaged entry there is replaced)."""
    path = entry_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        injected_write_fault(tmp)
        manifest = build(tmp)
        files = describe(tmp, folder_files(tmp))  # sizes and checksums: a damaged file is found and rebuilt
        (tmp / "manifest.json").write_text(
            json.dumps({"version": FORMAT_VERSION, **manifest, "files": files}, indent=2)
        )
    except BaseException as err:
        written = tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk, a lost mount: the entry was never there, nothing to repair
            raise UserError(
                f"cannot write the prepared-data cache {path}: {err.strerror or err}; it needs more than "
                f"{human(written)} and {human(free_bytes(path.parent))} are free there; nothing was cached: free "
                "space (or set --dataset_local_cache_dir elsewhere) and rerun the same command"
            ) from err
        raise
    old = path.with_name(f".{key}.{os.getpid()}.old")
    if path.exists():
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:  # another process just wrote the same key from the same inputs: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return path
