"""The soak benchmark's quick version (scripts/bench/soak.py; the full one is in BENCHMARKS.md): a run with frequent
checkpoints keeps its disk bounded, and the same run killed -9 twice at seeded random moments and rerun each time ends
with bit-identical weights and the same loss curve."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_quick_soak_bounded_disk_and_exact_resume_after_kills(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "bench" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    args = soak.parse_args(["--steps", "60", "--checkpoint_every", "10", "--keep", "2", "--kills", "2", "--seed", "3"])
    result = soak.soak(args, tmp_path)
    figures, checks = result["figures"], result["checks"]
    assert figures["step_folders_max"] <= 3 and checks["disk_bounded"], figures
    assert [a["rc"] for a in result["attempts"]] == [-9, -9, 0], result["attempts"]
    assert checks["weights_bit_identical"] and checks["loss_curve_identical"], checks
    assert checks["rows"] == [60, 60]
