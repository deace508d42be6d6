"""The real-model tier: SmolLM2-135M-Instruct (a real BPE vocabulary, its own ChatML template with a default system
prompt, tied embeddings, 30 layers) on real HH-RLHF rows from tests/fixtures. ``make real-model`` fetches and converts
the model once (``make test`` does it first); these tests fail, naming that command, when it is missing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.data_helpers import read_hh_rows

REAL_MODEL = ROOT / os.environ.get("REAL_MODEL_DIR", "models/SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The converted model's folder (read-only)."""
    if not (REAL_MODEL / "CONVERTED").is_file():
        pytest.fail(f"the real model is not at {REAL_MODEL}: run `make real-model` (make test does it first)")
    return REAL_MODEL


def short_hh_rows(count: int, skip: int = 0, max_chars: int = 700) -> list[dict]:
    """HH rows (raw transcripts) whose chosen and rejected transcripts are both shorter than ``max_chars`` and whose
    replies are not empty, in fixture order, after skipping the first ``skip`` such rows: short, so that a real
    135M-parameter model trains on them in seconds on a CPU core."""
    kept = []
    for row in read_hh_rows():
        if max(len(row["chosen"]), len(row["rejected"])) >= max_chars:
            continue
        if row["chosen"].rstrip().endswith("Assistant:") or row["rejected"].rstrip().endswith("Assistant:"):
            continue
        kept.append({"chosen": row["chosen"], "rejected": row["rejected"]})
    assert len(kept) >= skip + count, f"only {len(kept)} short HH rows in the fixture"
    return kept[skip : skip + count]


def write_hh(path: Path, rows: list[dict]) -> Path:
    """``rows`` as an HH-format jsonl file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
