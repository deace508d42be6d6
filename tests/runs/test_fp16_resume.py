"""fp16's loss scaler survives a resume: its state is in the checkpoint and the resumed run continues from it.

One uninterrupted fp16 run checkpoints at step 2; a copy of that checkpoint, with its saved scale edited to a value
the run would never reach by itself (2**40), is resumed: the resumed run backs off from that scale, its overflowing
steps skipped, so the scale logged is the one read back, not a fresh scaler's 2**16.
"""

from __future__ import annotations

import json
import shutil

import pytest

from open_instruct.integrity import record_manifest
from tests.conftest import read_metrics, run_cli, small_run_args

pytestmark = pytest.mark.slow


def test_resume_restores_the_loss_scale(tiny_model_dir, synthetic_data, tmp_path):
    full, resumed, cache = tmp_path / "full", tmp_path / "resumed", tmp_path / "cache"

    def args(out):
        return small_run_args(tiny_model_dir, synthetic_data[0], out, mixer_list=[str(synthetic_data[0]), "32"],
                              mixed_precision="fp16", checkpointing_steps="2", per_device_train_batch_size="8")  # fmt: skip

    result = run_cli(args(full), cache)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((full / "step_2" / "trainer_state.json").read_text())["loss_scaler"]
    assert saved["scale"] == 2.0**16 and saved["clean_steps"] == 2 and saved["overflow_steps"] == 0
    assert [r["loss_scale"] for r in read_metrics(full)] == [2.0**16] * 4
    resumed.mkdir()
    shutil.copytree(full / "step_2", resumed / "step_2")
    state_file = resumed / "step_2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["loss_scaler"].update(scale=2.0**40, clean_steps=5, overflow_steps=7)
    state_file.write_text(json.dumps(state))
    # A deliberate edit: record it in the checkpoint's manifest, or the resume rightly skips the checkpoint as damaged.
    record_manifest(resumed / "step_2", skip=("COMPLETED",))
    result = run_cli(args(resumed), cache)
    assert result.returncode == 0, result.stderr[-3000:]
    rows, lr = read_metrics(resumed), {r["training_step"]: r["learning_rate"] for r in read_metrics(full)}
    # 2**40 times the loss overflows float16's gradients: both resumed steps are skipped, the scale halves each time
    # from the restored value, the count goes on from the restored one, and the schedule stands still.
    assert [(r["training_step"], r["loss_scale"], r["overflow_steps"]) for r in rows] == [
        (3, 2.0**39, 8),
        (4, 2.0**38, 9),
    ]
    assert [r["learning_rate"] for r in rows] == [lr[2], lr[2]] and lr[3] != lr[2]
    from safetensors.torch import load_file

    before, after = load_file(full / "step_2" / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(before[k].equal(after[k]) for k in before)  # skipped steps leave the weights as checkpointed
