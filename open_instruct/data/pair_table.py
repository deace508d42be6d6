"""Tokenized pairs as an Arrow table on disk, read through a memory map: records by position, no Python lists.

A table has ``index`` (int64) and four list columns, ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
``rejected_labels`` (int32 when written here; the old cache wrote int64 through ``datasets``). :class:`PairRecords`
is a read-only sequence of the dict records every loader, collator and pass expects; the lengths the samplers and
statistics need come from the list offsets, so nothing reads the token ids until a batch asks for them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LIST_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
Columns = dict[str, tuple[np.ndarray, np.ndarray]]  # column -> (offsets [n + 1], flat values)


def _schema() -> Any:
    import pyarrow as pa  # deferred: importing the data layer (--help, --dry_run) loads no pyarrow

    return pa.schema([("index", pa.int64())] + [(name, pa.list_(pa.int32())) for name in LIST_COLUMNS])


def update_digest(digest: Any, index: np.ndarray, columns: Columns) -> None:
    """Feed rows to ``digest`` as int64 bytes: index, then each list in :data:`LIST_COLUMNS` order, row by row
    (the byte stream :func:`open_instruct.training.reference_cache.dataset_fingerprint` hashes for a list of records)."""
    wide = {name: (offsets, values.astype(np.int64, copy=False)) for name, (offsets, values) in columns.items()}
    for row, value in enumerate(index.astype(np.int64, copy=False)):
        digest.update(value.tobytes())
        for name in LIST_COLUMNS:
            offsets, values = wide[name]
            digest.update(values[offsets[row] : offsets[row + 1]].tobytes())


def columns_from_records(records: list[dict[str, Any]]) -> Columns:
    """The (offsets, values) form of the list columns of some dict records."""
    out = {}
    for name in LIST_COLUMNS:
        lengths = np.fromiter((len(r[name]) for r in records), dtype=np.int64, count=len(records))
        offsets = np.zeros(len(records) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((x for r in records for x in r[name]), dtype=np.int32, count=int(offsets[-1]))
        out[name] = (offsets, values)
    return out


class PairTableWriter:
    """Appends batches of rows to an Arrow IPC file; ``close`` returns the sha256 fingerprint and batch sizes."""

    def __init__(self, path: str | Path) -> None:
        import pyarrow as pa  # deferred, as in _schema

        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, _schema())
        self.digest = hashlib.sha256()
        self.batch_rows: list[int] = []

    def write(self, index: np.ndarray, columns: Columns) -> None:
        """Append rows: ``index`` [n] and each list column as (offsets [n + 1], values)."""
        if len(index) == 0:
            return
        update_digest(self.digest, index, columns)
        self.writer.write_batch(record_batch(index, columns))
        self.batch_rows.append(len(index))

    def close(self) -> tuple[str, list[int]]:
        """Finish the file; (fingerprint of every row written, rows per batch)."""
        self.writer.close()
        self.sink.close()
        return self.digest.hexdigest(), self.batch_rows


# pyarrow's own conversions (``pa.array(ndarray)``, ``Array.to_numpy``) import pandas when it is installed: about
# 60 MB of resident modules in a training process that never uses them. These two go through the buffers instead.
def arrow_array(values: np.ndarray) -> Any:
    """A primitive Arrow array over a 1-D numpy array's buffer (no copy for a contiguous array)."""
    import pyarrow as pa  # deferred, as in _schema

    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def record_batch(index: np.ndarray, columns: Columns) -> Any:
    """One Arrow record batch of the table's schema: ``index`` [n] and each list column as (offsets, values)."""
    import pyarrow as pa  # deferred, as in _schema

    arrays = [arrow_array(np.asarray(index, dtype=np.int64))]
    for name in LIST_COLUMNS:
        offsets, values = columns[name]
        offsets, values = arrow_array(np.asarray(offsets, np.int32)), arrow_array(np.asarray(values, np.int32))
        arrays.append(pa.ListArray.from_arrays(offsets, values))
    return pa.RecordBatch.from_arrays(arrays, schema=_schema())


def numpy_view(array: Any) -> np.ndarray:
    """A read-only numpy view of a primitive Arrow array's values, without a copy."""
    if array.null_count:
        return array.to_numpy(zero_copy_only=False)
    dtype = np.dtype(str(array.type))
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


