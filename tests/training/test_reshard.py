"""What a resume on another world size compares, derives and converts (``training/reshard.py``), without processes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from open_instruct.config import validate
from open_instruct.errors import UserError
from open_instruct.training import reshard
from open_instruct.training.pair_record import RECORD_ENV, record_pairs
from open_instruct.training.recipe import command_line
from tests.conftest import small_run_args


def _signature(world_size: int, accumulation: int, per_device: int = 4, **other) -> dict:
    return {
        "data": "abc",
        "seed": 1,
        "world_size": world_size,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        **other,
    }


def _kept(saved: dict | None, per_device: int, accumulation: int, world_size: int) -> tuple[int, str | None]:
    return reshard.kept_accumulation(saved, per_device, accumulation, world_size, "out")


def test_world_size_and_accumulation_count_only_through_the_global_batch():
    saved = _signature(2, 2)
    assert reshard.changed_settings(saved, _signature(1, 4)) == {}
    assert reshard.changed_settings(saved, _signature(4, 1)) == {}
    assert reshard.changed_settings(saved, _signature(4, 2)) == {"world_size": (2, 4)}
    # Another per-device batch size forms other micro-batches: reported, and so are the per-rank values.
    assert set(reshard.changed_settings(saved, _signature(1, 4, per_device=8))) == {
        "world_size",
        "gradient_accumulation_steps",
        "per_device_train_batch_size",
    }
    assert reshard.changed_settings(saved, _signature(1, 4, seed=2)) == {"seed": (1, 2)}


def test_accumulation_steps_follow_the_checkpoint_when_the_process_count_divides_them():
    steps, note = _kept(_signature(2, 2), 4, 2, world_size=4)
    assert steps == 1
    assert note == (
        "note: --gradient_accumulation_steps 1 (not 2): keeps the checkpoint's global batch of 16 on 4 processes "
        "(it was written by 2 processes)"
    )
    assert _kept(_signature(2, 2), 4, 4, world_size=1) == (4, None)  # already the same global batch
    assert _kept(_signature(2, 2), 4, 3, world_size=2) == (3, None)  # same world size: the signature check decides
    assert _kept(None, 4, 2, world_size=3) == (2, None)  # a fresh run


@pytest.mark.parametrize(("per_device", "world_size"), [(4, 3), (8, 1)])
def test_a_global_batch_that_cannot_be_kept_is_one_error_naming_what_works(per_device, world_size):
    with pytest.raises(UserError) as caught:
        _kept(_signature(2, 2), per_device, 1, world_size=world_size)
    message = str(caught.value)
    assert "\n" not in message and "its global batch is 16 (4 per device x 2 accumulation x 2 processes)" in message
    assert (
        "--per_device_train_batch_size 4 with 1 process x 4 accumulation, 2 processes x 2 accumulation, "
        "4 processes x 1 accumulation" in message
    )


def test_the_data_position_is_kept_in_global_micro_batches():
    assert reshard.resumed_position(4, saved_world=2, world_size=1) == 8
    assert reshard.resumed_position(8, saved_world=1, world_size=4) == 2
    assert reshard.resumed_position(0, saved_world=2, world_size=4) == 0
    with pytest.raises(UserError, match="6 micro-batches into its epoch, not a multiple of 4"):
        reshard.resumed_position(3, saved_world=2, world_size=4)


def _linear(total: int, world_size: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    steps = total * world_size  # accelerate steps a schedule once per process per optimizer step
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / steps))


def test_a_restored_schedule_is_moved_to_the_new_world_size():
    _, written = _linear(total=8, world_size=2)
    for _ in range(3 * 2):  # 3 optimizer steps on 2 processes
        written.optimizer.step()
        written.step()
    optimizer, resumed = _linear(total=8, world_size=4)
    resumed.load_state_dict(written.state_dict())
    reshard.rescale_schedules(SimpleNamespace(_schedulers=[SimpleNamespace(scheduler=resumed)]), 2, 4)
    assert resumed.last_epoch == 3 * 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 - 3 / 8) == resumed.get_last_lr()[0]
    optimizer.step()
    resumed.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 - (3 * 4 + 1) / 32)


def test_the_resume_note_names_both_world_sizes():
    assert reshard.resume_note(2, 2, None) is None
    assert reshard.resume_note(1, 2, "x") == "note: checkpoint written by 1 process, resuming on 2: x"


def test_recorded_pairs_are_the_real_rows_of_each_micro_batch(tmp_path, monkeypatch):
    window = [{"index": torch.tensor([5, 6, 7])}, {"index": torch.tensor([1, 5])}]
    record_pairs(3, 1, window, [3, 1])  # unset: nothing written
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "pairs"))
    record_pairs(3, 1, window, [3, 1])
    lines = (tmp_path / "pairs.rank1").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 3, "rank": 1, "pairs": [5, 6, 7, 1]}]


def _checkpoint(out, signature: dict) -> None:
    step = out / "step_2"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 2, "signature": signature}))
    (step / "COMPLETED").write_text("step 2\n")


def _entry(out, model, train, per_device: int, accumulation: int) -> list[str]:
    return small_run_args(
        model,
        train,
        out,
        per_device_train_batch_size=str(per_device),
        gradient_accumulation_steps=str(accumulation),
    )


@pytest.mark.parametrize(("world_size", "per_device", "expected"), [("3", 4, None), ("4", 4, 1)])
def test_the_entry_derives_or_refuses_before_the_run(
    world_size, per_device, expected, tiny_model_dir, synthetic_data, tmp_path, monkeypatch, capsys
):
    """The command line, with the launcher's WORLD_SIZE, on an output folder whose newest checkpoint was written by 2
    processes at a global batch of 16: the run starts with the derived accumulation steps, or does not start."""
    out = tmp_path / "out"
    _checkpoint(out, _signature(2, 2))
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    started = []
    argv = _entry(out, tiny_model_dir, synthetic_data[0], per_device, 2)
    if expected is None:
        with pytest.raises(SystemExit) as caught:
            command_line(argv, validate, started.append)
        assert caught.value.code == 2 and started == []
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot resume the checkpoint in {out} on 3 processes")
    else:
        command_line(argv, validate, started.append)
        assert [args.gradient_accumulation_steps for args in started] == [expected]
        assert "note: --gradient_accumulation_steps 1 (not 2)" in capsys.readouterr().out
