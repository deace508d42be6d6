"""Checkpoint pushes and the resume download against a loopback Hub, in process: marker last, snapshot isolation,
retries then a warning, pruning, a training step never waiting on an upload, an unreachable Hub refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from open_instruct.errors import UserError
from open_instruct.settings import CheckpointSettings, HubSettings
from open_instruct.training import hub_checkpoints
from open_instruct.training.checkpointing import COMPLETED
from open_instruct.training.hub_checkpoints import CheckpointPusher, fetch_for_resume
from tests.conftest import free_port
from tests.fake_hub import FakeHub

REPO = "org/run"
HUB = HubSettings(
    push_to_hub=True,
    push_checkpoints_to_hub=True,
    exp_name="run",
    hf_entity="org",
    hf_repo_id=None,
    hf_repo_revision=None,
    hf_repo_private=True,
)


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    with FakeHub() as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)  # HF_ENDPOINT, as read when the module loaded
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_TOKEN", "hf_fake")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield fake


def _checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"step_{step}"
    (path / "sub").mkdir(parents=True)
    (path / "model.safetensors").write_bytes(bytes([step]) * 100)
    (path / "sub" / "rng_state_0.pt").write_bytes(f"rng {step}".encode())
    if complete:
        (path / COMPLETED).write_text(f"step {step}\n")
    return path


def _settings(out: Path, keep: int = 3) -> CheckpointSettings:
    return CheckpointSettings(str(out), "2", keep, None, 0, "", 1)


def _branches(hub: FakeHub) -> list[str]:
    return sorted(b for b in hub.repos[REPO]["branches"] if b.startswith("step_"))


def test_files_then_marker_in_a_second_commit_from_a_snapshot(hub, tmp_path):
    hub.commit_delay = 0.3  # the upload runs after the local folder is gone
    pusher = CheckpointPusher(tmp_path, REPO, keep_last_n=3, backoff=0.001)
    path = _checkpoint(tmp_path, 2)
    expected = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    pusher.submit(path)
    for file in path.rglob("*"):  # what pruning or the next save does to the original
        if file.is_file():
            file.unlink()
    pusher.close()
    commits = [c for c in hub.commits if c["revision"] == "step_2"]
    assert [sorted(c["files"]) for c in commits] == [sorted(set(expected) - {COMPLETED}), [COMPLETED]]
    assert hub.repos[REPO]["branches"]["step_2"] == expected
    assert not (tmp_path / hub_checkpoints.UPLOADS).exists()


def test_failures_are_retried_then_one_warning_and_the_run_goes_on(hub, tmp_path, capsys):
    pusher = CheckpointPusher(tmp_path, REPO, keep_last_n=-1, backoff=0.001)
    hub.fail_commits = 3  # step_2: three failed tries, the fourth succeeds
    pusher.submit(_checkpoint(tmp_path, 2))
    time.sleep(0.5)
    hub.fail_commits = 1000  # step_4: every try fails
    pusher.submit(_checkpoint(tmp_path, 4))
    summary = pusher.close()
    err = capsys.readouterr().err
    assert pusher.pushed == ["step_2"] and pusher.failed == ["step_4"]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step_4" in warnings[0] and "after 5 tries" in warnings[0]
    commit_posts = [r for r in hub.requests if r["method"] == "POST" and r["path"].endswith("/commit/step_4")]
    assert len(commit_posts) == 5  # the files commit, tried five times; the marker never sent
    assert COMPLETED not in hub.repos[REPO]["branches"]["step_4"]
    assert "1 pushed" in summary and "1 failed (step_4)" in summary


def test_branches_are_pruned_like_local_checkpoints(hub, tmp_path):
    from huggingface_hub import HfApi

    HfApi().create_repo(REPO, exist_ok=True)
    HfApi().create_branch(REPO, branch="step_1")  # a push cut short: no marker, older than the newest complete
    pusher = CheckpointPusher(tmp_path, REPO, keep_last_n=2, backoff=0.001)
    for step in (2, 4, 6):
        pusher.submit(_checkpoint(tmp_path, step))
    pusher.close()
    assert _branches(hub) == ["step_4", "step_6"]
    keep_all = CheckpointPusher(tmp_path / "all", "org/all", keep_last_n=-1, backoff=0.001)
    for step in (2, 4, 6):
        keep_all.submit(_checkpoint(tmp_path / "all", step))
    keep_all.close()
    assert sorted(b for b in hub.repos["org/all"]["branches"] if b != "main") == ["step_2", "step_4", "step_6"]


def test_a_training_step_never_waits_on_an_upload(hub, tmp_path):
    hub.commit_delay = 0.5  # a slow link: each push takes over a second
    pusher = CheckpointPusher(tmp_path, REPO, keep_last_n=-1, backoff=0.001)
    start = time.perf_counter()
    for step in (2, 4, 6):
        pusher.submit(_checkpoint(tmp_path, step))
    submitted = time.perf_counter() - start
    pusher.close()
    assert submitted < 0.2 < time.perf_counter() - start
    assert pusher.longest_wait < 0.05, pusher.longest_wait
    assert pusher.pushed == ["step_2", "step_4", "step_6"]


def test_resume_downloads_the_newest_complete_branch(hub, tmp_path):
    pusher = CheckpointPusher(tmp_path / "pushed", REPO, keep_last_n=-1, backoff=0.001)
    for step in (2, 4):
        pusher.submit(_checkpoint(tmp_path / "pushed", step))
    pusher.close()
    from huggingface_hub import HfApi

    HfApi().create_branch(REPO, branch="step_6")  # newer, but its push never finished
    out = tmp_path / "empty"
    path = fetch_for_resume(HUB, _settings(out), None, log=lambda _: None)
    assert path == out / "step_4"
    source = tmp_path / "pushed" / "step_4"
    for file in source.rglob("*"):
        if file.is_file():
            assert (path / file.relative_to(source)).read_bytes() == file.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["step_4"]  # no download leftovers
    assert fetch_for_resume(HUB, _settings(out), None) is None  # a local checkpoint wins: nothing fetched


def test_no_repo_on_the_hub_is_a_fresh_start(hub, tmp_path):
    assert fetch_for_resume(HUB, _settings(tmp_path), None, log=lambda _: None) is None


def test_an_unreachable_hub_at_resume_is_an_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setattr(constants, "ENDPOINT", nowhere)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", nowhere + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    with pytest.raises(UserError, match=r"no local checkpoint in .* and the Hub \(org/run\) cannot be reached"):
        fetch_for_resume(HUB, _settings(tmp_path), None)


def test_the_plan_names_the_checkpoint_pushes(monkeypatch):
    from open_instruct.plan.check import check_hub_and_tracking

    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    notes: list[str] = []
    check_hub_and_tracking(True, False, notes, push_checkpoints=True)
    assert notes[-1].startswith("Hub checkpoints: each step_N to branch step_N")
    check_hub_and_tracking(True, False, notes := [], push_checkpoints=False)
    assert not any(n.startswith("Hub checkpoints") for n in notes)
