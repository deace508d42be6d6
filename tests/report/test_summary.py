"""The run summary's pure parts, on a fabricated run: figures against hand computations, the JSON file against the
folder it describes, the console block, the commands it offers and the phase clock."""

from __future__ import annotations

import json
import shlex
import sys
import time

import pytest

from open_instruct.report import run_commands, summary
from open_instruct.report.phases import PhaseClock

# Two training intervals: 100 tokens at 50 tokens/s (2 s) then 300 at 100 tokens/s (3 s); evaluations at steps 2, 4, 6.
ROWS = [
    {"training_step": 2, "train_loss": 0.70, "token_count": 100, "perf/tokens_per_second_step": 50.0},
    {"training_step": 2, "eval/loss": 0.69, "eval/rewards/accuracy": 0.50},
    {"training_step": 4, "train_loss": 0.60, "token_count": 400, "perf/tokens_per_second_step": 100.0},
    {"training_step": 4, "eval/loss": 0.64, "eval/rewards/accuracy": 0.75},
    {"training_step": 6, "eval/loss": 0.66, "eval/rewards/accuracy": 0.625},
]


def test_throughput_weights_each_interval_by_its_time():
    perf = summary.throughput(ROWS)
    assert perf["tokens_per_second"] == pytest.approx(400 / 5)  # not the mean of the rates (75)
    assert perf["mfu"] is None and "no peak FLOP/s" in perf["mfu_note"]
    with_mfu = [dict(r, **{"perf/mfu_step": m}) for r, m in zip([ROWS[0], ROWS[2]], (0.1, 0.2))]
    assert summary.throughput(with_mfu)["mfu"] == pytest.approx((0.1 * 2 + 0.2 * 3) / 5)
    assert summary.throughput([])["tokens_per_second"] is None


def test_final_and_best_figures_with_their_steps():
    figures = summary.metrics_summary(ROWS)
    assert figures["train_loss"] == {"final": 0.60, "step": 4}
    assert figures["eval"]["accuracy"] == {"final": 0.625, "final_step": 6, "best": 0.75, "best_step": 4}
    assert figures["eval"]["loss"] == {"final": 0.66, "final_step": 6, "best": 0.64, "best_step": 4}
    assert summary.metrics_summary([ROWS[0], ROWS[2]])["eval"] is None  # no evaluation split


def _fabricated_run(tmp_path):
    out = tmp_path / "out"
    (out / "step_4").mkdir(parents=True)
    (out / "step_4" / "model.safetensors").write_bytes(b"x" * 3000)
    (out / "step_4" / "COMPLETED").write_text("")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + '{"cut short')
    (out / "run_config.json").write_text(json.dumps({"total_optimizer_steps": 8}))
    return out


def test_summary_json_lists_the_folder_and_itself_with_true_sizes(tmp_path):
    out = _fabricated_run(tmp_path)
    ending = {"status": "preempted", "step": 4, "detail": "stopped at optimizer step 4"}
    context = {"stage": "dpo", "cwd": str(tmp_path), "commands": {"resume": "python -m x", "push": None}}
    built = summary.build_summary(out, ending, ({"data": 1.0, "training": 2.5}, 4.0), context)
    written = summary.write_summary(out, built, [("sample answers", "prompt: 2+2\nanswer: 4")])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(written))
    assert sorted(p.name for p in out.iterdir()) == [e["path"] for e in on_disk["files"]]  # nothing left beside
    sizes = {e["path"]: e["bytes"] for e in on_disk["files"]}
    assert sizes["summary.json"] == (out / "summary.json").stat().st_size
    assert sizes["step_4"] == 3000 and sizes["metrics.jsonl"] == (out / "metrics.jsonl").stat().st_size
    assert on_disk["steps"] == {"done": 4, "total": 8}
    assert on_disk["wall_seconds"] == {"data": 1.0, "training": 2.5, "other": 0.5, "total": 4.0}
    assert on_disk["sections"] == {"sample answers": "prompt: 2+2\nanswer: 4"}


