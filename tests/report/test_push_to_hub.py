"""``python -m open_instruct.report.push_to_hub``: an incomplete folder refused in one line before any Hub call, the
run's own Hub target by default, checkpoints on request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from open_instruct.report.hub_retry import RetryPolicy
from open_instruct.report.push_to_hub import main as push_command
from open_instruct.training.checkpointing import COMPLETED
from tests.conftest import run_python
from tests.fake_hub import FakeHub

FAST = RetryPolicy(sleep=lambda _: None)


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    with FakeHub() as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_fake")
        yield fake


@pytest.fixture
def out(tiny_model_dir, tmp_path) -> Path:
    """A finished run's folder: the model, the run's flags, a complete and an incomplete checkpoint."""
    folder = tmp_path / "out"
    shutil.copytree(tiny_model_dir, folder)
    run_config = {"exp_name": "tiny", "hf_entity": "org", "hf_repo_id": None, "hf_repo_revision": "b1"}
    (folder / "run_config.json").write_text(json.dumps({**run_config, "hf_repo_private": False}))
    for step, complete in ((2, True), (4, False)):
        (folder / f"step_{step}").mkdir()
        (folder / f"step_{step}" / "state.pt").write_bytes(bytes([step]) * 10)
        if complete:
            (folder / f"step_{step}" / COMPLETED).write_text("done\n")
    return folder


def _refusal(folder: Path, capsys) -> str:
    with pytest.raises(SystemExit) as caught:
        push_command(["--output_dir", str(folder)], FAST)
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda f: (f / "config.json").unlink(), "config.json"),
        (lambda f: (f / "model.safetensors").unlink(), "model.safetensors (missing)"),
        (lambda f: (f / "tokenizer.json").unlink(), "a tokenizer file (tokenizer.json or"),
        (lambda f: (f / "tokenizer_config.json").unlink(), "tokenizer_config.json"),
        (lambda f: _truncate(f / "model.safetensors"), "model.safetensors (truncated: "),
    ],
)
def test_an_incomplete_model_is_refused_before_any_hub_call(hub, out, capsys, damage, named):
    damage(out)
    line = _refusal(out, capsys)
    assert f"{out} holds no complete final model: " in line and named in line
    assert hub.requests == []


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def test_a_missing_folder_is_refused(hub, tmp_path, capsys):
    assert "is not a folder" in _refusal(tmp_path / "nowhere", capsys)


def test_defaults_come_from_the_run_and_checkpoints_go_to_their_branches(hub, out, capsys):
    push_command(["--output_dir", str(out), "--push_checkpoints"], FAST)
    repo = hub.repos["org/tiny"]  # --hf_entity and --exp_name of the run
    assert repo["private"] is False  # the run's --hf_repo_private false
    model = repo["branches"]["b1"]  # the run's --hf_repo_revision
    assert model["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert not [name for name in model if name.startswith("step_")]
    assert sorted(b for b in repo["branches"] if b.startswith("step_")) == ["step_2"]  # step_4 is incomplete
    assert repo["branches"]["step_2"]["state.pt"] == (out / "step_2" / "state.pt").read_bytes()
    assert "pushed 1 checkpoints to org/tiny (branches step_2)" in capsys.readouterr().out


def test_flags_override_the_run(hub, out):
    flags = ["--hf_repo_id", "other/name", "--hf_repo_revision", "b2", "--hf_repo_private", "true"]
    push_command(["--output_dir", str(out), *flags], FAST)
    assert sorted(hub.repos) == ["other/name"] and "config.json" in hub.repos["other/name"]["branches"]["b2"]
    assert hub.repos["other/name"]["private"] is True


def test_the_command_line_refuses_in_one_line(tmp_path):
    result = run_python(["-m", "open_instruct.report.push_to_hub", "--output_dir", str(tmp_path)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path} holds no complete final model: ")
