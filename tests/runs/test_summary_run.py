"""The summary at the end of real CLI runs of the tiny model, checked against what the run left behind: summary.json's
figures against metrics.jsonl, its file list against the folder, its resume command parsed back to the same
arguments; a preempted run's summary, and its resume command run as printed."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from open_instruct.config.cli import parse_args
from open_instruct.training.preemption import PREEMPTED_EXIT_CODE
from tests.conftest import ROOT, cli_env, read_metrics, run_cli, small_run_args

MODULE = "open_instruct.dpo_tune_cache"


def _flags(model: Path, data: tuple[Path, Path], out: Path, **extra: str) -> list[str]:
    evaluation = {"eval_mixer_list": [str(data[1]), "32"], "eval_steps": "2", "checkpointing_steps": "4"}
    return small_run_args(model, data[0], out, **{**evaluation, **extra})


def _entry_arguments(command: str) -> list[str]:
    words = shlex.split(command)
    start = next(i for i in range(len(words) - 1) if words[i : i + 2] == ["-m", MODULE])
    return words[start + 2 :]


def _same_arguments(command: str, flags: list[str]) -> None:
    assert parse_args(_entry_arguments(command)).to_dict() == parse_args(flags).to_dict()


def _best(rows: list[dict], key: str) -> tuple[float, int]:
    """(highest value, first step that reached it), computed here from the rows."""
    found = [(r[key], r["training_step"]) for r in rows if key in r]
    top = max(v for v, _ in found)
    return top, min(s for v, s in found if v == top)


def _check_files(out: Path, files: list[dict]) -> None:
    assert [e["path"] for e in files] == sorted(p.name for p in out.iterdir())
    for entry in files:
        path = out / entry["path"]
        below = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        assert entry["bytes"] == sum(p.stat().st_size for p in below), entry["path"]


def test_a_finished_run_sums_up_what_its_folder_and_metrics_say(tiny_model_dir, synthetic_data, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    flags = _flags(tiny_model_dir, synthetic_data, out)
    result = run_cli(flags, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows, config = read_metrics(out), json.loads((out / "run_config.json").read_text())
    assert "=== run summary (dpo): finished: 8 of 8 steps ===" in result.stdout
    assert summary["ended"]["status"] == "finished"
    assert summary["steps"] == {
        "done": max(r["training_step"] for r in rows),
        "total": config["total_optimizer_steps"],
    }
    evals = [r for r in rows if "eval/rewards/accuracy" in r]
    best, best_step = _best(rows, "eval/rewards/accuracy")
    accuracy = summary["eval"]["accuracy"]
    assert (accuracy["best"], accuracy["best_step"]) == (best, best_step)
    assert (accuracy["final"], accuracy["final_step"]) == (evals[-1]["eval/rewards/accuracy"], 8)
    assert summary["train_loss"]["final"] == [r for r in rows if "train_loss" in r][-1]["train_loss"]
    rates = [r["perf/tokens_per_second_step"] for r in rows if "perf/tokens_per_second_step" in r]
    assert min(rates) <= summary["throughput"]["tokens_per_second"] <= max(rates)
    if not torch.cuda.is_available():
        assert summary["throughput"]["mfu"] is None and "no peak FLOP/s" in summary["throughput"]["mfu_note"]
    wall = summary["wall_seconds"]
    assert {"start", "data", "reference pass", "training", "save"} <= set(wall)
    assert sum(v for k, v in wall.items() if k != "total") == pytest.approx(wall["total"], abs=0.01)
    _check_files(out, summary["files"])
    assert {"model.safetensors", "metrics.jsonl", "curves.png", "step_4", "step_8", "summary.json"} <= {
        e["path"] for e in summary["files"]
    }
    assert Path(summary["caches"]["prepared data"]).is_dir() and summary["caches"]["reference log-probs"] == str(cache)
    _same_arguments(summary["commands"]["resume"], flags)
    _same_arguments(
        summary["commands"]["plan"],
        [*flags, "--dry_run", "--dry_run_gpu", "H100-80GB", "--dry_run_num_processes", "8"],
    )
    assert summary["commands"]["push"].endswith(f"push_to_hub --output_dir {out}")
    assert f"  resume: {summary['commands']['resume']}" in result.stdout


def test_cache_dataset_only_sums_up_and_offers_the_training_command(tiny_model_dir, synthetic_data, tmp_path):
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir, synthetic_data, out)
    result = run_cli([*flags, "--cache_dataset_only"], tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ended"]["status"] == "cached_data" and summary["steps"]["done"] == 0
    assert "no training in this run" in result.stdout and summary["commands"]["push"] is None
    _same_arguments(summary["commands"]["train"], flags)
    _check_files(out, summary["files"])


@pytest.mark.slow
def test_a_preempted_run_sums_up_and_its_resume_command_finishes_it(tiny_model_dir, synthetic_data, tmp_path):
    """SIGTERM while step 2's checkpoint is being written (a test delay holds its COMPLETED marker back): the run stops
    at step 2 with code 75; its summary says so, and its resume command, run as printed, finishes the run."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    flags = _flags(tiny_model_dir, synthetic_data, out, checkpointing_steps="2")
    env = {**cli_env(cache), "PYTHONUNBUFFERED": "1", "OPEN_INSTRUCT_TEST_CHECKPOINT_DELAY": "2:3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", MODULE, *flags],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "step_2").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "step_2 never started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ended"]["status"] == "preempted" and summary["ended"]["step"] == 2
    assert summary["steps"] == {"done": 2, "total": 8}
    assert "preempted at step 2: 2 of 8 steps done and saved; rerun the same command to resume" in output
    assert summary["commands"]["push"] is None and not (out / "model.safetensors").exists()
    _check_files(out, summary["files"])
    resume = shlex.split(summary["commands"]["resume"])
    assert resume == [sys.executable, "-m", MODULE, *flags]
    rerun = subprocess.run(resume, env=cli_env(cache), cwd=summary["commands"]["cwd"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed at optimizer step 2" in rerun.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ended"]["status"] == "finished" and summary["steps"] == {"done": 8, "total": 8}
    rows = read_metrics(out)
    best = _best(rows, "eval/rewards/accuracy")
    assert (summary["eval"]["accuracy"]["best"], summary["eval"]["accuracy"]["best_step"]) == best
    # the resumed attempt's average throughput counts its own tokens only: at its first logged step it equals that
    # step's rate (before, the first attempt's tokens over the second attempt's time inflated it)
    first = next(r for r in rows if r.get("training_step") == 3 and "perf/tokens_per_second_avg" in r)
    assert first["perf/tokens_per_second_avg"] == pytest.approx(first["perf/tokens_per_second_step"], rel=1e-3)
