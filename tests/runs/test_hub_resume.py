"""A run pushing its checkpoints to a (loopback) Hub is killed, its disk wiped, and the same command resumes from the
Hub: the steps after the resume match an uninterrupted run's."""

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

from open_instruct.training.checkpointing import COMPLETED
from tests.conftest import ROOT, cli_env, read_metrics, run_cli, small_run_args
from tests.fake_hub import FakeHub

pytestmark = pytest.mark.slow

REPO = "org/resumable"


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with attention dropout (equal losses then also show the random streams resumed exactly)."""
    path = tmp_path_factory.mktemp("dropout") / "model"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (path / "config.json").write_text(json.dumps(config))
    return path


def _hub_env(cache: Path, hub: FakeHub, **extra: str) -> dict[str, str]:
    env = {**cli_env(cache), "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_fake", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("HF_HUB_OFFLINE")
    return env


def _complete_on_hub(hub: FakeHub, branch: str) -> bool:
    return COMPLETED in hub.repos.get(REPO, {}).get("branches", {}).get(branch, {})


def _losses(out: Path) -> dict[int, float]:
    return {r["training_step"]: r["train_loss"] for r in read_metrics(out)}


def test_killed_run_resumes_from_the_hub_on_an_empty_disk(dropout_model_dir, synthetic_data, tmp_path):
    cache = tmp_path / "cache"
    run = {"checkpointing_steps": "2", "keep_last_n_checkpoints": "2", "loss_type": "dpo"}
    reference = run_cli(small_run_args(dropout_model_dir, synthetic_data[0], tmp_path / "ref", **run), cache)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    hub_flags = {"push_to_hub": True, "push_checkpoints_to_hub": True, "hf_entity": "org", "exp_name": "resumable"}
    command = [
        sys.executable,
        "-m",
        "open_instruct.dpo_tune_cache",
        *small_run_args(dropout_model_dir, synthetic_data[0], out, **run, **hub_flags),
    ]
    with FakeHub() as hub:
        # step_6's COMPLETED marker waits 60 s: the kill lands while step_4 is on the Hub and step_6 is not
        env = _hub_env(cache, hub, OPEN_INSTRUCT_TEST_CHECKPOINT_DELAY="6:60")
        proc = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 120
        while not _complete_on_hub(hub, "step_4"):
            assert proc.poll() is None, f"the run ended before step_4 was on the Hub:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "step_4 never arrived on the Hub"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert not _complete_on_hub(hub, "step_6")
        shutil.rmtree(out)  # an empty disk: a new machine
        resumed = subprocess.run(command, env=_hub_env(cache, hub), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"downloaded checkpoint step_4 from the Hub ({REPO})" in resumed.stdout
    assert "resumed at optimizer step 4" in resumed.stdout
    expected, got = _losses(tmp_path / "ref"), _losses(out)
    assert sorted(expected) == list(range(1, 9)) and sorted(got) == [5, 6, 7, 8]
    for step, loss in got.items():
        assert loss == expected[step], f"train_loss differs at step {step}: {loss} vs {expected[step]}"
    # Branches pruned like the local folders (keep 2); each branch's marker came in its own, later commit.
    branches = hub.repos[REPO]["branches"]
    assert sorted(b for b in branches if b.startswith("step_")) == ["step_6", "step_8"]
    assert sorted(p.name for p in out.glob("step_*")) == ["step_6", "step_8"]
    for branch in ("step_6", "step_8"):
        commits = [c for c in hub.commits if c["revision"] == branch]
        assert [list(c["files"]) == [COMPLETED] for c in commits][-2:] == [False, True], branch
        local = out / branch
        for name, data in branches[branch].items():
            assert data == (local / name).read_bytes(), f"{branch}/{name} differs from the local checkpoint"
    assert "Hub checkpoints: 2 pushed to org/resumable (branches step_6, step_8), 0 failed" in resumed.stdout
    assert not (out / ".hub_uploads").exists()
