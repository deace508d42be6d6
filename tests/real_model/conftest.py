"""The real-model tier: SmolLM2-135M-Instruct (a real BPE vocabulary, its own ChatML template with a default system
prompt, tied embeddings, 30 layers) on real HH-RLHF rows from tests/fixtures. ``make real-model`` fetches and converts
the model once (``make test`` does it first); these tests fail, naming that command, when it is missing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, launch, python_command, small_run_args
from tests.data_helpers import read_hh_rows

REAL_MODEL = ROOT / os.environ.get("REAL_MODEL_DIR", "models/SmolLM2-135M-Instruct")
PAIRS = 6  # the training pairs of the shared runs: 3 optimizer steps of 2 (one per process on 2)


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


def prepared(
    model_dir: Path, data: Path, cache_dir: Path, max_seq_length: int = 256, add_bos: bool = False
) -> tuple[Any, list[dict]]:
    """The tokenizer and the records a run with these flags trains on, from the run's own loading and preparation."""
    from open_instruct.config import TrainArguments, settings_of
    from open_instruct.data.prepare import prepare_preference_data
    from open_instruct.model.modeling import load_tokenizer

    args = TrainArguments(
        model_name_or_path=str(model_dir),
        mixer_list=[str(data), "1.0"],
        max_seq_length=max_seq_length,
        add_bos=add_bos,
        dataset_local_cache_dir=str(cache_dir),
    )
    cfg = settings_of(args)
    tokenizer = load_tokenizer(cfg.model)
    return tokenizer, list(prepare_preference_data(cfg.data, tokenizer).records)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block, as the launched runs are (cli_env): a pytest worker shares 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def relative_difference(got: dict, want: dict, initial: dict) -> tuple[float, str]:
    """The largest, over tensors, of |got - want| / |want - initial| (L2 norms): how far one run's trained weights are
    from another's, as a fraction of the update. Element by element would mislead: Adam divides by the root of each
    gradient's square, so where a gradient is near zero, float noise in it moves that one weight by up to the
    learning rate. Returns (the fraction, the tensor where it is largest)."""
    worst, where = 0.0, ""
    for name, value in want.items():
        update = (value - initial[name]).norm().item()
        off = (got[name] - value).norm().item() / max(update, 1e-12)
        if off > worst:
            worst, where = off, name
    return worst, where


def assert_tied_when_loaded(folder: Path) -> dict:
    """The saved model loads in plain transformers with its output layer tied to its input embeddings, and the file
    holds no separately trained output layer; returns the loaded state dict."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    stored = load_file(folder / "model.safetensors")
    if "lm_head.weight" in stored:
        assert torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])
    return {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def run_flags(model: Path, train: Path, out: Path, per_device: int, **extra: str) -> list[str]:
    """The shared runs' flags: ``PAIRS`` pairs in steps of 2 (``per_device`` on each process), dpo_norm."""
    values = {
        "mixer_list": [str(train), str(PAIRS)],
        "max_seq_length": "256",
        "per_device_train_batch_size": str(per_device),
        "learning_rate": "1e-5",
        "loss_type": "dpo_norm",
        "beta": "5",
        "reference_batch_size": "1",  # no padding: every rank's reference sums are the one process's
        "dataset_local_cache_dir": str(out.parent / f"{out.name}_data"),
        **extra,
    }
    return small_run_args(model, train, out, **values)


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    """The shared runs' training pairs: the first ``PAIRS`` short HH rows."""
    return write_hh(tmp_path_factory.mktemp("hh") / "train.jsonl", short_hh_rows(PAIRS, max_chars=300))


@pytest.fixture(scope="session")
def one_process(real_model_dir, train_file, tmp_path_factory, worker_id) -> Path:
    """One process, 2 pairs per step, 3 steps: the output folder. Made once per test session, whichever pytest-xdist
    worker asks first (the others wait on a file lock and reuse it): the run costs half a minute of CPU."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # the session's folder, above each worker's own
    out = shared / "real_model_one_process" / "out"
    with FileLock(str(shared / "real_model_one_process.lock")):
        if not (out.parent / "DONE").is_file():
            launch(python_command(run_flags(real_model_dir, train_file, out, 2)), out.parent / "reference")
            (out.parent / "DONE").write_text("")
    return out
