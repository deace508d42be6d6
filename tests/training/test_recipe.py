"""The recipe end to end on the tiny model: loss falls, metrics are complete, the model saves and loads,
the reference cache is reused by a second identical run."""

from __future__ import annotations

import re

import pytest
import torch

from tests.conftest import read_metrics, run_cli, small_run_args

METRIC_NAMES = {
    "training_step",
    "learning_rate",
    "epoch",
    "train_loss",
    "logps/chosen",
    "logps/rejected",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/average",
    "rewards/accuracy",
    "rewards/margin",
    "token_count",
    "perf/tokens_per_second_step",
    "perf/tokens_per_second_avg",
}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, synthetic_data, tmp_path_factory):
    """One 24-step run (64 pairs, batch 8, 3 epochs) and its output."""
    base = tmp_path_factory.mktemp("recipe")
    out, cache = base / "out", base / "cache"
    result = run_cli(small_run_args(tiny_model_dir, synthetic_data[0], out, num_epochs=3), cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, cache, result


def test_metrics_are_complete_and_loss_falls(trained):
    out, _, result = trained
    rows = read_metrics(out)
    assert [r["training_step"] for r in rows] == list(range(1, 25))
    for row in rows:
        assert METRIC_NAMES <= set(row)
    assert rows[0]["train_loss"] == pytest.approx(0.6931, abs=0.02)  # policy == reference at step 1
    late = sum(r["train_loss"] for r in rows[-4:]) / 4
    assert late < rows[0]["train_loss"] - 0.1
    assert rows[-1]["epoch"] == pytest.approx(3.0)
    assert rows[-1]["token_count"] > rows[0]["token_count"] > 0
    # The learning rate decays linearly to 0 without warmup.
    assert rows[0]["learning_rate"] > rows[10]["learning_rate"] > rows[-1]["learning_rate"] == 0
    assert re.search(r"^step=24 loss=\d\.\d{4} accuracy=\d+\.\d{2}% lr=\d\.\d{3}e[+-]\d\d$", result.stdout, re.M)


def test_rewards_are_consistent(trained):
    for row in read_metrics(trained[0]):
        assert row["rewards/margin"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"], abs=1e-5)
        assert row["rewards/average"] == pytest.approx((row["rewards/chosen"] + row["rewards/rejected"]) / 2, abs=1e-5)
        assert 0.0 <= row["rewards/accuracy"] <= 1.0


def test_saved_model_loads_and_changed(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained[0]
    assert (out / "model.safetensors").exists()
    trained_model = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in trained_model.state_dict().items() if not torch.equal(p, initial.state_dict()[n])]
    assert changed, "training changed no weight"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) <= trained_model.get_input_embeddings().weight.shape[0]
    assert tokenizer.chat_template


@pytest.mark.slow
def test_second_run_reuses_the_reference_cache(trained, tiny_model_dir, synthetic_data, tmp_path):
    out, cache, first = trained
    assert "reference log-probs: computing" in first.stdout
    assert len(list(cache.glob("*.pt"))) == 1
    again = run_cli(
        small_run_args(tiny_model_dir, synthetic_data[0], tmp_path / "again", num_epochs=3, max_train_steps=2), cache
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reference log-probs: loaded from cache" in again.stdout
    assert len(list(cache.glob("*.pt"))) == 1
    # Same cache, same data order, same first step.
    assert read_metrics(tmp_path / "again")[0]["train_loss"] == pytest.approx(read_metrics(out)[0]["train_loss"])


@pytest.mark.slow
def test_changed_input_builds_a_new_cache(trained, tiny_model_dir, synthetic_data, tmp_path):
    cache = trained[1]
    before = set(cache.glob("*.pt"))
    # 32 rows instead of 64: a different mix. (A max_seq_length that truncates nothing rightly reuses the cache.)
    result = run_cli(
        small_run_args(
            tiny_model_dir,
            synthetic_data[0],
            tmp_path / "o",
            mixer_list=[str(synthetic_data[0]), "32"],
            max_train_steps=1,
        ),
        cache,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference log-probs: computing" in result.stdout
    assert len(set(cache.glob("*.pt")) - before) == 1
