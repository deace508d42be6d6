"""The documented ``modern_llm`` API: its import paths from outside the checkout, the documented DPO example and the
documented three-stage pipeline, run as written except for local paths and tiny sizes, with a GPT-2-style tokenizer
that has no chat template (as ``gpt2``); examples/pipeline.py at tiny sizes; the global batch on 2 processes."""

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

from open_instruct.model.state_dict import load_pt_checkpoint
from tests.conftest import ROOT, cli_env, free_port, launch, read_metrics
from tests.data_helpers import read_hh_rows, write_gpt2_style_model, write_gpt2_style_tokenizer

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


def write_hh_sample(path: Path, n: int) -> Path:
    """Anthropic/hh-rlhf's raw rows, gzipped JSON lines as the hub ships them: the first ``n`` real rows of the test
    sample that the HH parser takes (the verbatim example names no ``skip_invalid_rows``)."""
    from open_instruct.data.formats import from_hh_rlhf

    rows = []
    for row in read_hh_rows():
        try:
            from_hh_rlhf(row)
        except Exception:  # e.g. transcripts that differ before the last reply: the parser's tests cover those
            continue
        rows.append(row)
    assert len(rows) >= n
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows[:n])
    return path


@pytest.fixture(scope="module")
def gpt2_like(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny Llama folder with the GPT-2-style tokenizer, that tokenizer's own folder): both without chat template."""
    texts = [r[side] for r in read_hh_rows()[:300] for side in ("chosen", "rejected")]
    folder = tmp_path_factory.mktemp("gpt2_like")
    return write_gpt2_style_model(folder / "model", texts), write_gpt2_style_tokenizer(folder / "tokenizer", texts)


def _log_lr(out: str) -> dict[int, str]:
    return {
        int(m[1]): m[2] for m in re.finditer(r"^step=(\d+) loss=\d+\.\d{4} accuracy=\d+\.\d{2}% lr=(\S+)$", out, re.M)
    }


@pytest.mark.slow
def test_documented_dpo_example_runs_as_written(gpt2_like, tmp_path, monkeypatch, capsys):
    """The documented example verbatim; stand-ins: "Anthropic/hh-rlhf" -> 48 real HH rows in a local file, "gpt2" ->
    a GPT-2-style byte-level BPE tokenizer built here (no chat template, as gpt2), max_steps 2000 -> 3, warmup 50 -> 2,
    save_every 500 -> 3, log_every 25 -> 1. bf16 stays: it runs on CPU. experiments/sft/sft_final.pt is what run_sft
    writes by default."""
    from transformers import AutoModelForCausalLM

    from modern_llm.config import TrainingConfig
    from modern_llm.data.instruction_datasets import InstructionDatasetConfig
    from modern_llm.data.preference_datasets import PreferenceDatasetConfig
    from modern_llm.training.train_dpo import DPOConfig, run_dpo
    from modern_llm.training.train_sft import run_sft
    from open_instruct.model.state_dict import load_pt_checkpoint

    model, tokenizer = gpt2_like
    monkeypatch.chdir(tmp_path)  # the example's relative experiments/ paths, as written
    monkeypatch.setenv("REFERENCE_LOGPROBS_CACHE_PATH", str(tmp_path / "reference_cache"))
    hh = str(write_hh_sample(tmp_path / "hh_rlhf_sample.jsonl.gz", 48))
    gpt2 = str(tokenizer)
    sft = run_sft(
        pretrain_checkpoint=model,
        train_config=TrainingConfig(output_dir="experiments/sft", max_steps=2, learning_rate=1e-3),
        dataset_config=InstructionDatasetConfig(hh, max_seq_length=1024),
    )
    assert sft == Path("experiments/sft") and Path("experiments/sft/sft_final.pt").is_file()
    capsys.readouterr()

    # The documented example, as written (its imports are at the top of this test).
    train_config = TrainingConfig(run_name="dpo-hh", dataset_name=hh, tokenizer_name=gpt2,
        output_dir=Path("experiments/dpo"), batch_size=16, micro_batch_size=1, gradient_accumulation_steps=16,
        learning_rate=5e-6, max_steps=3, warmup_steps=2, weight_decay=0.01, save_every=3, log_every=1,
        mixed_precision="bf16")  # fmt: skip
    dpo_config = DPOConfig(beta=0.1, max_length=512, label_smoothing=0.0)
    preference_config = PreferenceDatasetConfig(dataset_name=hh, split="train")
    dpo_checkpoint = run_dpo(sft_checkpoint=Path("experiments/sft/sft_final.pt"), train_config=train_config,
        dpo_config=dpo_config, preference_config=preference_config)  # fmt: skip

    assert dpo_checkpoint == Path("experiments/dpo") and (dpo_checkpoint / "dpo_final.pt").is_file()
    captured = capsys.readouterr()
    # The tokenizer named has no chat template: HH-RLHF's transcript, said once; one process keeps accumulation 16.
    assert "gradient_accumulation_steps" not in captured.err
    notes = [line for line in captured.err.splitlines() if line.startswith("note:") and "chat template" in line]
    assert len(notes) == 1 and "has no chat template: using 'hh_rlhf'" in notes[0], notes
    # Constant after warmup, as the documented log (lr=5.000e-06 at steps 100 and 200 of 2000 after 50 warmup steps).
    assert _log_lr(captured.out) == {1: "2.500e-06", 2: "5.000e-06", 3: "5.000e-06"}, captured.out
    assert "decoder matmuls bfloat16" in captured.out
    assert [r["training_step"] for r in read_metrics(dpo_checkpoint)] == [1, 2, 3]
    assert (dpo_checkpoint / "step_3" / "COMPLETED").is_file()
    run_config = json.loads((dpo_checkpoint / "run_config.json").read_text())
    assert run_config["beta"] == 0.1 and run_config["label_smoothing"] == 0.0 and run_config["weight_decay"] == 0.01
    assert run_config["gradient_accumulation_steps"] == 16 and run_config["per_device_train_batch_size"] == 1
    policy = AutoModelForCausalLM.from_pretrained(dpo_checkpoint)
    # DPO started from exactly the weights in sft_final.pt (rebuilt from the config it carries).
    start = AutoModelForCausalLM.from_pretrained(dpo_checkpoint / "initial_model")
    sft_model, _ = load_pt_checkpoint(Path("experiments/sft/sft_final.pt"))
    ids = torch.tensor([[2, 7, 9, 11, 13]])
    assert torch.equal(start(input_ids=ids).logits, sft_model(input_ids=ids).logits)
    assert not torch.equal(policy(input_ids=ids).logits, start(input_ids=ids).logits)


@pytest.mark.slow
def test_documented_pipeline_runs_as_written(gpt2_like, tmp_path, monkeypatch, capsys):
    """The documented three calls verbatim, each stage taking what the previous one returned; the configs they name
    are written here at tiny sizes, with the template-less GPT-2-style tokenizer and real HH rows."""
    from modern_llm.config import ModelConfig, TrainingConfig
    from modern_llm.data.instruction_datasets import InstructionDatasetConfig
    from modern_llm.data.preference_datasets import PreferenceDatasetConfig
    from modern_llm.training.train_dpo import DPOConfig, run_dpo
    from modern_llm.training.train_lm import run_training
    from modern_llm.training.train_sft import run_sft
    from open_instruct.data.chat_templates import CHAT_TEMPLATES
    from open_instruct.model.state_dict import load_pt_checkpoint

    monkeypatch.setenv("REFERENCE_LOGPROBS_CACHE_PATH", str(tmp_path / "reference_cache"))
    hh = str(write_hh_sample(tmp_path / "hh.jsonl.gz", 32))
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": r["chosen"]}) + "\n" for r in read_hh_rows()[100:200]))
    tiny = {"batch_size": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3}
    model_config = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, max_seq_len=1024)
    pretrain_config = TrainingConfig(
        dataset_name=str(text), tokenizer_name=str(gpt2_like[1]), output_dir=tmp_path / "pretrain", max_steps=3, **tiny
    )
    sft_config = TrainingConfig(output_dir=tmp_path / "sft", max_steps=2, **tiny)
    instruction_config = InstructionDatasetConfig(hh, max_seq_length=1024)
    dpo_train_config = TrainingConfig(output_dir=tmp_path / "dpo", max_steps=2, warmup_steps=1, log_every=1, **tiny)
    preference_config = PreferenceDatasetConfig(hh)

    # The documented pipeline, as written.
    pretrain_ckpt = run_training(model_config=model_config, train_config=pretrain_config)
    sft_ckpt = run_sft(pretrain_checkpoint=pretrain_ckpt, train_config=sft_config, dataset_config=instruction_config)
    dpo_ckpt = run_dpo(sft_checkpoint=sft_ckpt, train_config=dpo_train_config, dpo_config=DPOConfig(beta=0.1),
                       preference_config=preference_config)  # fmt: skip

    captured = capsys.readouterr()
    for stage, checkpoint in (("pretrain", pretrain_ckpt), ("sft", sft_ckpt), ("dpo", dpo_ckpt)):
        assert checkpoint == tmp_path / stage and load_pt_checkpoint(checkpoint / f"{stage}_final.pt")[0] is not None
    assert [r["training_step"] for r in read_metrics(dpo_ckpt)] == [1, 2]
    assert _log_lr(captured.out) == {1: "1.000e-03", 2: "1.000e-03"}  # warmup of 1 step, then constant
    # Pretraining needs no template; SFT gives the template-less tokenizer HH-RLHF's, which DPO then finds saved.
    notes = [line for line in captured.err.splitlines() if line.startswith("note:") and "chat template" in line]
    assert len(notes) == 1 and "has no chat template: using 'hh_rlhf'" in notes[0], notes
    _, tokenizer = load_pt_checkpoint(dpo_ckpt / "dpo_final.pt")
    assert tokenizer.chat_template == CHAT_TEMPLATES["hh_rlhf"]


