"""The memory model against a measured run: ``--dry_run``'s predicted peak of live tensor bytes and the peak
tests/plan_probe.py measures while the same flags train (tests/plan/test_plan.py, tests/real_model/test_plan.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from open_instruct.config import settings_of
from open_instruct.config.cli import parse_args
from open_instruct.plan.check import plan_of
from tests.conftest import ROOT, cli_env, free_port


def _flags(model: Path, data: Path, out: Path, extra: list[str], pairs: int, max_seq_length: int) -> list[str]:
    return [
        *(
            "--model_name_or_path",
            str(model),
            "--mixer_list",
            str(data),
            str(pairs),
            "--max_seq_length",
            str(max_seq_length),
        ),
        *("--per_device_train_batch_size", "4", "--max_train_steps", "2", "--learning_rate", "1e-3"),
        *("--output_dir", str(out), "--dataset_local_cache_dir", str(out / "data_cache"), *extra),
        *("--num_sample_prompts", "0"),  # the plan models training; sample answers are generation
    ]


def measured_vs_planned(
    model: Path, data: Path, tmp_path: Path, extra: list[str], nproc: int, pairs: int = 32, max_seq_length: int = 48
) -> tuple[int, int]:
    """Train 2 steps of 4 pairs per process under tests/plan_probe.py and check that ``--dry_run``'s predicted peak of
    live tensor bytes is the measured one within 15%. Every sequence must be cut to ``max_seq_length`` (the plan's
    worst case), so the measured step is the planned one. Returns (predicted, measured) bytes."""
    out = tmp_path / "run"
    out.mkdir()
    flags = _flags(model, data, out, extra, pairs, max_seq_length)
    probe = [str(ROOT / "tests" / "plan_probe.py"), str(out), *flags]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    done = subprocess.run(
        launcher + probe, env=cli_env(tmp_path / "ref"), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lengths = json.loads((out / "dataset_statistics.json").read_text())["tokens"]["sequence"]
    assert lengths["p50"] == lengths["max"] == max_seq_length
    measured = max(sum(json.loads((out / f"peak_rank{r}.json").read_text()).values()) for r in range(nproc))
    args = parse_args([*flags, "--dry_run", "--dry_run_num_processes", str(nproc)])
    predicted = plan_of(settings_of(args), "dpo", pairs, []).phases[-1].total
    print(
        f"planned peak {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB ({nproc} process(es), {extra})"
    )
    assert predicted == pytest.approx(measured, rel=0.15), (predicted, measured)
    return predicted, measured
