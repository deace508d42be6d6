"""A TRL recipe's weighted loss combination through the CLI: each component logged, and an exact resume after a kill."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest

from open_instruct.training.checkpointing import COMPLETED
from tests.conftest import ROOT, cli_env, read_metrics, run_cli, small_run_args

pytestmark = pytest.mark.slow

WEIGHTS = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}  # TRL's MPO recipe
# 64 pairs, 8 per micro-batch, 2 micro-batches per step: 4 optimizer steps, a checkpoint every 2.
RUN = {
    "loss_type": list(WEIGHTS),
    "loss_weights": [str(w) for w in WEIGHTS.values()],
    "ld_alpha": "0.5",
    "beta": "0.1",
    "gradient_accumulation_steps": "2",
    "checkpointing_steps": "2",
    "keep_last_n_checkpoints": "-1",
}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, synthetic_data, tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("combo"), tmp_path_factory.mktemp("cache")
    result = run_cli(small_run_args(tiny_model_dir, synthetic_data[0], out, **RUN), cache)
    assert result.returncode == 0, result.stderr
    return out, cache


def test_three_loss_combination_logs_each_component(uninterrupted):
    out, _ = uninterrupted
    rows = read_metrics(out)
    assert [r["training_step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        components = {name: row[f"loss/{name}"] for name in WEIGHTS}
        # the logged total is the weighted sum of the logged components (each a mean over the step's pairs)
        total = sum(WEIGHTS[name] * value for name, value in components.items())
        assert row["train_loss"] == pytest.approx(total, rel=1e-5, abs=1e-6)
        assert components["sft"] > 0 and components["bco_pair"] > 0 and components["sigmoid"] > 0
    # before the first update the policy is the reference: every log-ratio (LD-DPO weighted, from the cache's split
    # sums on one side and the policy's chunked path on the other) is 0, so sigmoid = log 2 and bco_pair = 2 log 2
    assert rows[0]["loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["loss/bco_pair"] == pytest.approx(2 * math.log(2), abs=1e-5)
    assert rows[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["train_loss"] != rows[0]["train_loss"]


def test_kill_and_rerun_of_a_combination_resumes_exactly(tiny_model_dir, synthetic_data, uninterrupted, tmp_path):
    reference_out, cache = uninterrupted
    out = tmp_path / "run"
    args = small_run_args(tiny_model_dir, synthetic_data[0], out, **RUN)
    env = {**cli_env(cache), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "open_instruct.dpo_tune_cache", *args]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (out / "step_2" / COMPLETED).is_file():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = run_cli(args, cache)  # the same command again
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    expected = {r["training_step"]: r for r in read_metrics(reference_out)}
    got = {r["training_step"]: r for r in read_metrics(out)}
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step, row in expected.items():
        for key in ("train_loss", "loss/sigmoid", "loss/bco_pair", "loss/sft", "learning_rate"):
            assert got[step][key] == pytest.approx(row[key], abs=1e-6), f"{key} differs at step {step}"
