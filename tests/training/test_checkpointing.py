"""Checkpoint folder bookkeeping: which folders count, which are pruned, what resume picks; metrics de-duplication."""

from __future__ import annotations

import json
import pickle
import re
from types import SimpleNamespace

import pytest

from open_instruct.config import TrainArguments, validate
from open_instruct.errors import UserError
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


# --- A failed write keeps the previous checkpoint; no file in a checkpoint folder can run code. ----------------------


@pytest.fixture
def trained(tmp_path):
    """(accelerator, prepared model) of a tiny model after one optimizer step, on CPU in this process."""
    import torch
    from accelerate import Accelerator

    from open_instruct.api import fresh_accelerate_state

    with fresh_accelerate_state():
        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        model(torch.ones(3, 4)).sum().backward()
        optimizer.step()
        yield accelerator, model


def _save(trained, root, step):
    from open_instruct.training.checkpointing import TrainerState, save_checkpoint

    return save_checkpoint(*trained, CheckpointPolicy(root, keep_last_n=5), TrainerState(step=step))


def _contents(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_says_so(trained, tmp_path, monkeypatch):
    import errno

    import torch

    previous = _save(trained, tmp_path, 2)
    before = _contents(previous)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError) as err:
        _save(trained, tmp_path, 4)
    # The next one is as large as what the last save wrote before its marker.
    needed = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file() and p.name != COMPLETED)
    assert re.fullmatch(
        re.escape(
            f"could not write checkpoint {tmp_path / 'step_4'}: No space left on device; it needs about {needed:,} bytes"
        )
        + r" \(.*\) and [\d,]+ bytes.* are free there; "
        + re.escape(f"the previous checkpoint {previous} is intact and a rerun resumes from it"),
        str(err.value),
    ), str(err.value)
    assert not (tmp_path / "step_4").exists()  # the partial folder is gone
    assert _contents(previous) == before and latest_complete_checkpoint(tmp_path) == (previous, [])


def test_rng_state_is_plain_data_and_round_trips(trained, tmp_path):
    import random

    import numpy as np
    import torch

    from open_instruct.training.checkpointing import load_checkpoint, restore_rng

    path = _save(trained, tmp_path, 2)
    torch.load(path / "rng_state_0.pt", weights_only=True)  # no allowlist needed: tensors, lists and numbers
    draws = lambda: (random.random(), float(np.random.rand()), float(torch.rand(1)))  # noqa: E731
    _, rng = load_checkpoint(trained[0], path, {})
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    restore_rng(rng)
    first = draws()
    restore_rng(rng)
    assert draws() == first
    # A checkpoint written before this format stored the states as Python/numpy objects: still read, still exact.
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, path / "rng_state_0.pt")
    expected = draws()
    _, rng = load_checkpoint(trained[0], path, {})
    restore_rng(rng)
    assert draws() == expected


class _RunsCode:
    """A pickle that runs code when loaded without restrictions: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize(
    "planted", ["rng_state_0.pt", "optimizer.bin", "random_states_0.pkl", "pytorch_model_fsdp_0/.metadata"]
)
def test_a_checkpoint_file_that_would_run_code_is_refused(trained, tmp_path, planted):
    import torch

    from open_instruct.training.checkpointing import load_checkpoint

    proof = tmp_path / "proof"
    torch.save({"state": _RunsCode(proof)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert proof.read_text() == "ran"  # the file does run code when loaded the unsafe way
    path = _save(trained, tmp_path / "run", 2)
    marker = tmp_path / "marker"
    # Ours, accelerate's optimizer state, accelerate's RNG (whose load errors it swallows), a distributed checkpoint's
    # metadata (FSDP2; torch.distributed.checkpoint unpickles it itself).
    target = path / planted
    if target.name == ".metadata":
        target.parent.mkdir()
        target.write_bytes(pickle.dumps({"storage": _RunsCode(marker)}))
    else:
        assert target.is_file()
        torch.save({"state": _RunsCode(marker)}, target)
    with pytest.raises(UserError) as err:
        load_checkpoint(trained[0], path, {})
    assert str(err.value).startswith(f"{target}: refused to load: it is a pickle that asks for more than tensors")
    assert "(Unsupported global: GLOBAL " in str(err.value) and "exec" in str(err.value)
    assert not marker.exists()


def test_weights_only_is_forced_on_loads_that_ask_for_full_pickles(tmp_path):
    import torch

    from open_instruct.training.safe_load import weights_only_loads

    marker = tmp_path / "marker"
    torch.save([_RunsCode(marker)], tmp_path / "optim_states.pt")
    with pytest.raises(UserError, match="optim_states.pt: refused to load"), weights_only_loads():
        torch.load(tmp_path / "optim_states.pt", weights_only=False)  # as DeepSpeed's checkpoint engine asks
    assert not marker.exists()
    with pytest.raises(UserError, match="optim_states.pt: refused to load"), weights_only_loads():
        try:
            torch.load(tmp_path / "optim_states.pt")
        except Exception:  # a caller that swallows the error (accelerate's RNG load) does not hide the refusal
            pass
    assert not marker.exists()
    assert torch.load is not None and torch.load.__name__ == "load"  # restored after the block


def test_real_distributed_checkpoint_metadata_passes_the_check(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    from open_instruct.training.safe_load import check_distributed_metadata

    dcp.save({"weight": torch.ones(3, 2), "step": 4, "lr": 0.5}, checkpoint_id=str(tmp_path / "dcp"))
    assert (tmp_path / "dcp" / ".metadata").is_file()
    check_distributed_metadata(tmp_path)  # no error: only metadata classes, sizes and dtypes
