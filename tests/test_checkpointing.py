"""Checkpoint folder bookkeeping: which folders count, which are pruned, what resume picks; metrics de-duplication."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from open_instruct.config import TrainArguments, UserError, validate
from open_instruct.report.tracking import MetricsLogger
from open_instruct.training.checkpointing import (
    COMPLETED,
    CheckpointPolicy,
    latest_complete_checkpoint,
    prune_checkpoints,
    resolve_resume,
)


def _make(root, step, complete=True):
    path = root / f"step_{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    if complete:
        (path / COMPLETED).write_text("done")
    return path


def test_policy_steps_and_epoch():
    every3 = CheckpointPolicy.from_flag("o", "3", 2)
    assert [s for s in range(1, 10) if every3.due(s, end_of_epoch=False)] == [3, 6, 9]
    epoch = CheckpointPolicy.from_flag("o", "epoch", 2)
    assert not epoch.due(4, end_of_epoch=False) and epoch.due(5, end_of_epoch=True)
    assert not CheckpointPolicy.from_flag("o", None, 2).due(3, end_of_epoch=True)


def test_newest_complete_checkpoint_skips_partial_ones(tmp_path):
    _make(tmp_path, 2)
    _make(tmp_path, 10)  # numeric order, not string order: step_10 is newer than step_9
    _make(tmp_path, 9)
    partial = _make(tmp_path, 12, complete=False)
    (tmp_path / "step_x").mkdir()
    path, incomplete = latest_complete_checkpoint(tmp_path)
    assert path == tmp_path / "step_10" and incomplete == [partial]
    chosen, notes = resolve_resume(tmp_path, None)
    assert chosen == tmp_path / "step_10"
    assert f"ignoring incomplete checkpoint {partial}" in notes
    assert resolve_resume(tmp_path / "empty", None) == (None, "")


def test_explicit_resume_path_must_be_complete(tmp_path):
    partial = _make(tmp_path, 4, complete=False)
    with pytest.raises(UserError, match="no COMPLETED marker"):
        resolve_resume(tmp_path, str(partial))
    with pytest.raises(UserError, match="folder not found"):
        resolve_resume(tmp_path, str(tmp_path / "step_99"))
    done = _make(tmp_path, 6)
    assert resolve_resume(tmp_path, str(done))[0] == done


def test_prune_keeps_the_newest_n_complete(tmp_path):
    for step in (2, 4, 6, 8):
        _make(tmp_path, step)
    old_partial = _make(tmp_path, 5, complete=False)
    newer_partial = _make(tmp_path, 9, complete=False)
    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step_2", "step_4", "step_5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_6", "step_8", "step_9"]
    assert not old_partial.exists() and newer_partial.exists()
    assert prune_checkpoints(tmp_path, -1) == []


def test_metrics_truncate_after_drops_later_and_cut_rows(tmp_path):
    logger = MetricsLogger(SimpleNamespace(is_main_process=True, print=print), tmp_path, use_wandb=False)
    for step in (1, 2, 3, 4):
        logger.log({"training_step": step, "train_loss": 0.5}, console=False)
    with logger.path.open("a") as handle:
        handle.write('{"training_step": 5, "train_lo')  # a kill mid-write
    logger.truncate_after(3)
    assert [json.loads(line)["training_step"] for line in logger.path.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"hf_repo_id": "org/x"}, "--hf_repo_id needs --push_to_hub"),
        ({"skip_nonfinite_batches": -1}, "--skip_nonfinite_batches must be >= 0"),
        ({"keep_last_n_checkpoints": 0}, "--keep_last_n_checkpoints must be >= 1 or -1"),
        ({"checkpointing_steps": "often"}, "--checkpointing_steps must be a positive integer or 'epoch'"),
    ],
)
def test_bad_flags_are_named(flags, message):
    args = TrainArguments(
        model_name_or_path="m", mixer_list=["d.jsonl", "1.0"], reference_logprobs_cache_path="c", **flags
    )
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(args)
