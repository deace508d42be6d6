"""Hub push against a loopback Hub, wandb in offline mode read back from its run file, and the plot command."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.conftest import read_metrics, run_cli, run_python, small_run_args
from tests.fake_hub import FakeHub

pytestmark = pytest.mark.slow

TOKEN = "hf_fakeTokenNeverToBeWrittenAnywhere42"


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-*.wandb`` file.

    Its layout is LevelDB's log format behind a 7-byte W&B header: 32 KiB blocks of chunks, each chunk
    ``crc32 (4) | length (2, little endian) | type (1: full, 2: first, 3: middle, 4: last) | data``.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a chunk header: the block is padded
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, synthetic_data, tmp_path_factory):
    """One short run with --with_tracking (wandb offline) and --push_to_hub to a loopback Hub."""
    tmp = tmp_path_factory.mktemp("tracked")
    out = tmp / "run"
    args = small_run_args(
        tiny_model_dir,
        synthetic_data[0],
        out,
        max_train_steps="3",
        exp_name="tiny-dpo",
        push_to_hub=True,
        hf_entity="test-org",
        hf_repo_revision="dpo-branch",
        with_tracking=True,
        wandb_project="proj",
        checkpointing_steps="2",
        num_sample_prompts="2",  # the sample answers' wandb table
        sample_max_new_tokens="6",
    )
    with FakeHub() as hub:
        hub_env = {
            "HF_HUB_OFFLINE": "0",  # cli_env's "1" would keep the push from reaching the fake Hub
            "HF_ENDPOINT": hub.endpoint,
            "HF_TOKEN": TOKEN,
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(tmp / "wandb_dir"),
            "WANDB_SILENT": "true",
        }
        result = run_cli(args, tmp / "cache", extra_env=hub_env)
    assert result.returncode == 0, result.stderr
    return out, hub, result, tmp / "wandb_dir"


def test_push_to_hub_uploads_the_final_model_privately(tracked_run):
    out, hub, result, _ = tracked_run
    repo = hub.repos["test-org/tiny-dpo"]
    assert repo["private"] is True
    assert f"pushed the final model to {hub.endpoint}/test-org/tiny-dpo/tree/dpo-branch" in result.stdout
    assert [c["revision"] for c in hub.commits] == ["dpo-branch"]
    arrived = repo["branches"]["dpo-branch"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "metrics.jsonl"):
        assert arrived[name] == (out / name).read_bytes(), f"{name} arrived damaged or missing"
    assert not [p for p in arrived if p.startswith("step_") or p.startswith(".")], sorted(arrived)
    assert (out / "step_2" / "COMPLETED").is_file()  # a checkpoint existed locally but was not pushed
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in hub.requests if r["method"] == "POST")


def test_token_is_never_logged_or_saved(tracked_run):
    out, _, result, wandb_dir = tracked_run
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    for folder in (out, wandb_dir):
        for path in folder.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), f"token found in {path}"


def test_wandb_offline_run_holds_config_and_every_metric(tracked_run):
    out, _, _, wandb_dir = tracked_run
    files = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = read_wandb_records(files[0])
    config = {}
    for r in records:
        if r.WhichOneof("record_type") in ("config", "run"):
            items = r.config.update if r.HasField("config") else r.run.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
    assert config["beta"] == 5.0 and config["exp_name"] == "tiny-dpo" and config["total_optimizer_steps"] == 3
    run = next(r.run for r in records if r.HasField("run"))
    assert run.display_name == "tiny-dpo" and run.project == "proj"
    history = {}
    for r in records:
        if r.HasField("history"):
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history[row["training_step"]] = row
    expected = read_metrics(out)
    assert sorted(history) == [row["training_step"] for row in expected] == [1, 2, 3]
    for row in expected:
        for key in ("train_loss", "rewards/accuracy", "rewards/margin", "learning_rate"):
            assert history[row["training_step"]][key] == pytest.approx(row[key], rel=1e-9), key


def test_wandb_offline_run_holds_the_sample_answers_table(tracked_run):
    """The samples table: every answer of the run (start, then final) as a wandb Table whose rows are samples.jsonl's."""
    out, _, _, wandb_dir = tracked_run
    (file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    tables = []
    for r in read_wandb_records(file):
        if r.HasField("history"):  # a table arrives as nested items: samples/_type, samples/path, ...
            fields = {
                i.nested_key[1]: json.loads(i.value_json) for i in r.history.item if i.nested_key[:1] == ["samples"]
            }
            tables += [fields] if fields else []
    assert tables and all(t["_type"] == "table-file" for t in tables), tables
    table = json.loads((file.parent / "files" / tables[-1]["path"]).read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == ["start", "start", "final", "final"] and tables[-1]["nrows"] == len(rows)
    assert table["columns"] == ["step", "prompt_index", "prompt", "answer", "tokens", "seconds"]
    assert [row[:4] for row in table["data"]] == [
        [str(r[k]) for k in ("step", "prompt_index", "prompt", "answer")] for r in rows
    ]


def test_plot_command_writes_a_png(tracked_run, tmp_path):
    out, *_ = tracked_run
    target = tmp_path / "curves.png"
    result = run_python(["-m", "open_instruct.report.plot", str(out), "--out", str(target)], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1500, 800)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"hf_entity": "org"}, "org/dpo"),
        ({"hf_entity": "org", "hf_repo_id": "name"}, "org/name"),
        ({"hf_entity": "org", "hf_repo_id": "other/name"}, "other/name"),
        ({}, "fake-user/dpo"),  # the token's user, looked up on the Hub
    ],
)
def test_repo_id_resolution(flags, expected, monkeypatch):
    from huggingface_hub import constants

    from open_instruct.config import TrainArguments
    from open_instruct.report.hub import resolve_repo_id
    from open_instruct.settings import HubSettings

    args = TrainArguments(push_to_hub=True, reference_logprobs_cache_path="unused", **flags)
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        assert resolve_repo_id(HubSettings.of(args)) == expected


def test_push_without_owner_or_token_fails_before_training(tiny_model_dir, synthetic_data, tmp_path):
    out = tmp_path / "run"
    env_args = small_run_args(tiny_model_dir, synthetic_data[0], out, push_to_hub=True)
    result = run_cli(env_args, tmp_path / "cache")  # HF_HUB_OFFLINE=1: the user lookup cannot succeed
    assert result.returncode == 2
    assert "--push_to_hub: cannot look up the Hub user" in result.stderr
    assert not (out / "metrics.jsonl").exists()
