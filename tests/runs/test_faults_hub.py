"""A run whose final Hub push fails for good: exit 2, one ``error:`` line naming the kept local model and the command
that pushes it later; that command then uploads the same files."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from open_instruct.report.hub import IGNORE_PATTERNS
from open_instruct.report.hub_retry import RetryPolicy
from open_instruct.report.push_to_hub import main as push_command
from tests.conftest import ROOT, cli_env, small_run_args
from tests.fake_hub import FakeHub

pytestmark = pytest.mark.slow


def test_a_failed_push_keeps_the_model_and_the_hint_pushes_it(tiny_model_dir, synthetic_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = small_run_args(
        tiny_model_dir, synthetic_data[0], out, max_train_steps="2", push_to_hub=True, hf_entity="org", exp_name="m"
    )
    with FakeHub() as hub:
        hub.fail("create", 403)  # retrying cannot fix it: the run ends at once instead of waiting out the backoff
        env = {**cli_env(tmp_path / "cache"), "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_fake"}
        env.pop("HF_HUB_OFFLINE")
        command = [sys.executable, "-m", "open_instruct.dpo_tune_cache", *args]
        result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1]
        assert "push to the Hub (org/m) failed at once: HfHubHTTPError: 403" in errors[0]
        assert f"the local model is kept at {out};" in errors[0]
        kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(kept) and not hub.commits

        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_fake")
        hint = shlex.split(errors[0].split("push it later with: ")[1])
        assert hint[:3] == ["python", "-m", "open_instruct.report.push_to_hub"]
        push_command(hint[3:], RetryPolicy(sleep=lambda _: None))
    arrived = hub.repos["org/m"]["branches"]["main"]
    hidden = [name for name in kept if name.startswith(".") or name.endswith(".tmp")]
    assert arrived == {k: v for k, v in kept.items() if k not in hidden}, (sorted(arrived), IGNORE_PATTERNS)
