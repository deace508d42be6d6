"""Helpers of ``make demo-real`` (scripts/train/debug/dpo_cpu_real.sh):

    python scripts/real_model/demo_tools.py split OUT_DIR [--train 64] [--test 64]
    python scripts/real_model/demo_tools.py rewards OUTPUT_DIR

``split`` writes train.jsonl and test.jsonl from the repository's real HH-RLHF rows (tests/fixtures, MIT; the shorter
ones, so a CPU trains on them in minutes) and prompts.txt, the question the run answers before and after DPO
(``--sample_prompts``: the run summary shows both answers); ``rewards`` prints the run's reward accuracy on its
training pairs in its last epoch, from its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HH_SAMPLE = ROOT / "tests" / "fixtures" / "hh_rlhf_sample.jsonl.gz"
QUESTION = "What are some good ways to fall asleep faster?"


def split(out: Path, n_train: int, n_test: int, max_chars: int = 600) -> None:
    rows = []
    with gzip.open(HH_SAMPLE, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            sides = (row["chosen"], row["rejected"])
            if max(map(len, sides)) < max_chars and not any(s.rstrip().endswith("Assistant:") for s in sides):
                rows.append({"chosen": row["chosen"], "rejected": row["rejected"]})
    if len(rows) < n_train + n_test:
        raise SystemExit(f"error: only {len(rows)} short HH rows in {HH_SAMPLE}")
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:n_train]), ("test", rows[n_train : n_train + n_test])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (out / "prompts.txt").write_text(QUESTION + "\n")
    print(
        f"data: {n_train} training and {n_test} held-out real HH-RLHF pairs in {out}, a sample prompt in prompts.txt"
    )


def rewards(output_dir: Path) -> None:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last_epoch = max(r["epoch"] for r in rows)
    last = [r["rewards/accuracy"] for r in rows if r["epoch"] > last_epoch - 1]
    first = [r["rewards/accuracy"] for r in rows if r["epoch"] <= 1]
    print(
        f"training pairs' reward accuracy (chosen's implicit reward above rejected's, per step): first epoch "
        f"{100 * sum(first) / len(first):.1f}%, last epoch {100 * sum(last) / len(last):.1f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split")
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=48)
    p.add_argument("--test", type=int, default=48)
    p = sub.add_parser("rewards")
    p.add_argument("output_dir", type=Path)
    args = parser.parse_args()
    if args.command == "split":
        split(args.out, args.train, args.test)
    else:
        rewards(args.output_dir)


if __name__ == "__main__":
    main()
