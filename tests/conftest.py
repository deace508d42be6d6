"""Shared fixtures: the embedded tiny model and synthetic data, built once per test session, and a CLI runner."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
HH_SAMPLE = FIXTURES / "hh_rlhf_sample.jsonl.gz"  # real HH-RLHF rows shipped in the repo (MIT, see fixtures/NOTICE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A freshly initialised tiny Llama + word-level tokenizer with a chat template (read-only: copy to modify)."""
    from open_instruct.data.synthetic import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


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


def run_cli(args: list[str], cache_dir: Path, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m open_instruct.dpo_tune_cache ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "open_instruct.dpo_tune_cache", *args],
        env=cli_env(cache_dir),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


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
    }
    values.update(overrides)
    args: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        args.append(f"--{key}")
        args.extend(value if isinstance(value, list) else [str(value)])
    return args


def read_metrics(output_dir: Path) -> list[dict]:
    """Rows of ``<output_dir>/metrics.jsonl``."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
