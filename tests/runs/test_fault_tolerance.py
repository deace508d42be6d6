"""Kills, partial checkpoints, NaNs: a run resumes exactly, never trusts a half-written file, never saves NaNs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from open_instruct.training import reference_cache
from open_instruct.training.checkpointing import COMPLETED
from tests.conftest import ROOT, cli_env, free_port, read_metrics, run_cli, small_run_args, torchrun_command

pytestmark = pytest.mark.slow

# 64 pairs, 8 per micro-batch, 2 micro-batches per step, 2 epochs: 4 steps per epoch, 8 in all. Checkpoints at steps
# 2 and 6 (mid-epoch: the resume skips into an epoch, then crosses a boundary) and 4 (an epoch's end). The model has
# attention dropout, so equal losses also show that the random streams continue exactly.
RUN = {
    "gradient_accumulation_steps": "2",
    "num_epochs": "2",
    "checkpointing_steps": "2",
    "keep_last_n_checkpoints": "-1",
    "loss_type": "dpo",
}


def _args(model_dir: Path, synthetic_data, out: Path, **extra) -> list[str]:
    return small_run_args(model_dir, synthetic_data[0], out, **{**RUN, **extra})


def _popen(args: list[str], cache: Path, **env_extra) -> subprocess.Popen:
    env = {**cli_env(cache), "PYTHONUNBUFFERED": "1", **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "open_instruct.dpo_tune_cache", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"process ended before the kill point:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _run(args: list[str], cache: Path, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "open_instruct.dpo_tune_cache", *args],
        env={**cli_env(cache), **env_extra},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _losses(out: Path) -> dict[int, tuple[float, float]]:
    rows = read_metrics(out)
    steps = [r["training_step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps in metrics.jsonl: {steps}"
    return {r["training_step"]: (r["train_loss"], r["learning_rate"]) for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(dropout_model_dir, synthetic_data, tmp_path_factory) -> tuple[Path, Path]:
    """(output dir, reference cache dir) of the run nothing interrupts."""
    out, cache = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("cache")
    result = run_cli(_args(dropout_model_dir, synthetic_data, out), cache)
    assert result.returncode == 0, result.stderr
    assert sorted(_losses(out)) == list(range(1, 9))
    assert sorted(p.name for p in out.glob("step_*")) == ["step_2", "step_4", "step_6", "step_8"]
    return out, cache


def _assert_same_run(resumed: Path, reference: Path) -> None:
    expected, got = _losses(reference), _losses(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert got[step][0] == pytest.approx(expected[step][0], abs=1e-6), f"train_loss differs at step {step}"
        assert got[step][1] == pytest.approx(expected[step][1], rel=1e-9), f"learning_rate differs at step {step}"
    from safetensors.torch import load_file

    a, b = load_file(resumed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_kill_after_checkpoint_then_rerun_matches_uninterrupted(
    dropout_model_dir, synthetic_data, uninterrupted, tmp_path
):
    reference_out, cache = uninterrupted
    out = tmp_path / "run"
    args = _args(dropout_model_dir, synthetic_data, out)
    proc = _popen(args, cache)
    _kill_when(proc, lambda: (out / "step_2" / COMPLETED).is_file())
    assert not (out / "model.safetensors").exists()
    result = run_cli(args, cache)  # the same command again
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout and "reference log-probs: loaded from cache" in result.stdout
    _assert_same_run(out, reference_out)


def test_kill_during_checkpoint_write_resumes_from_the_one_before(
    dropout_model_dir, synthetic_data, uninterrupted, tmp_path
):
    reference_out, cache = uninterrupted
    out = tmp_path / "run"
    args = _args(dropout_model_dir, synthetic_data, out)
    # The test hook holds step_6's COMPLETED marker back for 10 minutes: the kill lands mid-checkpoint every time.
    proc = _popen(args, cache, OPEN_INSTRUCT_TEST_CHECKPOINT_DELAY="6:600")
    _kill_when(proc, lambda: (out / "step_6" / "trainer_state.json").is_file())
    assert (out / "step_4" / COMPLETED).is_file() and not (out / "step_6" / COMPLETED).exists()
    assert [r["training_step"] for r in read_metrics(out)][-1] == 6  # steps 4-6 logged before the kill
    result = run_cli(args, cache)
    assert result.returncode == 0, result.stderr
    assert f"ignoring incomplete checkpoint {out / 'step_6'}" in result.stdout
    assert f"resuming from {out / 'step_4'}" in result.stdout  # an epoch's end
    _assert_same_run(out, reference_out)
    assert (out / "step_6" / COMPLETED).is_file()  # rewritten whole by the resumed run


def test_resume_with_changed_batch_settings_is_refused(dropout_model_dir, synthetic_data, uninterrupted, tmp_path):
    reference_out, cache = uninterrupted
    args = _args(
        dropout_model_dir,
        synthetic_data,
        tmp_path / "x",
        per_device_train_batch_size="4",
        resume_from_checkpoint=str(reference_out / "step_2"),
    )
    result = run_cli(args, cache)
    assert result.returncode == 2
    assert (
        "cannot resume exactly" in result.stderr
        and "per_device_train_batch_size: checkpoint 8 vs now 4" in result.stderr
    )


def test_kill_during_reference_pass_leaves_no_cache_file(tiny_model_dir, synthetic_data, tmp_path):
    cache = tmp_path / "cache"
    args = small_run_args(
        tiny_model_dir,
        synthetic_data[0],
        tmp_path / "run",
        mixer_list=[str(synthetic_data[0]), "256"],
        reference_batch_size="1",
        max_train_steps="1",
    )
    proc = _popen(args, cache)
    for line in proc.stdout:  # the pass (256 single-pair forwards) takes far longer than reacting to this line
        if line.startswith("reference log-probs: computing"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Only the pass's shards (in <key>.parts/) may remain: never a file that reads as a cache.
    assert not cache.exists() or all(p.suffix == ".parts" for p in cache.iterdir()), list(cache.iterdir())
    result = run_cli([*args, "--reference_batch_size", "64"], cache)  # same cache key, faster pass
    assert result.returncode == 0, result.stderr
    assert "reference log-probs: computing" in result.stdout
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"
    payload = torch.load(files[0], weights_only=True)
    table, problem = reference_cache.check(files[0], payload["key"], 256)
    assert problem == "" and table is not None


def test_injected_nan_stops_the_run_naming_step_and_indices(tiny_model_dir, synthetic_data, tmp_path):
    out = tmp_path / "run"
    args = small_run_args(tiny_model_dir, synthetic_data[0], out, checkpointing_steps="1")
    result = _run(args, tmp_path / "cache", OPEN_INSTRUCT_TEST_NAN_AT_STEP="2")
    assert result.returncode == 2
    # Independent: the seedable sampler's epoch-0 order is randperm under a generator seeded with --seed (1).
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1)).tolist()
    expected = sorted(order[8:16])
    assert f"at optimizer step 2, dataset indices {expected}" in result.stderr, result.stderr
    assert "no final model was written" in result.stderr
    assert not (out / "model.safetensors").exists()
    assert [r["training_step"] for r in read_metrics(out)] == [1]
    assert sorted(p.name for p in out.glob("step_*")) == ["step_1"]  # nothing saved after the NaN


def test_skip_nonfinite_batches_tolerates_and_counts(tiny_model_dir, synthetic_data, tmp_path):
    out = tmp_path / "run"
    args = small_run_args(tiny_model_dir, synthetic_data[0], out, skip_nonfinite_batches="1", max_train_steps="3")
    result = _run(args, tmp_path / "cache", OPEN_INSTRUCT_TEST_NAN_AT_STEP="2")
    assert result.returncode == 0, result.stderr
    assert "batch skipped (1 of at most 1)" in result.stdout
    rows = read_metrics(out)
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 1]
    assert all(isinstance(r["train_loss"], float) for r in (rows[0], rows[2]))
    assert (out / "model.safetensors").is_file()


def test_two_process_zero2_resume_matches_uninterrupted(tiny_model_dir, synthetic_data, tmp_path):
    """torchrun, 2 CPU processes, DeepSpeed ZeRO-2: resuming mid-epoch from a copy of step_4 continues exactly."""

    def launch(out: Path) -> subprocess.CompletedProcess:
        port = free_port()
        flags = small_run_args(
            tiny_model_dir,
            synthetic_data[0],
            out,
            mixer_list=[str(synthetic_data[0]), "40"],
            per_device_train_batch_size="4",
            gradient_accumulation_steps="2",
            num_epochs="2",
            checkpointing_steps="2",
            keep_last_n_checkpoints="-1",
            zero_stage="2",
            reference_batch_size="8",
        )
        env = {**cli_env(tmp_path / "cache"), "DS_ACCELERATOR": "cpu", "ACCELERATE_LOG_LEVEL": "error"}
        result = subprocess.run(
            torchrun_command(flags, port=port),
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(full)
    assert json.loads((full / "step_4" / "trainer_state.json").read_text())["batches_in_epoch"] == 2  # mid-epoch
    resumed.mkdir()
    shutil.copytree(full / "step_4", resumed / "step_4")
    result = launch(resumed)
    assert "resumed at optimizer step 4 (epoch 1, 2 micro-batches into it)" in result.stdout
    expected, got = _losses(full), _losses(resumed)
    assert sorted(got) == [5, 6]
    for step in got:
        assert got[step][0] == pytest.approx(expected[step][0], abs=1e-6), f"train_loss differs at step {step}"
