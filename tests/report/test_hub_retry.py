"""The one Hub retry policy, against a loopback Hub that fails on purpose: connection refused, a dropped connection,
5xx, 429 with Retry-After, timeouts; retried with the stated waits (a recording sleep), then one line that keeps the
local model and says how to push it later; a 401/403/404 fails at once. The same policy drives checkpoint pushes."""

from __future__ import annotations

import hashlib
import shlex
import shutil
import time
from pathlib import Path

import pytest

from open_instruct.errors import UserError
from open_instruct.report import hub_retry
from open_instruct.report.hub import push_final_model
from open_instruct.report.hub_retry import RetryPolicy
from open_instruct.report.push_to_hub import main as push_command
from open_instruct.settings import HubSettings
from open_instruct.training.checkpointing import COMPLETED
from open_instruct.training.hub_checkpoints import CheckpointPusher
from tests.conftest import free_port
from tests.fake_hub import FakeHub

REPO = "org/run"
HUB = HubSettings(
    push_to_hub=True,
    push_checkpoints_to_hub=False,
    exp_name="run",
    hf_entity="org",
    hf_repo_id=None,
    hf_repo_revision=None,
    hf_repo_private=True,
)


class Sleeps(list):
    """A sleep that records the waits instead of waiting; ``then`` runs after the ``at``-th wait (a Hub coming up)."""

    def __init__(self, at: int = 0, then=None) -> None:
        super().__init__()
        self.at, self.then = at, then

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        if self.then is not None and len(self) == self.at:
            self.then()


def point_at(monkeypatch, endpoint: str) -> None:
    """Make huggingface_hub talk to ``endpoint`` with a token (HF_ENDPOINT is read when it loads: patch the constant)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as fake:
        point_at(monkeypatch, fake.endpoint)
        yield fake


@pytest.fixture
def model(tiny_model_dir, tmp_path) -> Path:
    """A finished run's output folder: the tiny model, a metrics log and one step checkpoint."""
    out = tmp_path / "out"
    shutil.copytree(tiny_model_dir, out)
    (out / "metrics.jsonl").write_text('{"training_step": 1}\n')
    (out / "step_2").mkdir()
    (out / "step_2" / "state.pt").write_bytes(b"state")
    (out / "step_2" / COMPLETED).write_text("step 2\n")
    return out


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def posts(hub: FakeHub, suffix: str) -> int:
    """How many POSTs reached a path ending in ``suffix``."""
    return sum(r["method"] == "POST" and r["path"].endswith(suffix) for r in hub.requests)


def test_the_policy_waits_2_4_8_16_and_honours_retry_after():
    class Limited(Exception):
        response = type("R", (), {"status_code": 429, "headers": {"retry-after": "7"}})()

    policy = RetryPolicy()
    assert (policy.tries, [policy.delay(n, OSError()) for n in (1, 2, 3, 4)]) == (5, [2.0, 4.0, 8.0, 16.0])
    assert policy.delay(1, Limited()) == 7.0
    Limited.response.headers = {"retry-after": "86400"}
    assert policy.delay(1, Limited()) == hub_retry.MAX_DELAY


@pytest.mark.parametrize(
    ("where", "faults", "waits"),
    [
        ("create", [500, 503, 502], [2.0, 4.0, 8.0]),
        ("create", [(429, 7), (429, 1)], [7.0, 1.0]),  # Retry-After, not the backoff
        ("create", [429], [2.0]),  # a rate limit without Retry-After: the backoff
        ("create", ["disconnect", "disconnect"], [2.0, 4.0]),  # httpx RemoteProtocolError
        ("commit", [507, 507], [2.0, 4.0]),  # a 5xx huggingface_hub does not retry inside its commit call
        ("create", [504, "disconnect", 500, 500], [2.0, 4.0, 8.0, 16.0]),  # the fifth and last try succeeds
    ],
)
def test_transient_faults_are_retried_then_the_push_lands(hub, model, where, faults, waits, capsys):
    hub.fail(where, *faults)
    sleeps = Sleeps()
    push_final_model(model, HUB, REPO, RetryPolicy(sleep=sleeps))
    assert sleeps == waits
    assert posts(hub, "/api/repos/create") == 1 + len(faults)  # each try is the whole push
    assert posts(hub, "/commit/main") == 1 + len(faults) * (where == "commit")
    arrived = hub.repos[REPO]["branches"]["main"]
    assert arrived["model.safetensors"] == (model / "model.safetensors").read_bytes()
    assert "pushed the final model to" in capsys.readouterr().out


