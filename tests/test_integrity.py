"""Damaged files: manifests (size + CRC-32 per file) written with a folder and checked when it is read back, the
checkpoint resume falling back past a damaged checkpoint, and the header-only check of ``.safetensors`` files."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from open_instruct import integrity
from open_instruct.config.path_checks import model_source
from open_instruct.errors import UserError
from open_instruct.integrity import (
    MANIFEST,
    checked_once,
    file_crc32,
    manifest_problem,
    record_manifest,
    safetensors_problem,
)
from open_instruct.training.checkpointing import COMPLETED, CheckpointPolicy, TrainerState, resolve_resume


def _flip(path, at=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path, by=7):
    data = path.read_bytes()
    path.write_bytes(data[:-by])


def test_crc32_matches_zlib_over_the_whole_file(tmp_path):
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 40_000  # spans several 4 MiB read chunks
    path.write_bytes(data)
    assert file_crc32(path) == f"{zlib.crc32(data):08x}"


def _folder(root):
    root.mkdir(parents=True)
    (root / "a.bin").write_bytes(b"a" * 1000)
    (root / "sub").mkdir()
    (root / "sub" / "b.bin").write_bytes(b"b" * 500)
    return root


def test_manifest_lists_every_file_and_names_the_damaged_one(tmp_path):
    root = _folder(tmp_path / "m")
    record_manifest(root)
    listed = json.loads((root / MANIFEST).read_text())["files"]
    assert listed == {
        "a.bin": {"size": 1000, "crc32": f"{zlib.crc32(b'a' * 1000):08x}"},
        "sub/b.bin": {"size": 500, "crc32": f"{zlib.crc32(b'b' * 500):08x}"},
    }
    assert manifest_problem(root) == ""
    _flip(root / "sub" / "b.bin")
    assert manifest_problem(root, full=False) == ""  # same size: only the checksum can tell
    assert manifest_problem(root).startswith(f"{root / 'sub' / 'b.bin'} is damaged: its contents changed")
    _truncate(root / "a.bin")
    assert manifest_problem(root) == f"{root / 'a.bin'} is damaged: 1000 bytes recorded, the file has 993"
    (root / "a.bin").unlink()
    assert manifest_problem(root) == f"{root / 'a.bin'} is missing"
    assert manifest_problem(_folder(tmp_path / "old")) is None  # written before manifests: nothing to check


def _checkpoint(root, step, manifest=True):
    path = _folder(root / f"step_{step}")
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    if manifest:
        record_manifest(path, skip=(COMPLETED,))
    (path / COMPLETED).write_text(f"step {step}\n")
    return path


def test_resume_falls_back_past_a_damaged_checkpoint_in_one_line(tmp_path):
    first, second, third = (_checkpoint(tmp_path, s) for s in (1, 2, 3))
    _truncate(third / "a.bin")
    _flip(second / "sub" / "b.bin")
    path, notes = resolve_resume(tmp_path, None)
    assert path == first
    lines = notes.splitlines()
    assert lines[0] == (
        f"warning: checkpoint damaged: {third / 'a.bin'} is damaged: 1000 bytes recorded, the file has 993; "
        f"resuming from {second} instead"
    )
    assert lines[1].startswith(f"warning: checkpoint damaged: {second / 'sub' / 'b.bin'} is damaged: its contents")
    assert lines[1].endswith(f"; resuming from {first} instead") and len(lines) == 2
    _flip(first / "a.bin")
    path, notes = resolve_resume(tmp_path, None)
    assert path is None and notes.splitlines()[-1].endswith("no intact checkpoint is left: starting fresh")


def test_an_explicit_damaged_checkpoint_is_an_error(tmp_path):
    path = _checkpoint(tmp_path, 4)
    (path / "trainer_state.json").write_text('{"step": 5}')  # same size, other bytes
    with pytest.raises(UserError, match=r"^--resume_from_checkpoint: .*trainer_state.json is damaged: its contents"):
        resolve_resume(tmp_path / "elsewhere", str(path))


def test_checkpoints_without_a_manifest_resume_quietly(tmp_path):
    _checkpoint(tmp_path, 1, manifest=False)
    old = _checkpoint(tmp_path, 2, manifest=False)
    assert resolve_resume(tmp_path, None) == (old, f"resuming from {old} (newest complete checkpoint in --output_dir)")
    assert resolve_resume(tmp_path, str(old)) == (old, f"resuming from {old} (--resume_from_checkpoint)")


def test_save_checkpoint_records_every_file_before_the_marker(tmp_path):
    from accelerate import Accelerator

    from open_instruct.api import fresh_accelerate_state
    from open_instruct.training.checkpointing import save_checkpoint

    with fresh_accelerate_state():
        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(
            torch.nn.Linear(4, 2), torch.optim.AdamW(torch.nn.Linear(4, 2).parameters())
        )
        path = save_checkpoint(accelerator, model, CheckpointPolicy(tmp_path), TrainerState(step=3))
    listed = json.loads((path / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {COMPLETED, MANIFEST}
    assert set(listed) == on_disk and "trainer_state.json" in listed and "rng_state_0.pt" in listed
    assert all(listed[n] == {"size": (path / n).stat().st_size, "crc32": file_crc32(path / n)} for n in listed)
    assert (path / MANIFEST).stat().st_mtime_ns <= (path / COMPLETED).stat().st_mtime_ns


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(16, 8), "b": torch.ones(8)}, folder / "model.safetensors")
    return folder


def test_safetensors_length_is_checked_from_the_header(model_dir):
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    assert safetensors_problem(weights) == ""
    model_source(str(model_dir), "--model_name_or_path")  # a whole model passes
    _truncate(weights, by=100)
    assert safetensors_problem(weights) == f"truncated: header says {size} bytes, file has {size - 100}"
    with pytest.raises(UserError) as err:
        model_source(str(model_dir), "--model_name_or_path")
    assert str(err.value) == (
        f"--model_name_or_path: {weights} is truncated: header says {size} bytes, file has {size - 100}; "
        "copy or download the model again"
    )
    weights.write_bytes(weights.read_bytes()[:20])
    assert safetensors_problem(weights).startswith("truncated: the header alone says")
    weights.write_bytes(b"\x01\x00")
    assert safetensors_problem(weights) == "truncated: 2 bytes, shorter than the 8-byte header length"


def test_a_model_folder_with_a_manifest_is_checked_against_it(model_dir):
    record_manifest(model_dir)
    (model_dir / "config.json").write_text("{ }")  # a size change the safetensors header cannot see
    with pytest.raises(UserError, match=r"config.json is damaged: 2 bytes recorded, the file has 3"):
        model_source(str(model_dir), "--model_name_or_path")


def test_a_shard_the_index_names_must_be_there(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    weight_map = {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError) as err:
        model_source(str(model_dir), "--model_name_or_path")
    assert str(err.value) == (
        f"--model_name_or_path: {model_dir / 'model-00002-of-00002.safetensors'} is missing "
        "(listed in model.safetensors.index.json)"
    )


def test_a_checkpoint_is_hashed_once_while_its_listed_files_stay_and_again_when_one_changes(tmp_path, monkeypatch):
    root = tmp_path / "step_2"
    _folder(root)
    record_manifest(root)
    hashed = []
    monkeypatch.setattr(integrity, "file_crc32", lambda path: hashed.append(path) or file_crc32(path))
    assert checked_once(root) == "" and len(hashed) == 2
    assert checked_once(root) == "" and len(hashed) == 2  # asked again: remembered
    _flip(root / "a.bin")
    os.utime(root / "a.bin", ns=(1, 1))  # a changed time, whatever the file system's time resolution
    assert "a.bin is damaged: its contents changed" in checked_once(root)


def test_files_beside_the_listed_ones_that_come_and_go_do_not_disturb_the_check(tmp_path, monkeypatch):
    """Rank 0 converts a ZeRO checkpoint to DeepSpeed's universal one inside the checkpoint folder while the other
    ranks check that folder: a file it lists and then removes must not stop them (it once did, FileNotFoundError)."""
    root = _checkpoint(tmp_path, 2)
    (root / "universal.tmp").mkdir()
    (root / "universal.tmp" / "exp_avg.pt").write_bytes(b"x" * 10)
    real_stat, seen = Path.stat, set()

    def vanishing(self, *args, **kwargs):  # the converter's file is there when first looked at, gone the next time
        if "universal.tmp" in self.parts and self in seen:
            raise FileNotFoundError(2, "No such file or directory", str(self))
        seen.add(self)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", vanishing)
    assert resolve_resume(tmp_path, None) == (
        root,
        f"resuming from {root} (newest complete checkpoint in --output_dir)",
    )
