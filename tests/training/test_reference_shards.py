"""A damaged shard of a cut reference pass (one byte of its values changed, or cut short): the continuing pass names
it, deletes it, recomputes exactly its rows, and the finished cache is bit-identical to an uninterrupted pass's."""

from __future__ import annotations

import pytest
import torch

from open_instruct.training import reference_cache
from open_instruct.training.reference_shards import parts_dir
from tests.training.test_preemption import _build, _Model
from tests.training.test_reference_cache_integrity import _Accelerator


def _flip_value(shard) -> None:
    """Change one byte inside the stored values (the archive still opens; only the checksum can tell)."""
    values = torch.load(shard, weights_only=True)["values"]
    data = bytearray(shard.read_bytes())
    at = bytes(data).find(values.numpy().tobytes())
    assert at > 0
    data[at + 1] ^= 0x40
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["one byte changed", "cut short"])
def test_a_damaged_shard_is_named_and_its_rows_recomputed(damage, tmp_path):
    _build(tmp_path / "whole", _Model())
    whole = reference_cache.cache_file(tmp_path / "whole", "key").read_bytes()
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _build(cut, _Model(die_at=4))  # shards 0-3, one per batch of 2 rows
    shard = sorted(parts_dir(reference_cache.cache_file(cut, "key")).glob("shard_*.pt"))[2]  # rows 4 and 5
    if damage == "cut short":
        shard.write_bytes(shard.read_bytes()[:-40])
    else:
        _flip_value(shard)
    model, accelerator = _Model(), _Accelerator()
    _build(cut, model, accelerator)
    reason = "checksum mismatch or non-finite values" if damage == "one byte changed" else "unreadable ("
    assert any(line.startswith(f"reference pass: ignoring shard {shard}: {reason}") for line in accelerator.printed)
    assert model.calls == [[4, 5], [8, 9], [10, 11]], "exactly the damaged shard's rows and the missing ones"
    assert reference_cache.cache_file(cut, "key").read_bytes() == whole
