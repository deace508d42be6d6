"""Two processes (torchrun, gloo): SIGTERM to every worker during the reference pass, the same command again, and the
final reference cache equals, tensor for tensor, the one an uninterrupted 2-process run builds."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from open_instruct.training.preemption import PREEMPTED_EXIT_CODE
from tests.conftest import ROOT, cli_env, free_port, small_run_args, torchrun_command

pytestmark = pytest.mark.slow


def _launch(model_dir: Path, train: Path, out: Path, cache: Path) -> subprocess.Popen:
    flags = small_run_args(
        model_dir,
        train,
        out,
        mixer_list=[str(train), "128"],
        per_device_train_batch_size="4",
        reference_batch_size="2",  # 32 reference batches per rank: many shards, time to signal mid-pass
        max_train_steps="1",
    )
    env = {**cli_env(cache), "ACCELERATE_LOG_LEVEL": "error", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        torchrun_command(flags, port=free_port()),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(path, weights_only=True)
    return {k: v for k, v in payload.items() if torch.is_tensor(v)}


def test_sigterm_during_a_two_process_reference_pass_then_rerun_gives_the_same_cache(
    tiny_model_dir, synthetic_data, tmp_path
):
    import psutil

    train = synthetic_data[0]
    whole_cache, cut_cache = tmp_path / "whole", tmp_path / "cut"
    full = _launch(tiny_model_dir, train, tmp_path / "a", whole_cache)
    output = full.communicate(timeout=600)[0]
    assert full.returncode == 0, output[-3000:]
    [whole] = list(whole_cache.glob("*.pt"))

    proc = _launch(tiny_model_dir, train, tmp_path / "b", cut_cache)
    parts = cut_cache / whole.with_suffix(".parts").name
    deadline = time.monotonic() + 300
    while len(list(parts.glob("shard_*.pt"))) < 3:
        assert proc.poll() is None, f"ended before the signal point:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no shard written"
        time.sleep(0.02)
    workers = [c for c in psutil.Process(proc.pid).children() if "dpo_tune_cache" in " ".join(c.cmdline())]
    assert len(workers) == 2
    for worker in workers:  # as SLURM does: every task gets the signal
        worker.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, output[-3000:]  # torchrun reports its workers' code 75 as a failure of its own
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in output or "exit code 75" in output, output[-3000:]
    assert "preempted by SIGTERM during the reference pass" in output, output[-3000:]
    assert not (cut_cache / whole.name).exists(), "a cut pass left a cache file"
    assert list(parts.glob("shard_*.pt")), "the cut pass kept no shard"

    rerun = _launch(tiny_model_dir, train, tmp_path / "b", cut_cache)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-3000:]
    assert "continuing a partial pass" in output, output[-3000:]
    assert sorted(p.name for p in cut_cache.iterdir()) == [whole.name], "shards left behind"
    expected, got = _tensors(whole), _tensors(cut_cache / whole.name)
    assert sorted(got) == sorted(expected) and expected
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
