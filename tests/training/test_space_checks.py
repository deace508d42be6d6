"""Room on disk: a checkpoint save that cannot fit is refused before any write, the first one against an estimate
that matches a real checkpoint, one warning at the start; the reference pass refused before it starts, its failed
final write keeps the shards; a real full file system (tmpfs) turns torch.save's failure into the one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from open_instruct.engine.base import Engine
from open_instruct.errors import UserError
from open_instruct.training import space_checks
from open_instruct.training.checkpointing import (
    COMPLETED,
    CheckpointPolicy,
    TrainerState,
    latest_complete_checkpoint,
    save_checkpoint,
)
from open_instruct.training.reference_shards import ShardWriter
from tests.test_disk_space import small_tmpfs, unmount

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def trained():
    """(accelerator, prepared model) of a 256x256 linear layer after one AdamW step, on CPU in this process."""
    from accelerate import Accelerator

    from open_instruct.api import fresh_accelerate_state

    with fresh_accelerate_state():
        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(256, 256)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        model(torch.ones(3, 256)).sum().backward()
        optimizer.step()
        yield accelerator, model


def _save(trained, root: Path, step: int, estimate: int | None = None) -> Path:
    policy = CheckpointPolicy(root, keep_last_n=5, estimated_bytes=estimate)
    return save_checkpoint(*trained, policy, TrainerState(step=step))


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_save_that_cannot_fit_is_refused_before_any_write(trained, tmp_path, monkeypatch):
    previous = _save(trained, tmp_path, 2)
    before = _files(previous)
    # The next checkpoint is as large as the last complete one (all it wrote before its one-line marker).
    needed = sum(len(b) for name, b in before.items() if name != Path(COMPLETED))
    monkeypatch.setattr(space_checks, "free_bytes", lambda path: needed - 1)
    with pytest.raises(UserError) as err:
        _save(trained, tmp_path, 4)
    assert str(err.value) == (
        f"not enough free space to write checkpoint {tmp_path / 'step_4'}: it needs about {needed:,} bytes "
        f"({needed / 1e3:.1f} kB), the size of step_2, and {needed - 1:,} bytes ({(needed - 1) / 1e3:.1f} kB) are "
        f"free there; nothing was written, a rerun resumes from {previous}: free space (or point --output_dir "
        "elsewhere) and rerun the same command"
    )
    assert not (tmp_path / "step_4").exists() and _files(previous) == before
    monkeypatch.setattr(space_checks, "free_bytes", lambda path: needed)  # just enough: the save goes ahead
    assert (_save(trained, tmp_path, 4) / COMPLETED).is_file()


def test_files_added_after_the_save_do_not_count(trained, tmp_path, monkeypatch):
    """A resume on another number of ZeRO processes leaves DeepSpeed's universal checkpoint inside the checkpoint it
    resumed from: the next save needs the room of what training wrote, not of that conversion."""
    previous = _save(trained, tmp_path, 2)
    needed = sum(len(b) for name, b in _files(previous).items() if name != Path(COMPLETED))
    (previous / "universal").mkdir()
    (previous / "universal" / "weights.pt").write_bytes(bytes(50_000))
    monkeypatch.setattr(space_checks, "free_bytes", lambda path: needed)
    assert (_save(trained, tmp_path, 4) / COMPLETED).is_file()
    (tmp_path / "step_4" / "MANIFEST.json").unlink()  # no manifest (an older checkpoint): the size found on disk
    assert space_checks.checkpoint_bytes_needed(tmp_path / "step_4", None)[0] == sum(
        len(b) for b in _files(tmp_path / "step_4").values()
    )


def test_the_first_checkpoint_is_checked_against_the_estimate(trained, tmp_path):
    with pytest.raises(
        UserError, match="estimated from the parameter count and optimizer, and .* there is no earlier"
    ):
        _save(trained, tmp_path, 2, estimate=1 << 62)
    assert list(tmp_path.iterdir()) == []


def test_the_estimate_matches_a_real_checkpoint(trained, tmp_path):
    path = _save(trained, tmp_path, 2)
    actual = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    parameters = 256 * 256 + 256
    moments = 2 * 4 * parameters  # AdamW's exp_avg and exp_avg_sq in fp32
    assert abs(actual - (4 * parameters + moments)) < 64 * 1024  # weights + moments, plus small files
    layout = Engine(False).state_layout(1)
    assert space_checks.parameter_counts(trained[1]) == (parameters, parameters)
    estimate = space_checks.estimate_checkpoint_bytes(layout, parameters, parameters)
    assert actual <= estimate <= actual + space_checks.CHECKPOINT_OVERHEAD


def test_one_warning_at_the_start_when_a_checkpoint_and_the_final_model_cannot_fit(trained, tmp_path, monkeypatch):
    lines: list[str] = []
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, print=lines.append)
    faults = SimpleNamespace(policy=CheckpointPolicy(tmp_path), preemption=CheckpointPolicy(tmp_path))
    layout = Engine(False).state_layout(1)
    monkeypatch.setattr(space_checks, "free_bytes", lambda path: 1 << 40)
    checkpoint, final = space_checks.report_room_at_start(accelerator, faults, layout, trained[1], tmp_path, None)
    assert lines == [] and faults.policy.estimated_bytes == checkpoint == faults.preemption.estimated_bytes
    monkeypatch.setattr(space_checks, "free_bytes", lambda path: checkpoint + final - 1)
    space_checks.report_room_at_start(accelerator, faults, layout, trained[1], tmp_path, None)
    assert len(lines) == 1 and lines[0].startswith(f"warning: {tmp_path} has {checkpoint + final - 1:,} bytes")
    assert f"one more checkpoint ({checkpoint:,} bytes" in lines[0] and f"the final model ({final:,} bytes" in lines[0]
    # No checkpoint schedule: only the final model must fit.
    space_checks.report_room_at_start(accelerator, None, layout, trained[1], tmp_path, None)
    assert len(lines) == 1


def test_a_full_file_system_fails_the_save_with_one_line_and_leaves_nothing(trained, tmp_path):
    disk = small_tmpfs(tmp_path / "small", "128k")  # holds the first checkpoint's files only in part
    try:
        with pytest.raises(UserError) as err:
            _save(trained, disk, 2)
        assert str(err.value).startswith(f"could not write checkpoint {disk / 'step_2'}: ")
        assert "are free there; there is no earlier checkpoint" in str(err.value)
        assert list(disk.iterdir()) == [] and latest_complete_checkpoint(disk) == (None, [])
    finally:
        unmount(disk)


def test_the_reference_pass_is_refused_before_it_starts_when_its_writes_cannot_fit(tmp_path, monkeypatch):
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1)
    rows = 1000
    needed = 2 * rows * (8 + 4 * 6) + 66 * 4096  # shards (int64 index + 6 float32) and the table, 4 KiB blocks
    assert space_checks.reference_bytes(rows) == needed
    monkeypatch.setattr(space_checks, "free_bytes", lambda path: needed)
    space_checks.check_room_for_reference(accelerator, tmp_path / "k.pt", rows)
    monkeypatch.setattr(space_checks, "free_bytes", lambda path: needed - 1)
    with pytest.raises(UserError, match=f"reference cache {tmp_path / 'k.pt'}: it needs about {needed:,} bytes"):
        space_checks.check_room_for_reference(accelerator, tmp_path / "k.pt", rows)
    (tmp_path / "k.parts").mkdir()  # shards already written count as paid for
    (tmp_path / "k.parts" / "shard_000000.pt").write_bytes(b"x" * 10)
    space_checks.check_room_for_reference(accelerator, tmp_path / "k.pt", rows)


def test_a_failed_reference_write_names_the_bytes_and_keeps_the_shards(tmp_path):
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1)
    space_checks.reference_written(accelerator, tmp_path / "k.pt", 100, None)
    with pytest.raises(UserError) as err:
        space_checks.reference_written(accelerator, tmp_path / "k.pt", 100, FULL)
    assert str(err.value).startswith(
        f"cannot write the reference cache {tmp_path / 'k.pt'}: No space left on device; it needs about "
        f"{100 * 6 * 4 + 4096:,} bytes"
    )
    assert str(err.value).endswith(f"shards are kept in {tmp_path / 'k.parts'}: free space and rerun the same command "
                                   "(it continues from them)")  # fmt: skip


def test_a_shard_that_cannot_be_written_does_not_stop_the_pass(tmp_path, monkeypatch):
    from open_instruct.training import reference_shards

    lines: list[str] = []
    writer = ShardWriter(tmp_path, "k", 10, 0, every_rows=2, log=lines.append)
    monkeypatch.setattr(reference_shards, "write_shard", lambda *a: (_ for _ in ()).throw(FULL))
    writer.add(torch.tensor([0, 1]), torch.zeros(2, 6))  # the first shard fails: one warning, no more attempts
    writer.add(torch.tensor([2, 3]), torch.zeros(2, 6))
    assert len(lines) == 1 and "cannot write a shard" in lines[0] and "No space left" in lines[0]
    assert writer.pending_rows == 2 and list(tmp_path.iterdir()) == []


def test_a_final_model_that_cannot_fit_leaves_no_partial_file_and_one_line(tiny_model_dir, tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from open_instruct.api import fresh_accelerate_state
    from open_instruct.training.checkpointing import save_final_model

    out = small_tmpfs(tmp_path / "out", "256k")  # the tiny model's weights take about 0.56 MB
    try:
        (out / "metrics.jsonl").write_text("{}\n")
        with fresh_accelerate_state():
            accelerator = Accelerator(cpu=True)
            model = accelerator.prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
            needed = sum(p.numel() * p.element_size() for p in model.state_dict().values())
            with pytest.raises(UserError) as err:
                save_final_model(accelerator, model, AutoTokenizer.from_pretrained(tiny_model_dir), out)
        assert str(err.value).startswith(
            f"could not write the final model to {out}: No space left on device; it needs about {needed:,} bytes"
        ), str(err.value)
        assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # no partial file, no temporary folder
    finally:
        unmount(out)
