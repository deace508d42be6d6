"""The GPU suite's CPU mode (``gpu_suite.sh --tiny``) runs every part end to end, so the suite cannot rot unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_suite_tiny_mode_runs_every_part(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "scripts/bench/gpu_suite.sh", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    suite = json.loads((out / "suite.json").read_text())
    assert suite["environment"]["device"] == "cpu"
    assert suite["tests"]["returncode"] in (0, 5) and "skipped" in suite["tests"]["summary"]  # GPU tests skip on CPU
    runs = suite["train"]
    assert set(runs) == {
        "ours_256_packed_chunked_zero2",
        "ours_256_padded_liger_zero3",
        "ours_256_packed_chunked_fsdp2",
    }
    for run in runs.values():
        assert run["steps"] == 6 and run["tokens_per_s"] > 0 and run["reference_pairs_per_s"] > 0
        assert run["mfu"] is None  # no peak FLOP/s on a CPU: not logged rather than invented
    trl = suite["trl"]
    if "skipped" not in trl:
        assert trl["trl_256"]["steps"] == 6 and trl["trl_256"]["tokens_per_s"] > 0
    table = (out / "suite.md").read_text()
    assert "| ours_256_padded_liger_zero3 | 256 | padded | True | zero3 |" in table
    assert "| ours_256_packed_chunked_fsdp2 | 256 | packed | False | fsdp2 |" in table
    assert "engine: fsdp2, 1 shard x 1 replica" in (out / "ours_256_packed_chunked_fsdp2.log").read_text()
    assert "batching: padded rows" in (out / "ours_256_padded_liger_zero3.log").read_text()
    # The first row is profiled: its top operators by device time (on CUDA) and by host time.
    top = (out / "ours_256_packed_chunked_zero2" / "out" / "profile" / "top_ops_rank0.txt").read_text()
    assert "sorted by self_cpu_time_total" in top and "aten::mm" in top

    # --only reruns one part and rebuilds the report from every part's file.
    again = subprocess.run(
        ["bash", "scripts/bench/gpu_suite.sh", "--tiny", "--out", str(out), "--only", "report"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "suite.json").read_text())["train"] == runs
    bad = subprocess.run(
        [
            sys.executable,
            "scripts/bench/gpu_suite.py",
            "--tiny",
            "--out",
            str(out),
            "--rows",
            "256/sideways/liger/zero2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "error: --rows: bad row '256/sideways/liger/zero2'" in bad.stderr
