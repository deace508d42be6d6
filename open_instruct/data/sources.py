"""Raw rows of one dataset: local files and folders read here (so errors name file and line), else the Hub.

Local: ``.jsonl``, ``.json`` (a list of rows, a mapping of columns, or JSON lines), ``.parquet``, each optionally
``.gz``-compressed; a folder saved by ``datasets.save_to_disk``; any other folder is searched (recursively) for such
files, and when some of their names start with the split name (``train.jsonl``, ``test-00000-of-00001.parquet``)
only those are read. Anything that is not a local path goes to ``datasets.load_dataset(name, split=split)``
(``NAME:CONFIG`` selects a hub configuration).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from open_instruct.config import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".parquet.gz")
BATCH_ROWS = 1024  # rows converted to Python objects at a time from Arrow sources


def is_data_file(path: Path) -> bool:
    """Whether a file name has one of the local data suffixes."""
    return path.name.endswith(LOCAL_SUFFIXES)


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


Located = tuple[dict[str, Any], str | None]  # a row and where it is ("file:line" for JSON lines), when known


def _iter_jsonl(path: Path) -> Iterator[Located]:
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_number}: malformed JSON: {err.msg}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            yield row, f"{path}:{line_number}"


def _iter_json(path: Path) -> Iterator[Located]:
    with _open_text(path) as handle:
        text = handle.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines saved under a .json name
            yield from _iter_jsonl(path)
            return
        raise UserError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise UserError(f"{path}: columns of a column-oriented JSON file must have one length, got {lengths}")
        columns = list(data)
        for values in zip(*data.values()):
            yield dict(zip(columns, values)), None
        return
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of rows or a mapping of column -> list")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
        yield row, None


def _iter_parquet(path: Path) -> Iterator[Located]:
    import pyarrow.parquet as pq

    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                source: Any = io.BytesIO(handle.read())
        else:
            source = path
        batches = pq.ParquetFile(source).iter_batches(batch_size=BATCH_ROWS)
        for batch in batches:
            for row in batch.to_pylist():
                yield row, None
    except Exception as err:  # pyarrow raises several types for damaged files
        raise UserError(f"{path}: not a readable parquet file: {err}") from None


def _iter_file(path: Path) -> Iterator[Located]:
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        return _iter_jsonl(path)
    if name.endswith(".json"):
        return _iter_json(path)
    return _iter_parquet(path)


def _iter_arrow_dataset(dataset: Any) -> Iterator[Located]:
    """Rows of a (memory-mapped) ``datasets.Dataset``, a batch at a time: never the whole table as Python objects."""
    for start in range(0, len(dataset), BATCH_ROWS):
        for row in _rows(dataset[start : start + BATCH_ROWS]):
            yield row, None


def _rows(columns: dict[str, list]) -> Iterator[dict[str, Any]]:
    names = list(columns)
    for values in zip(*columns.values()):
        yield dict(zip(names, values))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def folder_files(path: Path, split: str) -> list[Path]:
    """The data files a folder contributes for ``split``, in a stable order."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p))
    if not files:
        raise UserError(f"dataset folder {path} holds no {', '.join(LOCAL_SUFFIXES)} files")
    in_split = [p for p in files if p.name.startswith((f"{split}.", f"{split}-", f"{split}_"))]
    return in_split or files


def _saved_dataset(path: Path, split: str) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{path}: no split {split!r} (has {', '.join(loaded)})")
        loaded = loaded[split]
    return loaded


def iter_rows(name: str, split: str) -> Iterator[Located]:
    """Every raw row of one dataset, streamed in file order, with its location when known (``file:line``)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return _iter_arrow_dataset(_saved_dataset(path, split))
        return (row for f in folder_files(path, split) for row in _iter_file(f))
    if path.is_file():
        if not is_data_file(path):
            raise UserError(f"{name}: unsupported file type; use {', '.join(LOCAL_SUFFIXES)} or a folder of them")
        return _iter_file(path)
    if is_data_file(path) or name.startswith((".", "/", "~")):
        raise UserError(f"dataset file not found: {name}")
    import datasets

    repo, _, config = name.partition(":")  # NAME:CONFIG names a hub configuration (--dataset_config_name)
    try:
        dataset = datasets.load_dataset(repo, config or None, split=split)  # memory-mapped Arrow in the datasets cache
    except Exception as err:  # hub errors come in many types; the user needs the name and the reason
        raise UserError(f"could not load dataset {name!r} (split {split!r}): {err}") from err
    return _iter_arrow_dataset(dataset)


def load_rows(name: str, split: str) -> list[dict[str, Any]]:
    """All raw rows of one dataset as a list (small datasets only: preference data streams with iter_rows)."""
    return [row for row, _ in iter_rows(name, split)]


def source_fingerprint(name: str, split: str) -> dict[str, Any]:
    """What identifies a dataset's content for the prepared-data cache: file hashes, or a hub name and split."""
    path = Path(name).expanduser()
    if not path.exists():
        return {"hub": name, "split": split}
    files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
    if path.is_dir() and not _is_saved_dataset(path):
        files = folder_files(path, split)
    digests = {}
    for file in files:
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):  # noqa: B023 - handle is this loop's file
                digest.update(block)
        digests[str(file.relative_to(path) if path.is_dir() else file.name)] = digest.hexdigest()
    return {"local": str(path.resolve()), "split": split, "files": digests}