def test_console_block_says_how_it_ended_and_shows_the_extra_sections(tmp_path):
    out = _fabricated_run(tmp_path)
    ending = {"status": "preempted", "step": 4, "detail": ""}
    context = {"stage": "dpo", "cwd": "/w", "commands": {"resume": "python -m x --a 1", "push": None}}
    built = summary.write_summary(out, summary.build_summary(out, ending, ({}, 1.0), context))
    text = summary.format_summary(built, [("sample answers", "one\ntwo")])
    assert "preempted at step 4: 4 of 8 steps done and saved; rerun the same command to resume" in text
    assert "held-out accuracy: final 62.50% (step 6), best 75.00% (step 4)" in text
    assert "final train loss: 0.6000 (step 4)" in text and "80 tokens/s; MFU n/a: no peak FLOP/s" in text
    assert "  resume: python -m x --a 1" in text and "push:" not in text  # no final model: nothing to push
    assert "step_4/" in text and "2.9 KB (2 files)" in text
    assert text.endswith("sample answers:\n  one\n  two")


def test_human_units():
    assert [summary.human_bytes(n) for n in (5, 2048, 3 * 1024**2, 5 * 1024**4)] == [
        "5 B",
        "2.0 KB",
        "3.0 MB",
        "5120.0 GB",
    ]
    assert [summary.human_seconds(s) for s in (0.25, 125, 3 * 3600 + 420)] == ["0.2s", "2m 05s", "3h 07m"]


def test_launch_command_prefers_a_launcher_then_the_interpreter_line():
    torchrun = ["/v/bin/python", "/v/bin/torchrun", "--nproc_per_node", "8", "open_instruct/dpo_tune_cache.py", "--x"]
    typed = ["python", "-m", "open_instruct.dpo_tune_cache", "--x", "a b"]
    module = "open_instruct.dpo_tune_cache"
    assert run_commands.launch_command(module, None, typed, torchrun) == torchrun
    assert run_commands.launch_command(module, None, typed, ["-bash"]) == typed
    assert run_commands.launch_command(module, ["--y", "1"], typed, torchrun) == [
        sys.executable,
        "-m",
        module,
        "--y",
        "1",
    ]
    assert shlex.split(shlex.join(typed)) == typed  # the quoting survives a paste


def test_without_flag_drops_it_or_turns_it_off():
    assert run_commands.without_flag(["p", "--cache_dataset_only", "--a", "1"], "--cache_dataset_only") == [
        "p",
        "--a",
        "1",
    ]
    assert run_commands.without_flag(["p", "--cache_dataset_only", "true"], "--cache_dataset_only") == ["p"]
    assert run_commands.without_flag(["p", "r.yaml"], "--cache_dataset_only") == [
        "p",
        "r.yaml",
        "--cache_dataset_only",
        "false",
    ]


def test_next_commands_push_only_a_finished_model(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--cache_logprobs_only"]
    early = run_commands.next_commands("open_instruct.dpo_tune_cache", argv, tmp_path, "--cache_logprobs_only")
    assert "--cache_logprobs_only" not in early["train"] and early["push"] is None
    assert early["plan"].endswith("--dry_run --dry_run_gpu H100-80GB --dry_run_num_processes 8")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "step_2").mkdir()
    done = run_commands.next_commands("open_instruct.finetune", argv[:2], tmp_path, None, plannable=False)
    push = shlex.split(done["push"])
    assert push[0] == run_commands.interpreter() and push[1:3] == ["-m", "open_instruct.report.push_to_hub"]
    assert push[3:] == ["--output_dir", str(tmp_path)]  # the final model; checkpoints only when asked
    assert done["plan"] is None and shlex.split(done["resume"])[1:3] == ["-m", "open_instruct.finetune"]
    # an API run whose arguments have no command line: no resume or plan command, never a wrong one; the push stays
    unknown = run_commands.next_commands("open_instruct.dpo_tune_cache", None, tmp_path, None, known=False)
    assert unknown == {"resume": None, "push": done["push"], "plan": None}


def test_phase_clock_adds_up_and_counts_a_phase_an_error_cut():
    clock = PhaseClock()
    with clock.phase("data"):
        time.sleep(0.02)
    with pytest.raises(RuntimeError), clock.phase("training"):
        time.sleep(0.03)
        raise RuntimeError("preempted")
    with clock.phase("data"):
        time.sleep(0.01)
    assert list(clock.seconds) == ["data", "training"]
    assert clock.seconds["data"] >= 0.03 and clock.seconds["training"] >= 0.03
    assert clock.total() >= sum(clock.seconds.values())
