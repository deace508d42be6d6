"""Files written before the package reshape (commit df0fd5e): a step checkpoint still resumes exactly; the reference
cache, whose format has since moved to version 3 (LD-DPO's shared-length sums), is recognised as an older version and
rebuilt with a one-line message, never misread.

tests/fixtures/old_df0fd5e was made by ``make_fixture.py`` on that commit: a 1-layer Llama, 16 pairs, two optimizer
steps with a checkpoint after each. The reference cache key holds the model folder's absolute path, so the fixture is
copied to the path it was made at.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from open_instruct.training import reference_cache
from tests.conftest import ROOT, read_metrics, run_cli

FIXTURE = ROOT / "tests" / "fixtures" / "old_df0fd5e"
MADE_AT = Path("/tmp/oi-compat")


def test_old_reference_cache_file_is_named_as_an_older_version():
    (cache,) = (FIXTURE / "refcache").glob("*.pt")
    reference, problem = reference_cache.check(cache, cache.stem, rows=16)
    assert reference is None
    assert f"cache format version 2, this version reads {reference_cache.FORMAT_VERSION}" in problem


@pytest.mark.slow
def test_old_cache_is_rebuilt_and_old_checkpoint_resumes_exactly(tmp_path):
    shutil.rmtree(MADE_AT, ignore_errors=True)
    shutil.copytree(FIXTURE, MADE_AT)
    out = MADE_AT / "out"
    old_rows = read_metrics(out)
    args = [
        "--model_name_or_path", str(MADE_AT / "model"), "--mixer_list", str(MADE_AT / "train.jsonl"), "16",
        "--max_seq_length", "64", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
        "--warmup_ratio", "0.0", "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--keep_last_n_checkpoints", "-1", "--seed", "1", "--output_dir", str(out),
        "--reference_logprobs_cache_path", str(MADE_AT / "refcache"),
        "--dataset_local_cache_dir", str(tmp_path / "dscache"),
    ]  # fmt: skip
    try:
        result = run_cli(args, tmp_path / "unused_cache")
        assert result.returncode == 0, result.stderr[-3000:]
        (cache,) = (MADE_AT / "refcache").glob("*.pt")
        rebuilt = [line for line in result.stdout.splitlines() if "not used" in line]
        assert len(rebuilt) == 1 and "cache format version 2" in rebuilt[0] and "rebuilding it" in rebuilt[0]
        assert reference_cache.check(cache, cache.stem, rows=16)[1] == ""  # the rebuilt cache is the current version
        assert "resumed at optimizer step 1" in result.stdout
        new_rows = read_metrics(out)
        assert [r["training_step"] for r in new_rows] == [1, 2]
        # step 2 after resuming from the old checkpoint equals step 2 of the old, uninterrupted run
        assert new_rows[1]["train_loss"] == pytest.approx(old_rows[1]["train_loss"], rel=1e-5)
        assert new_rows[1]["logps/chosen"] == pytest.approx(old_rows[1]["logps/chosen"], rel=1e-5)
        assert (out / "curves.png").stat().st_size > 0 and json.loads((out / "config.json").read_text())
    finally:
        shutil.rmtree(MADE_AT, ignore_errors=True)
