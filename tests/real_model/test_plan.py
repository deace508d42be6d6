"""The plan holds on a real architecture: ``--dry_run`` on the real model's folder (tied embeddings, grouped-query
attention, a 49,152-token vocabulary) predicts the peak of live tensor bytes within 15% of the peak measured while
the same flags train, on one process and under ZeRO-3 on 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from open_instruct.data.formats import from_hh_rlhf
from tests.data_helpers import read_hh_rows
from tests.plan_measure import measured_vs_planned
from tests.real_model.conftest import write_hh

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
MAX_SEQ_LENGTH = 128
PAIRS = 16  # 2 steps of 4 pairs per process on 2 processes


@pytest.fixture(scope="module")
def cut_pairs(real_model_dir, tmp_path_factory) -> Path:
    """Real HH rows whose prompt fits in ``MAX_SEQ_LENGTH`` - 16 tokens and whose conversations, both sides, are
    longer than ``MAX_SEQ_LENGTH``: every sequence is cut to it, the plan's worst case."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)

    def length(messages: list[dict], generation: bool) -> int:
        return len(
            tokenizer.apply_chat_template(messages, add_generation_prompt=generation, return_dict=True)["input_ids"]
        )

    rows = []
    for row in read_hh_rows():
        try:
            pair = from_hh_rlhf(row)
        except Exception:  # the fixture's few invalid rows (empty replies)
            continue
        if length(pair["prompt"], True) > MAX_SEQ_LENGTH - 16:
            continue
        if min(length(pair["prompt"] + pair[side], False) for side in ("chosen", "rejected")) <= MAX_SEQ_LENGTH:
            continue
        rows.append({"chosen": row["chosen"], "rejected": row["rejected"]})
        if len(rows) == PAIRS:
            break
    assert len(rows) == PAIRS
    return write_hh(tmp_path_factory.mktemp("cut") / "cut.jsonl", rows)


# The plan's worst case shares no prompt (a pair whose replies differ from the first token); these prompts fill most
# of MAX_SEQ_LENGTH, so sharing them (the CPU default) would measure far below it: compare the layout the plan models.
UNSHARED = ["--share_prompt", "false"]


def test_one_process(real_model_dir, cut_pairs, tmp_path):
    measured_vs_planned(real_model_dir, cut_pairs, tmp_path, UNSHARED, 1, PAIRS, MAX_SEQ_LENGTH)


def test_zero3_on_two_processes(real_model_dir, cut_pairs, tmp_path):
    extra = [*UNSHARED, "--zero_stage", "3"]
    measured_vs_planned(real_model_dir, cut_pairs, tmp_path, extra, 2, PAIRS, MAX_SEQ_LENGTH)
