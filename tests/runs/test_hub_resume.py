"""A run pushing its checkpoints to a (loopback) Hub is killed, its disk wiped, and the same command resumes from the
Hub: the steps after the resume match an uninterrupted run's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from open_instruct.training.checkpointing import COMPLETED
from tests.conftest import ROOT, cli_env, free_port, read_metrics, small_run_args
from tests.fake_hub import FakeHub

pytestmark = pytest.mark.slow

REPO = "org/resumable"


def _hub_env(cache: Path, hub: FakeHub, **extra: str) -> dict[str, str]:
    env = {**cli_env(cache), "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_fake", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("HF_HUB_OFFLINE")
    return env


def _complete_on_hub(hub: FakeHub, branch: str) -> bool:
    return COMPLETED in hub.repos.get(REPO, {}).get("branches", {}).get(branch, {})


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0  # whole lines only: the run may be writing one


def _losses(out: Path) -> dict[int, float]:
    return {r["training_step"]: r["train_loss"] for r in read_metrics(out)}


def test_killed_run_resumes_from_the_hub_on_an_empty_disk(dropout_model_dir, synthetic_data, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    flags = {"checkpointing_steps": "2", "keep_last_n_checkpoints": "1", "max_train_steps": "6", "loss_type": "dpo"}
    hub_flags = {"push_to_hub": True, "push_checkpoints_to_hub": True, "hf_entity": "org", "exp_name": "resumable"}
    args = small_run_args(dropout_model_dir, synthetic_data[0], out, **flags, **hub_flags)
    command = [sys.executable, "-m", "open_instruct.dpo_tune_cache", *args]
    with FakeHub() as hub:
        # step_6's COMPLETED marker waits 60 s: the kill lands with step_4 on the Hub and steps 1-6 logged, so the
        # killed run is the uninterrupted one for steps 1-6 (the same schedule: 6 steps)
        env = _hub_env(cache, hub, OPEN_INSTRUCT_TEST_CHECKPOINT_DELAY="6:60")
        proc = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 120
        while not (_complete_on_hub(hub, "step_4") and _steps_logged(out) == 6):
            assert proc.poll() is None, f"the run ended before step_4 was on the Hub:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "step_4 never arrived on the Hub"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        expected = _losses(out)
        assert not _complete_on_hub(hub, "step_6") and sorted(expected) == list(range(1, 7))
        shutil.rmtree(out)  # an empty disk: a new machine
        resumed = subprocess.run(command, env=_hub_env(cache, hub), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"downloaded checkpoint step_4 from the Hub ({REPO})" in resumed.stdout
    assert "resumed at optimizer step 4" in resumed.stdout
    got = _losses(out)
    assert sorted(got) == [5, 6]
    for step, loss in got.items():  # bit-identical: same process count, same kernels, the RNG restored exactly
        assert loss == expected[step], f"train_loss differs at step {step}: {loss} vs {expected[step]}"
    # Branches pruned like the local folders (keep 1): step_4 gave way to step_6, pushed files first, marker last.
    branches = hub.repos[REPO]["branches"]
    assert sorted(b for b in branches if b.startswith("step_")) == ["step_6"]
    assert sorted(p.name for p in out.glob("step_*")) == ["step_6"]
    commits = [c for c in hub.commits if c["revision"] == "step_6"]
    assert [list(c["files"]) == [COMPLETED] for c in commits] == [False, True]
    for name, data in branches["step_6"].items():
        assert data == (out / "step_6" / name).read_bytes(), f"step_6/{name} differs from the local checkpoint"
    summary = next(line for line in resumed.stdout.splitlines() if line.startswith("Hub checkpoints:"))
    assert summary.startswith("Hub checkpoints: 1 pushed to org/resumable (branches step_6), 0 failed")
    waited_ms = float(summary.rsplit(": ", 1)[1].removesuffix(" ms"))
    print(summary)
    assert waited_ms < 500  # the step handed the checkpoint over; the upload ran beside training
    assert not (out / ".hub_uploads").exists()


def test_an_unreachable_hub_with_no_local_checkpoint_stops_before_any_work(tiny_model_dir, synthetic_data, tmp_path):
    out = tmp_path / "run"
    args = small_run_args(
        tiny_model_dir, synthetic_data[0], out, push_to_hub=True, push_checkpoints_to_hub=True, hf_entity="org"
    )
    env = {**cli_env(tmp_path / "cache"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_TOKEN": "hf_fake"}
    env.pop("HF_HUB_OFFLINE")
    result = subprocess.run(
        [sys.executable, "-m", "open_instruct.dpo_tune_cache", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the Hub (org/dpo) cannot be reached" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing was trained, nothing left behind
