"""A checkpoint written by N processes resumes on M (ZeRO-2 1->2, ZeRO-3 2->1, FSDP2 2->4) at the same global batch.

Each case is two launches: an uninterrupted run on N processes that saves every 2 optimizer steps (4 steps, 16 pairs
each, one epoch of 64 pairs), and a second output folder holding only its step-2 checkpoint (and the metrics it had
logged by then: an interruption right after that save), resumed on M processes with the same flags. The resumed run
derives its accumulation steps from the checkpoint's global batch (one note), and then:
- its steps 3 and 4 have the uninterrupted run's learning rates and losses within rtol 1e-5 (float sums in another
  order over other ranks; the tiny model has no dropout, so random streams do not matter);
- each optimizer step trains the uninterrupted run's pairs, and across the interruption every pair of the epoch is
  trained exactly once (pair ids recorded through ``OPEN_INSTRUCT_TEST_RECORD_PAIRS``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from open_instruct.training.pair_record import RECORD_ENV
from tests.conftest import ROOT, distributed_env, python_command, read_metrics, small_run_args, torchrun_command

pytestmark = pytest.mark.slow

PAIRS, PER_DEVICE, GLOBAL_MICRO_BATCHES = 64, 4, 4  # 16 pairs per optimizer step: 4 steps
RTOL, ATOL = 1e-5, 1e-6


def _flags(model: Path, train: Path, out: Path, engine: dict[str, str], processes: int) -> list[str]:
    return small_run_args(
        model,
        train,
        out,
        mixer_list=[str(train), str(PAIRS)],
        per_device_train_batch_size=str(PER_DEVICE),
        gradient_accumulation_steps=str(GLOBAL_MICRO_BATCHES // processes),
        reference_batch_size="8",  # the same reference batches on every world size: one shared cache
        learning_rate="1e-2",
        checkpointing_steps="2",
        keep_last_n_checkpoints="-1",
        **engine,
    )


def _launch(flags: list[str], processes: int, cache: Path, record: Path) -> str:
    command = torchrun_command(flags, processes) if processes > 1 else python_command(flags)
    env = {**distributed_env(cache), RECORD_ENV: str(record)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result.stdout


def _pairs_by_step(record: Path) -> dict[int, list[int]]:
    steps: dict[int, list[int]] = {}
    for path in record.parent.glob(f"{record.name}.rank*"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(row["pairs"])
    return steps


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reference_cache")


@pytest.mark.parametrize(
    ("engine", "before", "after"),
    [
        pytest.param({"zero_stage": "2"}, 1, 2, id="zero2-1to2"),
        pytest.param({"zero_stage": "3"}, 2, 1, id="zero3-2to1"),
        pytest.param({"fsdp": []}, 2, 4, id="fsdp2-2to4"),
    ],
)
def test_resume_on_another_world_size_continues_the_run(
    engine, before, after, tiny_model_dir, synthetic_data, shared_cache, tmp_path
):
    train = synthetic_data[0]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _launch(_flags(tiny_model_dir, train, whole, engine, before), before, shared_cache, tmp_path / "w")
    reference = read_metrics(whole)
    assert [row["training_step"] for row in reference] == [1, 2, 3, 4]

    # The interruption: only step 2's checkpoint and the rows logged up to it survive.
    resumed.mkdir()
    shutil.copytree(whole / "step_2", resumed / "step_2")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in reference[:2]))
    stdout = _launch(_flags(tiny_model_dir, train, resumed, engine, before), after, shared_cache, tmp_path / "r")

    accumulation = GLOBAL_MICRO_BATCHES // after
    assert f"note: --gradient_accumulation_steps {accumulation} (not {GLOBAL_MICRO_BATCHES // before})" in stdout
    processes = "1 process" if before == 1 else f"{before} processes"
    notes = [line for line in stdout.splitlines() if line.startswith("note: checkpoint written by")]
    assert len(notes) == 1 and notes[0].startswith(f"note: checkpoint written by {processes}, resuming on {after}")
    if "zero_stage" in engine:
        assert "universal checkpoint" in notes[0] and (resumed / "step_2" / "universal").is_dir()
    assert "resumed at optimizer step 2" in stdout

    rows = read_metrics(resumed)
    assert [row["training_step"] for row in rows] == [1, 2, 3, 4]
    for got, want in zip(rows[2:], reference[2:]):
        assert got["learning_rate"] == pytest.approx(want["learning_rate"], rel=1e-9)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=RTOL, abs=ATOL), (got, want)

    trained_before, trained_after = _pairs_by_step(tmp_path / "w"), _pairs_by_step(tmp_path / "r")
    assert sorted(trained_after) == [3, 4]
    for step in (3, 4):
        assert sorted(trained_after[step]) == sorted(trained_before[step])
    across = trained_before[1] + trained_before[2] + trained_after[3] + trained_after[4]
    assert Counter(across) == Counter(range(PAIRS)), "a pair skipped or trained twice across the interruption"
