"""Shared fixtures: the embedded tiny model and synthetic data, built once per test session, and a CLI runner."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
HH_SAMPLE = FIXTURES / "hh_rlhf_sample.jsonl.gz"  # real HH-RLHF rows shipped in the repo (MIT, see fixtures/NOTICE)


# The slowest tests under `make test` (each 30 s to 3 min with 2 workers), slowest first. They run before the rest,
# one at a time to whichever worker is free (pyproject's --maxschedchunk=1), so the two workers end together instead
# of one running a 3-minute test alone at the end. A name here that no longer exists is harmless.
SLOW_FIRST = (
    "tests/real_model/test_engines.py::test_lora_merged_on_two_processes_equals_one",
    "tests/plan/test_plan.py::test_predicted_peak_matches_measured_two_processes",
    "tests/real_model/test_plan.py::test_zero3_on_two_processes",
    "tests/runs/test_matrix.py",
    "tests/real_model/test_trl_parity.py",
    "tests/plan/test_plan.py::test_predicted_peak_matches_measured_one_process",
    "tests/model/test_packing.py::test_cli_packed_run_matches_padded",
    "tests/runs/test_gpu_suite.py",
    "tests/training/test_loop.py::test_partial_last_step_matches_one_process",
    "tests/model/test_moe.py::test_moe_cli_run_logs_aux_loss",
    "tests/real_model/test_engines.py",
    "tests/real_model/test_dpo_effect.py",
    "tests/model/test_modeling.py::test_tokenizer_without_pad_token_trains_and_saves_consistent_sizes",
    "tests/real_model/test_plan.py",
    "tests/runs/test_preemption.py",
    "tests/runs/test_faults_soak.py",
    "tests/runs/test_fault_tolerance.py",
    "tests/runs/test_liger_engines.py",
    "tests/runs/test_resume_world_size.py",
    "tests/runs/test_preemption_reference.py",
    "tests/training/test_preemption.py",
    "tests/engine/test_fsdp2.py",
    "tests/model/test_lora.py",
    "tests/objectives/test_losses.py::test_cli",
    "tests/training/test_precision.py",
    "tests/runs/test_lora_zero3.py",
    "tests/runs/test_faults_disk.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Known-slow tests first, in ``SLOW_FIRST`` order; the rest keep their order (every worker sorts alike)."""

    def rank(item: pytest.Item) -> int:
        return next((i for i, prefix in enumerate(SLOW_FIRST) if item.nodeid.startswith(prefix)), len(SLOW_FIRST))

    items.sort(key=rank)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A freshly initialised tiny Llama + word-level tokenizer with a chat template (read-only: copy to modify)."""
    from open_instruct.data.synthetic import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with attention dropout 0.1 (a copy): equal losses across a resume then also show the random
    streams resumed exactly."""
    import shutil

    path = tmp_path_factory.mktemp("dropout") / "model"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> tuple[Path, Path]:
    """(train.jsonl, test.jsonl) of the synthetic preference task: 256 and 64 pairs."""
    from open_instruct.data.synthetic import write_task

    return write_task(tmp_path_factory.mktemp("synthetic"), n_train=256, n_test=64, seed=0)


def cli_env(cache_dir: Path) -> dict[str, str]:
    """Environment for a CLI subprocess: its own reference cache, quiet, 1 thread, this checkout first on the path."""
    env = dict(os.environ)
    env.update(
        {
            "REFERENCE_LOGPROBS_CACHE_PATH": str(cache_dir),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            "TQDM_DISABLE": "1",
        }
    )
    return env


def distributed_env(cache_dir: Path) -> dict[str, str]:
    """``cli_env`` for DeepSpeed and torchrun on CPU processes."""
    return {**cli_env(cache_dir), "DS_ACCELERATOR": "cpu", "ACCELERATE_LOG_LEVEL": "error"}


def launch(command: list[str], cache_dir: Path, timeout: int = 420) -> subprocess.CompletedProcess:
    """Run a training command (one process or torchrun) to its end, under ``distributed_env``; fail the test with the
    tail of its output."""
    result = subprocess.run(
        command, cwd=ROOT, env=distributed_env(cache_dir), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result


def run_python(
    args: list[str], cache_dir: Path, timeout: int = 600, extra_env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` (a ``-m`` module or a script) in this checkout under ``cli_env`` (plus ``extra_env``) and
    capture its output."""
    return subprocess.run(
        [sys.executable, *args],
        env={**cli_env(cache_dir), **(extra_env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def run_interpreted(script: str, timeout: int) -> dict:
    """Run ``tests/SCRIPT`` under Triton's interpreter (Liger's kernels on CPU) and return the JSON of its last line."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / script)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_cli(args: list[str], cache_dir: Path, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m open_instruct.dpo_tune_cache ARGS`` and capture its output."""
    return run_python(["-m", "open_instruct.dpo_tune_cache", *args], cache_dir, timeout, **kwargs)


def small_run_args(model_dir: Path, train_file: Path, output_dir: Path, **overrides) -> list[str]:
    """A short CPU run on the tiny model: flags as a list, any of them overridable by keyword."""
    values = {
        "model_name_or_path": str(model_dir),
        "mixer_list": [str(train_file), "64"],
        "max_seq_length": "64",
        "per_device_train_batch_size": "8",
        "gradient_accumulation_steps": "1",
        "learning_rate": "1e-3",
        "warmup_ratio": "0.0",
        "num_epochs": "1",
        "loss_type": "dpo_norm",
        "beta": "5",
        "logging_steps": "1",
        "seed": "1",
        "output_dir": str(output_dir),
        # sample answers (on by default) cost ~1 s per occasion here; tests/training/test_samples.py turns them on
        "num_sample_prompts": "0",
    }
    values.update(overrides)
    args: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        args.append(f"--{key}")
        args.extend(value if isinstance(value, list) else [str(value)])
    return args


def comparison_flags(model_dir: Path, train_file: Path, pairs: int, **common) -> Callable[..., list[str]]:
    """``flags(output_dir, per_device, **extra)``: ``small_run_args`` for runs compared across world sizes, on
    ``pairs`` pairs, ``per_device`` of them per device and micro-batch, reference batches of 8 on every rank (same
    padding, same float sums), lr 1e-2 (weights move enough for a wrong gradient to show), ``common`` in every run."""

    def flags(output_dir: Path, per_device: int, **extra: str) -> list[str]:
        values = {
            "mixer_list": [str(train_file), str(pairs)],
            "per_device_train_batch_size": str(per_device),
            "reference_batch_size": "8",
            "learning_rate": "1e-2",
        }
        return small_run_args(model_dir, train_file, output_dir, **{**values, **common, **extra})

    return flags


def read_metrics(output_dir: Path) -> list[dict]:
    """Rows of ``<output_dir>/metrics.jsonl``."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_command(flags: list[str]) -> list[str]:
    """``python -m open_instruct.dpo_tune_cache`` with these flags, one process."""
    return [sys.executable, "-m", "open_instruct.dpo_tune_cache", *flags]


def torchrun_command(flags: list[str], nproc: int = 2, port: int | None = None) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N`` around the entry script with these flags."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(port or free_port()),
        "open_instruct/dpo_tune_cache.py",
        *flags,
    ]
