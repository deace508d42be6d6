"""A real stop signal during training and during the reference pass, then the same command: the run continues as if
nothing happened (same per-step losses, the same reference cache bytes); two runs building one cache both succeed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from open_instruct.training import reference_cache
from open_instruct.training.checkpointing import COMPLETED
from open_instruct.training.preemption import PREEMPTED_EXIT_CODE
from tests.conftest import ROOT, cli_env, free_port, read_metrics, run_cli, small_run_args, torchrun_command
from tests.runs.test_fault_tolerance import _args, _assert_same_run, _losses, _popen, uninterrupted  # noqa: F401

pytestmark = pytest.mark.slow


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"process ended before the signal point:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "signal point never reached"
        time.sleep(0.02)


def _logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    rows = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return len(rows)


def test_sigterm_between_checkpoints_saves_exits_75_and_the_rerun_matches(
    dropout_model_dir,  # noqa: F811
    synthetic_data,
    uninterrupted,  # noqa: F811
    tmp_path,
):
    reference_out, cache = uninterrupted
    out = tmp_path / "run"
    args = _args(dropout_model_dir, synthetic_data, out, checkpointing_steps=None)  # no scheduled checkpoint at all
    proc = _popen(args, cache)
    _wait_for(proc, lambda: _logged_step(out) >= 2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    lines = [line for line in output.splitlines() if line.startswith("preempted by SIGTERM")]
    assert len(lines) == 1, output
    saved = [p for p in out.glob("step_*")]
    assert len(saved) == 1 and (saved[0] / COMPLETED).is_file() and str(saved[0]) in lines[0]
    step = int(saved[0].name.split("_")[1])
    assert 2 <= step < 8 and f"at optimizer step {step}" in lines[0]
    assert not (out / "model.safetensors").exists()
    result = run_cli(args, cache)  # the same command again
    assert result.returncode == 0, result.stderr
    assert f"resumed at optimizer step {step}" in result.stdout
    _assert_same_run(out, reference_out)


def _ref_args(model_dir: Path, train: Path, out: Path) -> list[str]:
    return small_run_args(
        model_dir, train, out, mixer_list=[str(train), "128"], reference_batch_size="2", max_train_steps="1"
    )


def test_sigterm_during_the_reference_pass_then_rerun_gives_the_same_cache_bytes(
    tiny_model_dir, synthetic_data, tmp_path
):
    whole_cache, cut_cache = tmp_path / "whole", tmp_path / "cut"
    assert run_cli(_ref_args(tiny_model_dir, synthetic_data[0], tmp_path / "a"), whole_cache).returncode == 0
    [whole] = list(whole_cache.glob("*.pt"))
    args = _ref_args(tiny_model_dir, synthetic_data[0], tmp_path / "b")
    proc = _popen(args, cut_cache)
    parts = cut_cache / whole.with_suffix(".parts").name
    _wait_for(proc, lambda: len(list(parts.glob("shard_*.pt"))) >= 3)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    assert "preempted by SIGTERM during the reference pass" in output and f"saved in {parts}" in output
    assert not (cut_cache / whole.name).exists(), "a cut pass left a cache file"
    assert not (tmp_path / "b" / "model.safetensors").exists()
    result = run_cli(args, cut_cache)
    assert result.returncode == 0, result.stderr
    assert "continuing a partial pass" in result.stdout, result.stdout
    assert (cut_cache / whole.name).read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in cut_cache.iterdir()) == [whole.name], "shards left behind"


def test_two_runs_building_one_cache_at_once_both_succeed(tiny_model_dir, synthetic_data, tmp_path):
    """Run A builds the cache and is paused (SIGSTOP: it keeps its lock) mid-pass; run B, started meanwhile, computes
    on its own and finishes; A continues and finishes. Both succeed, one valid cache, no shards left."""
    cache = tmp_path / "cache"
    first = _popen(_ref_args(tiny_model_dir, synthetic_data[0], tmp_path / "run0"), cache)
    _wait_for(first, lambda: any(cache.glob("*.parts/shard_*.pt")))
    first.send_signal(signal.SIGSTOP)
    try:
        second = run_cli(_ref_args(tiny_model_dir, synthetic_data[0], tmp_path / "run1"), cache)
    finally:
        first.send_signal(signal.SIGCONT)
    output = first.communicate(timeout=600)[0]
    assert second.returncode == 0, second.stderr
    assert "another run is building" in second.stdout and "computing here too, without shards" in second.stdout
    assert first.returncode == 0, output
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].endswith(".pt"), files
    payload = torch.load(cache / files[0], weights_only=True)
    assert reference_cache.check(cache / files[0], payload["key"], 128)[1] == ""
    first_loss, second_loss = (read_metrics(tmp_path / f"run{i}")[0]["train_loss"] for i in range(2))
    assert first_loss == second_loss


def test_two_processes_one_signalled_rank_stops_both_and_the_rerun_matches(tiny_model_dir, synthetic_data, tmp_path):
    """torchrun, 2 CPU processes: SIGUSR1 to rank 1 only; both ranks agree, save one checkpoint and exit 75."""
    import psutil

    flags = {
        "mixer_list": [str(synthetic_data[0]), "48"],
        "per_device_train_batch_size": "4",
        "num_epochs": "2",
        "reference_batch_size": "8",
    }
    env = {**cli_env(tmp_path / "cache"), "ACCELERATE_LOG_LEVEL": "error", "PYTHONUNBUFFERED": "1"}

    def launch(out: Path) -> subprocess.Popen:
        command = torchrun_command(small_run_args(tiny_model_dir, synthetic_data[0], out, **flags), port=free_port())
        return subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    full = launch(tmp_path / "full")
    output = full.communicate(timeout=600)[0]
    assert full.returncode == 0, output[-3000:]
    out = tmp_path / "cut"
    proc = launch(out)
    _wait_for(proc, lambda: _logged_step(out) >= 2)
    workers = [c for c in psutil.Process(proc.pid).children() if "dpo_tune_cache" in " ".join(c.cmdline())]
    rank1 = next(w for w in workers if w.environ().get("RANK") == "1")
    os.kill(rank1.pid, signal.SIGUSR1)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0  # torchrun reports its workers' code 75 as a failure of its own
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in output or "exit code 75" in output, output[-3000:]
    [saved] = list(out.glob("step_*"))
    assert (saved / COMPLETED).is_file() and (saved / "rng_state_1.pt").is_file()
    rerun = launch(out)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-3000:]
    expected, got = _losses(tmp_path / "full"), _losses(out)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step][0] == pytest.approx(expected[step][0], abs=1e-6), f"train_loss differs at step {step}"


def test_sigterm_during_evaluation_saves_and_the_rerun_evaluates_that_step_again(
    dropout_model_dir,  # noqa: F811
    synthetic_data,
    tmp_path,
):
    train, test = synthetic_data
    extra = {"eval_mixer_list": [str(test), "64"], "eval_steps": "4", "reference_batch_size": "1"}
    cache = tmp_path / "cache"
    full, out = tmp_path / "full", tmp_path / "cut"
    assert run_cli(_args(dropout_model_dir, synthetic_data, full, **extra), cache).returncode == 0
    args = _args(dropout_model_dir, synthetic_data, out, checkpointing_steps=None, **extra)
    proc = _popen(args, cache)
    _wait_for(proc, lambda: _logged_step(out) >= 4)  # step 4's training row: its evaluation (64 forwards) follows
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    assert "saved checkpoint" in output and "the evaluation was cut short" in output, output
    assert json.loads((out / "step_4" / "trainer_state.json").read_text())["eval_pending"] is True
    result = run_cli(args, cache)
    assert result.returncode == 0, result.stderr
    expected, got = read_metrics(full), read_metrics(out)
    assert [(r["training_step"], "eval/loss" in r) for r in got] == [
        (r["training_step"], "eval/loss" in r) for r in expected
    ]
    for a, b in zip(got, expected):
        for name in ("train_loss", "eval/loss", "eval/rewards/accuracy"):
            if name in b:
                assert a[name] == pytest.approx(b[name], abs=1e-6), (name, a["training_step"])
