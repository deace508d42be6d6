"""Sample answers during a run (open_instruct/training/samples.py): the occasions and their steps, the start answer
against transformers' own greedy generate of the untouched model, the trackers, sampling off, training unchanged by
sampling, and a sharded two-process run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from open_instruct.report.samples import SAMPLES_FILE, read_rows
from open_instruct.training.samples import SamplePrompt, _before, greedy_answers
from tests.conftest import launch, read_metrics, run_cli, small_run_args, torchrun_command

PROMPTS = ["please repeat these words : cat dog", "count up from 3 9"]


def _prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def _flags(model, data, out, **extra):
    """32 pairs, 8 per step: 4 steps, an evaluation every 2 (steps 2 and 4)."""
    values = {"mixer_list": [str(data[0]), "32"], "eval_mixer_list": [str(data[1]), "8"], "eval_steps": "2"}
    values["num_sample_prompts"] = None  # the default: sampling on
    return small_run_args(model, data[0], out, **{**values, **extra})


@pytest.fixture(scope="module")
def sampled_run(dropout_model_dir, synthetic_data, tmp_path_factory):
    """A run with dropout (so a sampler that left eval mode or moved the random generator would change the losses)
    and a prompt file, reporting to tensorboard."""
    tmp = tmp_path_factory.mktemp("sampled")
    extra = {"sample_prompts": str(_prompt_file(tmp)), "sample_max_new_tokens": "12"}
    extra |= {"with_tracking": None, "report_to": "tensorboard"}
    flags = _flags(dropout_model_dir, synthetic_data, tmp / "out", **extra) + ["--with_tracking"]
    result = run_cli(flags, tmp / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, result


@pytest.mark.slow  # CLI runs of the recipe (about 30 s)
def test_rows_at_start_each_evaluation_and_the_end(sampled_run):
    tmp, result = sampled_run
    rows = read_rows(tmp / "out")
    assert [(r["step"], r["prompt_index"]) for r in rows] == [
        (step, i) for step in ("start", 2, 4, "final") for i in range(len(PROMPTS))
    ]
    assert [r["prompt"] for r in rows[:2]] == PROMPTS
    for row in rows:
        assert 0 < row["tokens"] <= 12 and row["seconds"] > 0
    # the run summary (console and summary.json) shows each prompt's first and final answer side by side
    ((title, text),) = json.loads((tmp / "out" / "summary.json").read_text())["sections"].items()
    assert title.startswith("sample answers, greedy") and f"{title}:" in result.stdout
    first = {r["prompt_index"]: r["answer"] for r in rows if r["step"] == "start"}
    assert text.count("  before:") == len(PROMPTS) and all(
        a.strip().splitlines()[0] in text for a in first.values() if a.strip()
    )


@pytest.mark.slow  # CLI runs of the recipe (about 30 s)
def test_the_start_answer_is_the_untouched_models_greedy_answer(sampled_run, dropout_model_dir):
    """Independent: transformers' chat template and greedy generate on the model as saved, nothing of ours."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dropout_model_dir)
    model = AutoModelForCausalLM.from_pretrained(dropout_model_dir, dtype=torch.float32).eval()
    rows = [r for r in read_rows(sampled_run[0] / "out") if r["step"] == "start"]
    for prompt, row in zip(PROMPTS, rows):
        chat = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        ids = ids["input_ids"]
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert row["answer"] == expected
    final = [r for r in read_rows(sampled_run[0] / "out") if r["step"] == "final"]
    assert [r["answer"] for r in final] != [r["answer"] for r in rows]  # lr 1e-3 moves the tiny model's answers


@pytest.mark.slow  # CLI runs of the recipe (about 30 s)
def test_tensorboard_gets_each_occasions_table(sampled_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((sampled_run[0] / "out").rglob("events.out.tfevents.*"))
    assert events
    texts = {}
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            if tag.startswith("samples"):
                for event in acc.Tensors(tag):
                    texts[event.step] = event.tensor_proto.string_val[0].decode()
    assert sorted(texts) == [0, 2, 4]  # the start at 0; the final answers log at the last step, 4, after its eval's
    assert texts[0].splitlines()[2].startswith(f"| start | 0 | {PROMPTS[0]} | ")
    assert texts[4].splitlines()[-1].startswith(f"| final | 1 | {PROMPTS[1]} | ")


@pytest.mark.slow  # CLI runs of the recipe (about 30 s)
def test_no_samples_and_the_same_losses_with_sampling_off(sampled_run, dropout_model_dir, synthetic_data, tmp_path):
    """--num_sample_prompts 0 writes nothing; and sampling changes no loss, bit for bit, though dropout draws
    random numbers in every step."""
    flags = _flags(dropout_model_dir, synthetic_data, tmp_path / "off", num_sample_prompts="0")
    result = run_cli(flags, tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "off" / SAMPLES_FILE).exists() and "sample answers" not in result.stdout
    on = [r for r in read_metrics(sampled_run[0] / "out") if "train_loss" in r or "eval/loss" in r]
    off = [r for r in read_metrics(tmp_path / "off") if "train_loss" in r or "eval/loss" in r]
    assert len(on) == len(off) == 6
    for a, b in zip(on, off):
        assert (a.get("train_loss"), a.get("eval/loss")) == (b.get("train_loss"), b.get("eval/loss"))


class _DrawingModel(torch.nn.Module):
    """A stand-in whose generate draws from the global generator (as a sampling decoder would)."""

    def generate(self, input_ids, max_new_tokens, **kwargs):
        assert not self.training
        extra = (torch.rand(max_new_tokens) * 5).long() + 1
        return torch.cat([input_ids, extra[None]], dim=1)


def test_greedy_answers_restore_the_generator_and_the_mode():
    model = _DrawingModel().train()
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, device=torch.device("cpu"), num_processes=1)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2, decode=lambda ids, **_: " ".join(map(str, ids)))
    torch.manual_seed(3)
    before = torch.get_rng_state()
    answers = greedy_answers(accelerator, model, tokenizer, [SamplePrompt("p", [7, 8])], 6)
    assert torch.equal(torch.get_rng_state(), before) and model.training
    assert answers[0][1] == 6 or answers[0][0].endswith("2")  # cut after the EOS (id 2) when one is drawn


def test_a_resume_keeps_the_first_attempts_rows_up_to_its_step():
    assert _before("start", 4, eval_pending=False)
    assert _before(2, 4, False) and _before(4, 4, False) and not _before(6, 4, False)
    assert not _before(4, 4, eval_pending=True)  # its evaluation (and sampling) runs again
    assert not _before("final", 4, False)


@pytest.mark.slow
def test_fsdp2_two_processes_sample_like_one(sampled_run, dropout_model_dir, synthetic_data, tmp_path):
    """Every rank generates (FSDP2 gathers the shards in each forward), rank 0 writes: no hang, one set of rows,
    and the starting model's answers as the single-process run gave them."""
    out = tmp_path / "out"
    flags = _flags(dropout_model_dir, synthetic_data, out, sample_prompts=str(_prompt_file(tmp_path)))
    flags += ["--sample_max_new_tokens", "12", "--per_device_train_batch_size", "4", "--fsdp"]
    launch(torchrun_command(flags), tmp_path / "cache", timeout=300)
    rows = read_rows(out)
    assert [(r["step"], r["prompt_index"]) for r in rows] == [
        (step, i) for step in ("start", 2, 4, "final") for i in range(len(PROMPTS))
    ]
    single = [r["answer"] for r in read_rows(sampled_run[0] / "out") if r["step"] == "start"]
    assert [r["answer"] for r in rows if r["step"] == "start"] == single