def test_huggingface_hubs_own_commit_retry_stays_inside_one_try(hub, model):
    hub.fail("commit", 500)  # huggingface_hub retries its commit POST on a 500 after 1 s, before we see it
    sleeps = Sleeps()
    push_final_model(model, HUB, REPO, RetryPolicy(sleep=sleeps))
    assert sleeps == [] and posts(hub, "/commit/main") == 2 and posts(hub, "/api/repos/create") == 1


def test_connection_refused_until_the_hub_comes_up(model, monkeypatch):
    fake = FakeHub(port=free_port(), started=False)  # nothing listens: a real ECONNREFUSED
    point_at(monkeypatch, fake.endpoint)
    sleeps = Sleeps(at=2, then=fake.start)  # up during the second wait
    with fake:
        push_final_model(model, HUB, REPO, RetryPolicy(sleep=sleeps))
    assert sleeps == [2.0, 4.0]
    assert fake.repos[REPO]["branches"]["main"]["config.json"] == (model / "config.json").read_bytes()


def test_a_timeout_is_retried(hub, model, monkeypatch):
    import httpx2
    from huggingface_hub import HfApi

    real, calls = HfApi.create_repo, []

    def slow_then_fine(self, *args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise httpx2.ReadTimeout("timed out")  # what a stalled Hub raises through huggingface_hub
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_repo", slow_then_fine)
    sleeps = Sleeps()
    push_final_model(model, HUB, REPO, RetryPolicy(sleep=sleeps))
    assert sleeps == [2.0, 4.0] and len(calls) == 3
    assert "model.safetensors" in hub.repos[REPO]["branches"]["main"]


def test_giving_up_is_one_line_the_local_model_kept_and_the_hint_pushes_it(hub, model, capsys):
    before = fingerprint(model)
    hub.fail("create", *[500] * 5)
    sleeps = Sleeps()
    with pytest.raises(UserError) as caught:
        push_final_model(model, HUB, REPO, RetryPolicy(sleep=sleeps))
    line = str(caught.value)
    assert "\n" not in line and sleeps == [2.0, 4.0, 8.0, 16.0] and posts(hub, "/api/repos/create") == 5
    assert line.startswith(f"push to the Hub ({REPO}) failed after 5 tries: HfHubHTTPError: ") and "500" in line
    assert f"the local model is kept at {model};" in line
    assert fingerprint(model) == before  # nothing removed or changed
    assert hub.commits == []  # nothing committed
    hint = line.split("push it later with: ")[1]
    argv = shlex.split(hint)
    assert argv[:3] == ["python", "-m", "open_instruct.report.push_to_hub"]
    push_command(argv[3:], RetryPolicy(sleep=Sleeps()))
    arrived = hub.repos[REPO]["branches"]["main"]
    expected = {k: (model / k).read_bytes() for k in before if not k.startswith("step_")}
    assert arrived == expected
    assert fingerprint(model) == before


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_fault_retrying_cannot_fix_fails_at_once(hub, model, status):
    hub.fail("create", status)
    sleeps = Sleeps()
    with pytest.raises(UserError, match=rf"failed at once: HfHubHTTPError: .*{status}.*kept at") as caught:
        push_final_model(model, HUB, REPO, RetryPolicy(sleep=sleeps))
    assert "\n" not in str(caught.value)
    assert sleeps == [] and posts(hub, "/api/repos/create") == 1


def test_checkpoint_pushes_share_the_policy(hub, tmp_path, capsys):
    step = tmp_path / "step_2"
    step.mkdir()
    (step / "state.pt").write_bytes(b"state")
    (step / COMPLETED).write_text("step 2\n")
    hub.fail("create", 503, (429, 5))
    sleeps = Sleeps()
    pusher = CheckpointPusher(tmp_path, REPO, keep_last_n=-1, policy=RetryPolicy(sleep=sleeps))
    pusher.submit(step)
    time.sleep(0.2)
    hub.fail("create", 403)  # step_4: refused, not retried
    pusher.submit(step.rename(tmp_path / "step_4"))
    summary = pusher.close()
    assert sleeps == [2.0, 5.0]
    assert pusher.pushed == ["step_2"] and pusher.failed == ["step_4"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step_4" in warnings[0] and "at once: HfHubHTTPError: 403" in warnings[0]
    hint = (
        f"push the ones still on disk later with: python -m open_instruct.report.push_to_hub --output_dir {tmp_path}"
    )
    assert f"{hint} --hf_repo_id {REPO} --push_checkpoints;" in summary
