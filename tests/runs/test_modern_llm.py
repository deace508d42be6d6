"""The documented ``modern_llm`` API: its import paths from outside the checkout, the documented DPO example and the
three-stage pipeline (examples/pipeline.py), run as written except for local paths and tiny sizes."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, cli_env, read_metrics

DOCUMENTED_IMPORTS = """
from modern_llm.config import TrainingConfig
from modern_llm.data.preference_datasets import PreferenceDatasetConfig
from modern_llm.training.train_dpo import run_dpo, DPOConfig
from modern_llm.training.train_sft import run_sft
from modern_llm.training.train_lm import run_training
import modern_llm, open_instruct.api
assert run_dpo is open_instruct.api.run_dpo and DPOConfig is open_instruct.api.DPOConfig
assert TrainingConfig is open_instruct.api.TrainingConfig and run_sft is open_instruct.api.run_sft
assert PreferenceDatasetConfig is open_instruct.api.PreferenceDatasetConfig
assert run_training is open_instruct.api.run_training
print(modern_llm.__file__, open_instruct.api.__file__)
"""


def _import_elsewhere(cwd: Path, pythonpath: Path) -> list[Path]:
    env = {**cli_env(cwd / "cache"), "PYTHONPATH": str(pythonpath)}
    result = subprocess.run(
        [sys.executable, "-c", DOCUMENTED_IMPORTS], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [Path(p) for p in result.stdout.split()]


def test_documented_imports_from_another_directory(tmp_path):
    """The checkout on PYTHONPATH (not installed), started from an unrelated working directory."""
    files = _import_elsewhere(tmp_path, ROOT)
    assert all(f.is_relative_to(ROOT) for f in files)


@pytest.mark.slow
def test_wheel_ships_modern_llm(tmp_path):
    """A wheel built from pyproject holds modern_llm; unpacked alone (no checkout on the path), its imports work."""
    import shutil

    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside pyproject.toml
    skip = shutil.ignore_patterns(".*", "build", "output", "local_dataset_cache", "__pycache__", "*.egg-info", "tests")
    shutil.copytree(ROOT, source, ignore=skip)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("open_instruct-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "modern_llm/training/train_dpo.py" in names and "modern_llm/data/preference_datasets.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    files = _import_elsewhere(work, site)
    assert all(f.is_relative_to(site) for f in files)


def write_hh_sample(path: Path, n: int, seed: int) -> Path:
    """Anthropic/hh-rlhf's raw transcript format (gzipped JSON lines), in the embedded tokenizer's vocabulary."""
    import random

    from open_instruct.data.synthetic import make_pair

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pair = make_pair(rng)
        prompt = f"\n\nHuman: {pair['chosen'][0]['content']}\n\nAssistant:"
        rows.append(
            {
                "chosen": f"{prompt} {pair['chosen'][1]['content']}",
                "rejected": f"{prompt} {pair['rejected'][1]['content']}",
            }
        )
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.mark.slow
def test_documented_dpo_example_runs_as_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The documented example verbatim; stand-ins: "Anthropic/hh-rlhf" -> a local HH-format file, "gpt2" -> the
    embedded tokenizer's folder, max_steps 2000 -> 2, save_every 500 -> 1, log_every 25 -> 1, warmup 50 -> 1.
    bf16 stays: it runs on CPU. The SFT checkpoint comes from run_sft(save_format="pt")."""
    from transformers import AutoModelForCausalLM

    from modern_llm.config import TrainingConfig
    from modern_llm.data.instruction_datasets import InstructionDatasetConfig
    from modern_llm.data.preference_datasets import PreferenceDatasetConfig
    from modern_llm.training.train_dpo import DPOConfig, run_dpo
    from modern_llm.training.train_sft import run_sft
    from open_instruct.model.state_dict import load_pt_checkpoint

    monkeypatch.chdir(tmp_path)  # the example's relative experiments/ paths, as written
    monkeypatch.setenv("REFERENCE_LOGPROBS_CACHE_PATH", str(tmp_path / "reference_cache"))
    hh = str(write_hh_sample(tmp_path / "hh_rlhf_sample.jsonl.gz", 40, seed=0))
    gpt2 = str(tiny_model_dir)
    sft = run_sft(
        pretrain_checkpoint=tiny_model_dir,
        train_config=TrainingConfig(output_dir="experiments/sft", max_steps=2, learning_rate=1e-3, save_format="pt"),
        dataset_config=InstructionDatasetConfig(hh, max_seq_length=64),
    )
    assert sft == Path("experiments/sft/sft_final.pt") and sft.is_file()
    capsys.readouterr()

    # The documented example, as written (its imports are at the top of this test).
    train_config = TrainingConfig(run_name="dpo-hh", dataset_name=hh, tokenizer_name=gpt2,
        output_dir=Path("experiments/dpo"), batch_size=16, micro_batch_size=1, gradient_accumulation_steps=16,
        learning_rate=5e-6, max_steps=2, warmup_steps=1, weight_decay=0.01, save_every=1, log_every=1,
        mixed_precision="bf16")  # fmt: skip
    dpo_config = DPOConfig(beta=0.1, max_length=512, label_smoothing=0.0)
    preference_config = PreferenceDatasetConfig(dataset_name=hh, split="train")
    dpo_checkpoint = run_dpo(sft_checkpoint=Path("experiments/sft/sft_final.pt"), train_config=train_config,
        dpo_config=dpo_config, preference_config=preference_config)  # fmt: skip

    assert dpo_checkpoint == Path("experiments/dpo")
    out = capsys.readouterr().out
    assert re.search(r"^step=2 loss=\d+\.\d{4} accuracy=\d+\.\d{2}% lr=\d\.\d{3}e[-+]\d\d$", out, re.M), out[-2000:]
    assert "decoder matmuls bfloat16" in out
    assert [r["training_step"] for r in read_metrics(dpo_checkpoint)] == [1, 2]
    assert (dpo_checkpoint / "step_2" / "COMPLETED").is_file()
    run_config = json.loads((dpo_checkpoint / "run_config.json").read_text())
    assert run_config["beta"] == 0.1 and run_config["label_smoothing"] == 0.0 and run_config["weight_decay"] == 0.01
    policy = AutoModelForCausalLM.from_pretrained(dpo_checkpoint)
    # DPO started from exactly the weights in sft_final.pt (rebuilt from the config it carries).
    start = AutoModelForCausalLM.from_pretrained(dpo_checkpoint / "initial_model")
    sft_model, _ = load_pt_checkpoint(sft)
    ids = torch.tensor([[2, 7, 9, 11, 13]])
    assert torch.equal(start(input_ids=ids).logits, sft_model(input_ids=ids).logits)
    assert not torch.equal(policy(input_ids=ids).logits, start(input_ids=ids).logits)


