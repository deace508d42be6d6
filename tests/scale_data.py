"""Larger preference sets for the scale tests and the data benchmark, built from the shipped HH-RLHF rows.

- :func:`write_hh_scaled`: the real HH rows repeated with a distinct ending on each repeat's replies (so no two pairs
  are the same), as raw HH transcripts.
- :func:`write_multiturn`: a synthetic Tulu-like set in the messages format: 1 to 4 turns, prompts and replies of
  Tulu 3 preference lengths (hundreds of tokens), words drawn from the HH text.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path
from typing import Any

HH_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hh_rlhf_sample.jsonl.gz"


def hh_rows(limit: int | None = None) -> list[dict[str, Any]]:
    """The shipped HH rows (raw transcripts), read directly."""
    with gzip.open(HH_FIXTURE, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows[:limit] if limit is not None else rows


def write_hh_scaled(path: Path, n_pairs: int) -> Path:
    """``n_pairs`` HH rows in JSON lines: the fixture's rows in turn, repeat r > 0 ending both replies with ``[r]``."""
    rows = hh_rows()
    with open(path, "w", encoding="utf-8") as out:
        for k in range(n_pairs):
            row, repeat = rows[k % len(rows)], k // len(rows)
            if repeat:
                row = {side: f"{row[side]} [{repeat}]" for side in ("chosen", "rejected")}
            out.write(json.dumps(row) + "\n")
    return path


def _words() -> list[str]:
    text = " ".join(r["chosen"] for r in hh_rows())
    return sorted(set(re.findall(r"[A-Za-z']+[.,?!]?", text)))


def _text(rng: random.Random, words: list[str], mean_words: int) -> str:
    n = max(3, int(rng.expovariate(1.0 / mean_words)))
    return " ".join(rng.choices(words, k=n))


def write_multiturn(path: Path, n_pairs: int, seed: int = 0) -> Path:
    """``n_pairs`` Tulu-like multi-turn pairs (messages format) in JSON lines."""
    rng, words = random.Random(seed), _words()
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(n_pairs):
            turns = rng.choices((1, 2, 3, 4), weights=(6, 2, 1, 1))[0]
            shared = []
            for t in range(turns):
                shared.append({"role": "user", "content": _text(rng, words, 120)})
                if t < turns - 1:
                    shared.append({"role": "assistant", "content": _text(rng, words, 150)})
            chosen = shared + [{"role": "assistant", "content": _text(rng, words, 220)}]
            rejected = shared + [{"role": "assistant", "content": _text(rng, words, 180)}]
            out.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    return path