class PairRecords(Sequence):
    """Read-only records ``{index, chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels}`` backed
    by Arrow record batches (memory-mapped from a file, or in memory).

    ``memory_map=False`` reads one batch at a time from the file instead and keeps only the last two: for a pass
    that walks a large file once without its pages staying resident.
    """

    def __init__(self, batches: Sequence[Any] | None = None, *, path: str | Path | None = None, **kw: Any) -> None:
        self._path = None if path is None else str(path)
        self._memory_map = kw.get("memory_map", True)
        self._fingerprint: str | None = kw.get("fingerprint")
        self._lengths: np.ndarray | None = kw.get("lengths")  # [N, 2] chosen, rejected token counts, when known
        self._decoded: dict[int, tuple[np.ndarray, Columns]] = {}
        if self._path is not None:
            self._open(kw.get("batch_rows"))
        else:
            self._reader, self._batches = None, list(batches or [])
            self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])

    def _open(self, batch_rows: list[int] | None) -> None:
        import pyarrow as pa  # deferred, as in _schema

        source = pa.memory_map(self._path) if self._memory_map else pa.OSFile(self._path)
        self._reader = pa.ipc.open_file(source)
        self._batches = None
        if batch_rows is None:  # reading each batch's row count is free when memory-mapped
            batch_rows = [self._reader.get_batch(k).num_rows for k in range(self._reader.num_record_batches)]
        self._starts = np.cumsum([0] + list(batch_rows))

    @classmethod
    def from_table(cls, table: Any, fingerprint: str | None = None) -> PairRecords:
        """Records over a ``pyarrow.Table`` (e.g. a ``datasets`` cache, itself memory-mapped)."""
        return cls(table.to_batches(), fingerprint=fingerprint)

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> PairRecords:
        """An in-memory table of dict records (tests, small sets)."""
        index = np.asarray([r["index"] for r in records], dtype=np.int64)
        return cls([record_batch(index, columns_from_records(records))] if records else [])

    def __getstate__(self) -> dict[str, Any]:
        if self._path is None:
            return {"batches": self._batches, "fingerprint": self._fingerprint, "lengths": self._lengths}
        rows = np.diff(self._starts).tolist()
        return {"path": self._path, "memory_map": self._memory_map, "fingerprint": self._fingerprint, "rows": rows,
                "lengths": self._lengths}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "path" in state:
            options = {"memory_map": state["memory_map"], "fingerprint": state["fingerprint"]}
            self.__init__(path=state["path"], batch_rows=state["rows"], lengths=state["lengths"], **options)
        else:
            self.__init__(state["batches"], fingerprint=state["fingerprint"], lengths=state["lengths"])

    def _batch(self, k: int) -> tuple[np.ndarray, Columns]:
        """(index, columns) of record batch ``k`` as numpy views of the Arrow buffers."""
        if k in self._decoded:
            return self._decoded[k]
        batch = self._batches[k] if self._batches is not None else self._reader.get_batch(k)
        index = numpy_view(batch.column(batch.schema.get_field_index("index")))
        columns = {}
        for name in LIST_COLUMNS:
            array = batch.column(batch.schema.get_field_index(name))
            columns[name] = (numpy_view(array.offsets), numpy_view(array.values))
        if not self._memory_map and len(self._decoded) >= 2:
            self._decoded.pop(next(iter(self._decoded)))
        self._decoded[k] = (index, columns)
        return self._decoded[k]

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for {n} records")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return k, i - int(self._starts[k])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _record(self, i: int) -> dict[str, Any]:
        k, j = self._locate(i)
        index, columns = self._batch(k)
        record: dict[str, Any] = {"index": int(index[j])}
        for name, (offsets, values) in columns.items():
            record[name] = values[offsets[j] : offsets[j + 1]].tolist()
        return record

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self._record(j) for j in range(*i.indices(len(self)))]
        return self._record(int(i))

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch of records at once (torch's DataLoader fetches batches through this)."""
        return [self._record(int(i)) for i in indices]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self._record(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def lengths(self, name: str) -> np.ndarray:
        """Length of the list column ``name`` for every record (from the lengths column when the cache stored one,
        else from the offsets only)."""
        if self._lengths is not None:
            return np.asarray(self._lengths[:, 0 if name.startswith("chosen") else 1], dtype=np.int64)
        parts = [np.diff(self._batch(k)[1][name][0]) for k in range(len(self._starts) - 1)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, Columns]:
        """(index, columns) of the records at ``rows``, copied into fresh arrays."""
        index = np.empty(len(rows), dtype=np.int64)
        pieces: dict[str, list[np.ndarray]] = {name: [] for name in LIST_COLUMNS}
        for out, i in enumerate(rows):
            k, j = self._locate(int(i))
            batch_index, columns = self._batch(k)
            index[out] = batch_index[j]
            for name, (offsets, values) in columns.items():
                pieces[name].append(values[offsets[j] : offsets[j + 1]])
        gathered = {}
        for name, parts in pieces.items():
            offsets = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum([len(p) for p in parts], out=offsets[1:])
            values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
            gathered[name] = (offsets, values)
        return index, gathered

    def fingerprint(self) -> str:
        """sha256 over every index, token id and label (computed once, or given by the cache that wrote it)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for k in range(len(self._starts) - 1):
                index, columns = self._batch(k)
                update_digest(digest, index, columns)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint
