"""Damaged files in whole runs: a checkpoint changed after its COMPLETED marker, a damaged reference cache and
prepared-data cache (all three at once, in one rerun), an explicitly given damaged checkpoint, a truncated
``model.safetensors``. Each is named in one line; the run falls back or rebuilds, or stops with exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from open_instruct.integrity import MANIFEST, manifest_problem
from tests.conftest import read_metrics, run_cli, small_run_args

pytestmark = pytest.mark.slow


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_in_table(cache_file: Path) -> None:
    """Change one value inside the reference table's stored bytes (the zip archive itself still opens)."""
    table = torch.load(cache_file, weights_only=True)["table"]
    at = cache_file.read_bytes().find(table.numpy().tobytes()[:64])
    assert at > 0
    _flip(cache_file, at + 5)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, synthetic_data, tmp_path_factory):
    """(flags, caches, output of the uninterrupted run: final loss and model bytes), then the same command rerun
    after its newest checkpoint, its reference cache and its prepared-data cache were damaged."""
    root = tmp_path_factory.mktemp("damaged")
    out, data_cache, reference = root / "out", root / "data_cache", root / "reference"
    # 32 pairs, 8 per step: 4 optimizer steps, a checkpoint after each, the newest 2 kept (step_3, step_4)
    flags = small_run_args(
        tiny_model_dir,
        synthetic_data[0],
        out,
        mixer_list=[str(synthetic_data[0]), "32"],
        checkpointing_steps="1",
        keep_last_n_checkpoints="2",
        loss_type="dpo",
        dataset_local_cache_dir=str(data_cache),
    )
    first = run_cli(flags, reference)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.glob("step_*")) == ["step_3", "step_4"]
    whole = {"loss": read_metrics(out)[-1]["train_loss"], "model": (out / "model.safetensors").read_bytes()}
    step4 = out / "step_4"
    whole["checkpoint_model_size"] = (step4 / "model.safetensors").stat().st_size
    (step4 / "model.safetensors").write_bytes((step4 / "model.safetensors").read_bytes()[:-10])  # truncated
    _flip(step4 / "optimizer.bin")  # and a byte changed in another file
    (cache_file,) = reference.glob("*.pt")
    _flip_in_table(cache_file)
    (train_arrow,) = data_cache.glob("*/train.arrow")
    _flip(train_arrow)
    again = run_cli(flags, reference)
    return (
        {"flags": flags, "out": out, "whole": whole, "again": again, "reference": reference},
        cache_file,
        train_arrow,
    )


def test_a_damaged_checkpoint_is_named_and_the_run_resumes_from_the_previous_one(runs):
    run, _, _ = runs
    out, again = run["out"], run["again"]
    assert again.returncode == 0, again.stderr
    size = run["whole"]["checkpoint_model_size"]
    lines = [line for line in again.stdout.splitlines() if "checkpoint damaged" in line]
    assert lines == [
        f"warning: checkpoint damaged: {out / 'step_4' / 'model.safetensors'} is damaged: {size} bytes recorded, "
        f"the file has {size - 10}; resuming from {out / 'step_3'} instead"
    ], again.stdout
    assert "resumed at optimizer step 3" in again.stdout
    # the same final loss and the same final weights as the uninterrupted run
    assert read_metrics(out)[-1]["train_loss"] == run["whole"]["loss"]
    assert (out / "model.safetensors").read_bytes() == run["whole"]["model"]
    # the final model's manifest lists its files as they are (a later push or load can check them)
    assert manifest_problem(out) == "" and "model.safetensors" in json.loads((out / MANIFEST).read_text())["files"]


def test_damaged_caches_are_named_and_rebuilt(runs):
    run, cache_file, train_arrow = runs
    output = run["again"].stdout + run["again"].stderr
    assert (
        f"warning: reference cache {cache_file} not used: checksum mismatch (the table was altered or damaged); "
        "rebuilding it"
    ) in output
    assert f"data: prepared-data cache {train_arrow} is damaged: its contents changed" in output
    assert f"data: prepared-data cache written: {train_arrow.parent}" in output
    assert torch.load(cache_file, weights_only=True)["table"].isfinite().all()  # rebuilt whole


def test_an_explicit_damaged_checkpoint_is_an_error(runs):
    run, _, _ = runs
    step4 = run["out"] / "step_4"  # rewritten whole by the rerun
    _flip(step4 / "scheduler.bin")  # same size: only the checksum tells
    result = run_cli([*run["flags"], "--resume_from_checkpoint", str(step4)], run["reference"])
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip()  # one line, before any data, reference or training work
    assert error.startswith(
        f"error: --resume_from_checkpoint: {step4 / 'scheduler.bin'} is damaged: its contents changed"
    ) and error.endswith("; pick an earlier step_N folder"), result.stderr
    assert "\n" not in error and "data:" not in result.stdout + result.stderr


def test_a_truncated_model_file_is_an_error_before_any_work(tiny_model_dir, synthetic_data, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    result = run_cli(small_run_args(model, synthetic_data[0], tmp_path / "out"), tmp_path / "reference")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: --model_name_or_path: {weights} is truncated: header says {size} bytes, file has {size // 2}; "
        "copy or download the model again"
    )
    assert not (tmp_path / "reference").exists() and not (tmp_path / "out" / "metrics.jsonl").exists()
