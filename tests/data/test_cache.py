"""The prepared-data cache's writes: a full disk leaves the earlier entry and no temporary folder, and one line."""

from __future__ import annotations

import errno
import os

import pytest

from open_instruct.data import cache
from open_instruct.errors import UserError


def _build(payload: bytes, fail: bool = False):
    def build(folder):
        (folder / "train.arrow").write_bytes(payload)
        if fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return {"train": {"rows": 1}}

    return build


def test_a_full_disk_keeps_the_earlier_entry_and_names_path_and_bytes(tmp_path, monkeypatch):
    entry = cache.write_entry(tmp_path, "k", _build(b"old"))
    monkeypatch.setattr(cache, "free_bytes", lambda path: 7)
    with pytest.raises(UserError) as err:
        cache.write_entry(tmp_path, "k", _build(b"x" * 3000, fail=True))
    assert str(err.value) == (
        f"cannot write the prepared-data cache {entry}: No space left on device; it needs more than 3,000 bytes "
        "(3.0 kB) and 7 bytes are free there; nothing was cached: free space (or set --dataset_local_cache_dir "
        "elsewhere) and rerun the same command"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temporary folder left
    assert (entry / "train.arrow").read_bytes() == b"old"
    assert cache.write_entry(tmp_path, "k", _build(b"new")) == entry and (entry / "train.arrow").read_bytes() == b"new"
