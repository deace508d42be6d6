"""Damaged files caught before they are trusted: a manifest of every file's size and checksum, recorded when a folder
was written and checked when it is read back, and a cheap check that a ``.safetensors`` file is as long as its header
says.

A manifest (``MANIFEST.json``) maps each file's path under a folder to its size and CRC-32. CRC-32 catches what a
shared filesystem or a copy does to a file (a truncation, changed bytes), not a deliberate forgery, and is the fastest
checksum in the standard library (zlib's, about 2.8 GB/s on one core here, against sha256's 1.3 and blake2b's 0.8):
the time to hash a checkpoint is small beside the time to write it. A folder without a manifest (written before
manifests existed) is read as it is.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from open_instruct.errors import UserError
from open_instruct.files import write_text_atomic

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 22  # 4 MiB: large enough that the per-call cost vanishes, small enough to stay in cache


def file_crc32(path: str | os.PathLike) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits."""
    crc = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            crc = zlib.crc32(view[:size], crc)
    return f"{crc:08x}"


def folder_files(root: str | os.PathLike, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file under ``root`` (relative POSIX paths, sorted), leaving out the manifest and the names in ``skip``."""
    root = Path(root)
    found = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    return sorted(name for name in found if name not in (MANIFEST, *skip))


def describe(root: str | os.PathLike, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "crc32"}}`` for the files ``names`` under ``root``."""
    root = Path(root)
    return {name: {"size": (root / name).stat().st_size, "crc32": file_crc32(root / name)} for name in names}


def write_manifest(root: str | os.PathLike, files: dict[str, dict[str, Any]]) -> Path:
    """Write ``root/MANIFEST.json`` atomically."""
    return write_text_atomic(Path(root) / MANIFEST, json.dumps({"version": 1, "files": files}, indent=1))


def record_manifest(root: str | os.PathLike, skip: tuple[str, ...] = ()) -> Path:
    """Checksum every file under ``root`` and write its manifest (one process)."""
    return write_manifest(root, describe(root, folder_files(root, skip)))


def record_manifest_shared(accelerator: Any, root: str | os.PathLike, skip: tuple[str, ...] = ()) -> OSError | None:
    """Every process checksums a share of the files under ``root`` (all written and closed: call after a barrier), the
    main process writes the manifest. Returns the error of this process's part, if any (every process returns)."""
    error = None
    try:
        names = sorted(folder_files(root, skip), key=lambda n: -(Path(root) / n).stat().st_size)
        mine = describe(root, names[accelerator.process_index :: accelerator.num_processes])
    except OSError as err:
        error, mine = err, {}
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object  # accelerate is slow to import: only a distributed run needs it

        parts = gather_object([mine])
    else:
        parts = [mine]
    if accelerator.is_main_process and error is None:
        try:
            write_manifest(root, {k: v for part in parts for k, v in part.items()})
        except OSError as err:
            error = err
    return error


def listed_files(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "crc32"}}`` as ``root``'s manifest lists them. Raises ``FileNotFoundError`` (no manifest),
    another ``OSError`` or ``ValueError``/``KeyError``/``TypeError`` (an unreadable one)."""
    return json.loads((Path(root) / MANIFEST).read_text())["files"]


_UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError)  # what reading a damaged manifest raises


def manifest_problem(root: str | os.PathLike, full: bool = True) -> str | None:
    """None when ``root`` has no manifest; "" when every listed file has its recorded size (and, with ``full``, its
    checksum); else one phrase naming the first damaged file and what is wrong with it."""
    root = Path(root)
    try:
        files = listed_files(root)
    except FileNotFoundError:
        return None
    except _UNREADABLE as err:
        return f"{root / MANIFEST} is unreadable ({type(err).__name__})"
    return files_problem(root, files, full)


def recorded_bytes(root: str | os.PathLike) -> int | None:
    """Bytes of ``root`` as it was written: the sizes its manifest records plus the manifest's own (None: no readable
    manifest). Files added later (a resume's universal checkpoint inside a ZeRO checkpoint) do not count."""
    try:
        files = listed_files(root)
        return (Path(root) / MANIFEST).stat().st_size + sum(int(entry["size"]) for entry in files.values())
    except _UNREADABLE:
        return None


def files_problem(root: str | os.PathLike, files: dict[str, dict[str, Any]], full: bool = True) -> str:
    """ "" when each of ``files`` (``{name: {"size", "crc32"}}``) under ``root`` has its recorded size (and, with
    ``full``, checksum); else one phrase naming the first damaged file."""
    root = Path(root)
    for name, entry in files.items():  # sizes first: a truncation is named without reading any file
        path = root / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{path} is damaged: {entry['size']} bytes recorded, the file has {path.stat().st_size}"
    if full:
        for name, entry in files.items():
            found = file_crc32(root / name)
            if found != entry["crc32"]:
                return f"{root / name} is damaged: its contents changed (crc32 {found}, recorded {entry['crc32']})"
    return ""


def safetensors_problem(path: str | os.PathLike) -> str:
    """ "" when the file is as long as its header says; else what is wrong. Reads the header only (8-byte
    little-endian length, then JSON whose ``data_offsets`` end where the file must end), never the weights."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, shorter than the 8-byte header length"
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            return f"truncated: the header alone says {8 + header_len} bytes, the file has {size}"
        try:
            header = json.loads(handle.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            return f"damaged header ({type(err).__name__}: {err})"
    expected = 8 + header_len + int(end)
    if expected != size:
        kind = "truncated" if size < expected else "damaged"
        return f"{kind}: header says {expected} bytes, file has {size}"
    return ""


def check_model_files(folder: str | os.PathLike, flag: str) -> None:
    """A model folder's weights are whole: every ``.safetensors`` file matches its header, and the files its manifest
    lists (the final models this trainer writes have one) have their recorded sizes. Raises one UserError line."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded weights: every shard the index names is there
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{flag}: {index} is unreadable ({type(err).__name__}: {err})") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise UserError(f"{flag}: {folder / missing[0]} is missing (listed in {index.name})")
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise UserError(f"{flag}: {path} is {problem}; copy or download the model again")
    problem = manifest_problem(folder, full=False)
    if problem:
        raise UserError(f"{flag}: {problem}; copy or download the model again")


_verified: dict[tuple, str | None] = {}


def _stamp(root: Path) -> tuple:
    """(name, size, time) of the manifest and of each file it lists: what :func:`manifest_problem` reads. The folder's
    other files do not count: on a resume on another number of processes the main process adds DeepSpeed's
    universal checkpoint to the folder, which must not make the next check hash the whole folder again."""
    try:
        names = list(listed_files(root))
    except _UNREADABLE:
        names = []  # no manifest, or one manifest_problem names as unreadable
    stamp = []
    for name in (MANIFEST, *names):
        try:
            info = (root / name).stat()
        except OSError:
            stamp.append((name, None, None))  # missing: manifest_problem says so
        else:
            stamp.append((name, info.st_size, info.st_mtime_ns))
    return tuple(stamp)


def checked_once(root: str | os.PathLike) -> str | None:
    """:func:`manifest_problem` (full), remembered while no listed file's size or time changes: a run that asks twice
    (every process asks before and after setup) hashes once."""
    root = Path(root)
    key = (str(root.resolve()), _stamp(root))
    if key not in _verified:
        _verified[key] = manifest_problem(root)
    return _verified[key]


def check_resume_folder(path: str | os.PathLike) -> None:
    """An explicitly given checkpoint is whole (as its manifest recorded it), else one UserError line."""
    if problem := checked_once(path):
        raise UserError(f"--resume_from_checkpoint: {problem}; pick an earlier step_N folder")
