"""The learning rate each logged step reports: the Python API holds it constant after warmup (the documented API's
log), the command line decays it linearly to zero (open-instruct's default)."""

from __future__ import annotations

import pytest

from open_instruct import DPOConfig, PreferenceDatasetConfig, TrainingConfig, run_dpo
from tests.conftest import read_metrics, run_cli, small_run_args

LR, WARMUP, STEPS = 1e-3, 2, 6


def _warmup(step: int) -> float:
    return LR * step / WARMUP


def _logged_lr(output_dir) -> list[float]:
    return [r["learning_rate"] for r in read_metrics(output_dir) if "train_loss" in r]


def test_python_api_holds_the_learning_rate_after_warmup(tiny_model_dir, synthetic_data, tmp_path):
    train = TrainingConfig(
        output_dir=str(tmp_path / "api"),
        batch_size=8,
        micro_batch_size=8,
        learning_rate=LR,
        warmup_steps=WARMUP,
        max_steps=STEPS,
        log_every=1,
        save_format="hf",
    )
    dpo = DPOConfig(max_length=32, max_prompt_length=32, reference_cache_dir=str(tmp_path / "cache"))
    path = run_dpo(tiny_model_dir, train, dpo, PreferenceDatasetConfig(str(synthetic_data[0]), amount=64))
    expected = [_warmup(s) if s < WARMUP else LR for s in range(1, STEPS + 1)]
    assert _logged_lr(path) == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_command_line_decays_linearly_after_warmup(tiny_model_dir, synthetic_data, tmp_path):
    flags = small_run_args(
        tiny_model_dir,
        synthetic_data[0],
        tmp_path / "cli",
        learning_rate=str(LR),
        warmup_ratio=None,
        warmup_steps=str(WARMUP),
        max_train_steps=str(STEPS),
    )
    result = run_cli(flags, tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    linear = [_warmup(s) if s < WARMUP else LR * (STEPS - s) / (STEPS - WARMUP) for s in range(1, STEPS + 1)]
    assert _logged_lr(tmp_path / "cli") == pytest.approx(linear, rel=1e-6, abs=1e-12)