DISTRIBUTED_DPO = """
import sys
from open_instruct.api import DPOConfig, PreferenceDatasetConfig, TrainingConfig, run_dpo
model, data, out = sys.argv[1:4]
train = TrainingConfig(output_dir=out, batch_size=16, micro_batch_size=1, gradient_accumulation_steps=16,
                       learning_rate=1e-3, log_every=1)
run_dpo(model, train, DPOConfig(max_length=32, max_prompt_length=32), PreferenceDatasetConfig(data, amount=32))
"""


@pytest.mark.slow
def test_global_batch_kept_on_two_processes(tiny_model_dir, synthetic_data, tmp_path):
    """The documented batch (16 = micro 1 x accumulation 16) on 2 processes: accumulation 8, so one epoch of 32
    pairs takes 32 / 16 = 2 optimizer steps (accumulation 16 on each process would take 1)."""
    script = tmp_path / "run_dpo.py"
    script.write_text(DISTRIBUTED_DPO)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), str(script), str(tiny_model_dir), str(synthetic_data[0]), str(out)]
    result = launch(command, tmp_path / "cache", timeout=300)
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: gradient_accumulation_steps")]
    assert notes == [
        "note: gradient_accumulation_steps 16 -> 8: keeps the global batch_size 16 = micro_batch_size 1 x 8 x "
        "2 process(es)"
    ]
    rows = read_metrics(out)
    assert [r["training_step"] for r in rows] == [1, 2] and rows[-1]["epoch"] == pytest.approx(1.0)
    run_config = json.loads((out / "run_config.json").read_text())
    assert (run_config["per_device_train_batch_size"], run_config["gradient_accumulation_steps"]) == (1, 8)
    assert load_pt_checkpoint(out / "dpo_final.pt")[0] is not None  # written once, by the main process


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
