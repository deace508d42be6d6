"""Raw rows of one dataset: local files and folders read here (so errors name file and line), else the Hub.

Local: ``.jsonl``, ``.json`` (a list of rows, a mapping of columns, or JSON lines), ``.parquet``, each optionally
``.gz``-compressed; a folder saved by ``datasets.save_to_disk``; any other folder is searched (recursively) for such
files, and when some of their names start with the split name (``train.jsonl``, ``test-00000-of-00001.parquet``)
only those are read. Anything that is not a local path goes to ``datasets.load_dataset(name, split=split)``
(``NAME:CONFIG`` selects a hub configuration).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from open_instruct.errors import UserError
from open_instruct.files import is_local_path

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".parquet.gz")
BATCH_ROWS = 1024  # rows converted to Python objects at a time from Arrow sources


def is_data_file(path: Path) -> bool:
    """Whether a file name has one of the local data suffixes."""
    return path.name.endswith(LOCAL_SUFFIXES)


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


# What a damaged or truncated gzip stream raises: a bad header, a cut-off end, corrupt deflate data.
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def _unreadable(path: Path, err: Exception) -> UserError:
    if isinstance(err, _GZIP_ERRORS) and path.name.endswith(".gz"):
        return UserError(f"{path}: not a readable gzip file (damaged or truncated): {err}")
    return UserError(f"{path}: cannot be read: {err}")


def _decode(path: Path, raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line += raw.count(b"\n", 0, err.start)
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        utf16 = line == 1 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
        raise UserError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}); "
            f"save the file as UTF-8{' (it looks like UTF-16)' if utf16 else ''}"
        ) from None


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line of a UTF-8 text file, gzip-compressed when named ``.gz``. A UTF-8
    byte-order mark is dropped; a byte that is not UTF-8 names the file and line; a damaged or truncated gzip stream
    names the file."""
    try:
        with _open_binary(path) as handle:
            for number, raw in enumerate(handle, start=1):
                if number == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                yield number, _decode(path, raw, number)
    except (OSError, *_GZIP_ERRORS) as err:
        raise _unreadable(path, err) from None


def read_text(path: Path) -> str:
    """The whole text of a file as :func:`iter_lines` reads it (byte-order mark dropped, errors named)."""
    try:
        with _open_binary(path) as handle:
            raw = handle.read()
    except (OSError, *_GZIP_ERRORS) as err:
        raise _unreadable(path, err) from None
    return _decode(path, raw.removeprefix(codecs.BOM_UTF8), 1)


Located = tuple[dict[str, Any], str | None]  # a row and where it is ("FILE, line N" / "FILE, row N"), when known


def _not_an_object(path: Path, where: str, row: Any) -> UserError:
    return UserError(f"{path}: {where}: expected a JSON object (one row), got a JSON {_json_kind(row)}")


def _json_kind(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _iter_jsonl(path: Path) -> Iterator[Located]:
    row_number = 0
    for line_number, line in iter_lines(path):
        if not line.strip():
            continue  # blank lines hold no row
        row_number += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {line_number}: malformed JSON: {err.msg}") from None
        except RecursionError:
            raise UserError(f"{path}: line {line_number}: JSON nested too deeply to be a row") from None
        if not isinstance(row, dict):
            raise _not_an_object(path, f"row {row_number} (line {line_number})", row)
        yield row, f"{path}, line {line_number}"


def _iter_json(path: Path) -> Iterator[Located]:
    text = read_text(path)
    try:
        data = json.loads(text)
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to be a list of rows") from None
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines saved under a .json name
            yield from _iter_jsonl(path)
            return
        raise UserError(f"{path}: line {err.lineno}: malformed JSON: {err.msg}") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise UserError(f"{path}: columns of a column-oriented JSON file must have one length, got {lengths}")
        columns = list(data)
        for number, values in enumerate(zip(*data.values()), start=1):
            yield dict(zip(columns, values)), f"{path}, row {number}"
        return
    if not isinstance(data, list):
        raise UserError(
            f"{path}: expected a JSON list of rows or a mapping of column -> list, got a JSON {_json_kind(data)}"
        )
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise _not_an_object(path, f"row {number}", row)
        yield row, f"{path}, row {number}"


def _iter_parquet(path: Path) -> Iterator[Located]:
    import pyarrow.parquet as pq  # deferred: importing the data layer (--help, --dry_run) loads no pyarrow

    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                source: Any = io.BytesIO(handle.read())
        else:
            source = path
        batches = pq.ParquetFile(source).iter_batches(batch_size=BATCH_ROWS)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield row, f"{path}, row {number}"
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


# A shard suffix after a split name: train-00000-of-00004, train_0, test-3.
_SHARD_SUFFIX = re.compile(r"[-_]\d+(-of-\d+)?$")
# Names that say a file or folder holds one split (the Hub's own split words), alone or as a prefix (train_prefs).
_SPLIT_WORDS = ("train", "test", "validation", "valid", "val", "dev", "eval", "evaluation")
_SPLIT_NAME = re.compile(rf"^({'|'.join(_SPLIT_WORDS)})([-_.].*)?$")


def _split_names(file: Path, root: Path) -> list[str]:
    """The split names a data file carries: its name without suffix and shard number, and its folders under root."""
    stem = next(
        file.name.removesuffix(s) for s in sorted(LOCAL_SUFFIXES, key=len, reverse=True) if file.name.endswith(s)
    )
    return [_SHARD_SUFFIX.sub("", stem), *file.relative_to(root).parts[:-1]]


def folder_files(path: Path, split: str) -> list[Path]:
    """The data files a folder contributes for ``split``, in a stable order: those whose name (less its shard
    number) or a folder above them is exactly ``split``. A folder whose names say nothing about splits contributes
    every file; one whose names name other splits only (``train_prefs``, ``train_sft`` for ``train``) is an error."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p))
    if not files:
        raise UserError(f"dataset folder {path} holds no {', '.join(LOCAL_SUFFIXES)} files")
    names = {file: _split_names(file, path) for file in files}
    in_split = [file for file in files if split in names[file]]
    if in_split:
        return in_split
    named = sorted({name for found in names.values() for name in found if _SPLIT_NAME.match(name)})
    if named:
        raise UserError(
            f"dataset folder {path}: no file or folder is named for split {split!r} exactly; it holds the "
            f"split(s) {', '.join(named)}: pick one with --mixer_list_splits (or --eval_mixer_list_splits)"
        )
    return files


def check_folder(path: Path, split: str) -> None:
    """The checks reading a dataset folder makes, without reading a row: a saved dataset has the split, any other
    folder holds data files for it."""
    if _is_saved_dataset(path):
        splits_file = path / "dataset_dict.json"
        if splits_file.is_file():
            try:
                splits = json.loads(splits_file.read_text()).get("splits", [])
            except (ValueError, AttributeError, OSError) as err:
                raise UserError(f"{splits_file}: not a readable saved-dataset index: {err}") from None
            if split not in splits:
                raise UserError(f"{path}: no split {split!r} (has {', '.join(map(str, splits))})")
        return
    folder_files(path, split)


def _saved_dataset(path: Path, split: str) -> Any:
    import datasets  # deferred: about 2 s to import, needed only for saved datasets and hub names

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
    if is_data_file(path) or is_local_path(name):
        raise UserError(f"dataset file not found: {name}")
    import datasets  # deferred, as in _saved_dataset

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
