"""Evaluation during training: the schedule, the numbers against an independent computation, the cached reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from open_instruct.config import TrainArguments, validate
from open_instruct.errors import UserError
from open_instruct.training.evaluation import hold_out
from tests.conftest import read_metrics, run_cli, small_run_args


@pytest.fixture(scope="module")
def eval_run(tiny_model_dir, synthetic_data, tmp_path_factory):
    """One CLI run: 8 steps, evaluation on the 64 held-out pairs every 3 steps; then the same run again (cache hits)."""
    train, test = synthetic_data
    tmp = tmp_path_factory.mktemp("eval_run")
    args = small_run_args(tiny_model_dir, train, tmp / "out", eval_mixer_list=[str(test), "1.0"], eval_steps="3")
    first = run_cli(args, tmp / "cache")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli(
        small_run_args(tiny_model_dir, train, tmp / "out2", eval_mixer_list=[str(test), "1.0"], eval_steps="3"),
        tmp / "cache",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    return tmp, first, again


@pytest.mark.slow
def test_eval_metrics_at_every_eval_step_and_the_end(eval_run):
    tmp, first, _ = eval_run
    rows = read_metrics(tmp / "out")
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["training_step"] for r in evals] == [3, 6, 8]
    for r in evals:
        assert 0.0 <= r["eval/rewards/accuracy"] <= 1.0
        assert math.isclose(
            r["eval/rewards/margin"], r["eval/rewards/chosen"] - r["eval/rewards/rejected"], rel_tol=1e-4, abs_tol=1e-6
        )
    assert "eval step=3 loss=" in first.stdout
    # Training rows are unaffected in number: one per step.
    assert [r["training_step"] for r in rows if "train_loss" in r] == list(range(1, 9))


def _eval_records(model_dir, test_file):
    from open_instruct.data.prepare import prepare_preference_data
    from open_instruct.model.modeling import load_tokenizer
    from open_instruct.settings import DataSettings, ModelSettings

    args = TrainArguments(
        model_name_or_path=str(model_dir),
        mixer_list=[str(test_file), "1.0"],
        max_seq_length=64,
        seed=1,
        reference_logprobs_cache_path="unused",
    )
    return prepare_preference_data(DataSettings.of(args), load_tokenizer(ModelSettings.of(args))).records


def _mean_logps(model, records):
    """Per-token mean log-prob of each reply from the model's own full logits (independent of our log-prob code)."""
    chosen, rejected = [], []
    with torch.no_grad():
        for r in records:
            for side, out in (("chosen", chosen), ("rejected", rejected)):
                ids = torch.tensor([r[f"{side}_input_ids"]])
                labels = torch.tensor(r[f"{side}_labels"][1:])
                logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                mask = labels != -100
                out.append(logp[mask].gather(-1, labels[mask].unsqueeze(-1)).mean().item())
    return torch.tensor(chosen), torch.tensor(rejected)


@pytest.mark.slow
def test_final_eval_matches_an_independent_computation(eval_run, tiny_model_dir, synthetic_data):
    from transformers import AutoModelForCausalLM

    tmp, _, _ = eval_run
    records = _eval_records(tiny_model_dir, synthetic_data[1])
    ref_c, ref_r = _mean_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir), records)
    pol_c, pol_r = _mean_logps(AutoModelForCausalLM.from_pretrained(tmp / "out"), records)
    beta = 5.0  # small_run_args: dpo_norm, beta 5
    h = beta * ((pol_c - ref_c) - (pol_r - ref_r))
    final = [r for r in read_metrics(tmp / "out") if "eval/loss" in r][-1]
    assert final["eval/loss"] == pytest.approx(-F.logsigmoid(h).mean().item(), rel=1e-3)
    assert final["eval/rewards/margin"] == pytest.approx(h.mean().item(), rel=1e-3, abs=1e-5)
    assert final["eval/rewards/accuracy"] == pytest.approx((h > 0).float().mean().item())


@pytest.mark.slow
def test_eval_reference_is_cached_like_the_training_one(eval_run):
    tmp, first, again = eval_run
    assert first.stdout.count("reference log-probs: computing") == 2
    assert again.stdout.count("reference log-probs: loaded from cache") == 2
    assert len(list((tmp / "cache").glob("*.pt"))) == 2
    evals = [[r for r in read_metrics(tmp / d) if "eval/loss" in r] for d in ("out", "out2")]
    assert evals[0] == evals[1]


def test_hold_out_is_seeded_disjoint_and_renumbered():
    records = [{"index": i, "chosen_input_ids": [i]} for i in range(100)]
    train, held = hold_out(records, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert [r["index"] for r in train] == list(range(90)) and [r["index"] for r in held] == list(range(10))
    assert not {r["chosen_input_ids"][0] for r in train} & {r["chosen_input_ids"][0] for r in held}
    assert hold_out(records, 0.1, seed=3) == (train, held)
    assert hold_out(records, 0.1, seed=4)[1] != held
    with pytest.raises(UserError, match="leaves no training pairs"):
        hold_out(records[:1], 0.5, seed=0)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"eval_steps": 5}, "--eval_steps needs an evaluation set"),
        ({"eval_mixer_list": ["a.jsonl", "1.0"], "eval_fraction": 0.1}, "pass one of them"),
        ({"eval_fraction": 1.0}, "--eval_fraction must be in"),
    ],
)
def test_bad_eval_settings_are_clear_errors(values, message):
    args = TrainArguments(
        model_name_or_path="m", mixer_list=["d.jsonl", "1.0"], reference_logprobs_cache_path="x", **values
    )
    with pytest.raises(UserError, match=message):
        validate(args)


@pytest.mark.slow
def test_eval_fraction_through_the_cli(tiny_model_dir, synthetic_data, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        small_run_args(tiny_model_dir, synthetic_data[0], out, eval_fraction="0.25", max_train_steps="2"),
        tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # A quarter of the 256 valid rows is held out before the 64 training pairs are drawn from the rest.
    assert "evaluation: 64 pairs, 64 for training" in result.stdout
    assert [r["training_step"] for r in read_metrics(out) if "eval/loss" in r] == [2]