@pytest.mark.slow
def test_pipeline_example_runs(tmp_path):
    """examples/pipeline.py (the documented run_training -> run_sft -> run_dpo calls) at tiny sizes, as CI runs it."""
    from transformers import AutoModelForCausalLM

    from open_instruct.model.state_dict import load_pt_checkpoint

    flags = ["--n_text", "600", "--n_train", "256", "--pretrain_steps", "40", "--sft_steps", "20", "--dpo_steps", "10"]
    result = subprocess.run(
        [sys.executable, "examples/pipeline.py", "--out_dir", str(tmp_path), *flags],
        cwd=ROOT,
        env=cli_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    before, after = map(float, re.search(r"held-out perplexity ([\d.]+) before, ([\d.]+) after", out).groups())
    assert after < before / 4, out
    sft_ppl = [float(x) for x in re.search(r"SFT: held-out perplexity .*: \[(.*)\]", out).group(1).split(",")]
    assert len(sft_ppl) == 2 and sft_ppl[1] < sft_ppl[0]
    assert re.search(r"before DPO \d+\.\d\d%, after DPO \d+\.\d\d%", out)
    assert load_pt_checkpoint(tmp_path / "pretrain" / "pretrain_final.pt")[0] is not None
    assert load_pt_checkpoint(tmp_path / "sft" / "sft_final.pt")[0] is not None
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "dpo") is not None
    assert os.path.isfile(tmp_path / "dpo" / "model.safetensors")
