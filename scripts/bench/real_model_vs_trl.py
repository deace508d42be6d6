"""The real model (SmolLM2-135M-Instruct, `make real-model`) trained by this project and by TRL's DPOTrainer, side by
side in one run: wall time, peak memory and reference-pass pairs per second.

    OMP_NUM_THREADS=2 python scripts/bench/real_model_vs_trl.py [--pairs 64] [--write BENCHMARKS.md]

Both trainers get the same 64 real HH-RLHF pairs from the repository's fixture (as chat messages, rendered by the
model's own ChatML template), max length 512, per-device batch 8, sigmoid DPO with beta 0.1, learning rate 5e-7, no
warmup, fp32, a precomputed reference (batch 16), 2 threads, one epoch; every other flag at its default. Each runs in
its own subprocess (scripts/bench/compare_trl.py's children), so peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

import compare_trl  # noqa: E402  (a sibling script: its children run the two trainers)

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", default=None, help="Markdown file whose '## Real model vs TRL' section gets it.")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"error: {args.model}: no model there; run `make real-model` first")
    os.environ["COMPARE_TRL_BASELINES"] = "0"  # the plain causal-LM baselines are compare_trl.py's own rows
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_real_"))
    ours_data, trl_data, pairs = compare_trl.write_pairs(work, args.pairs)
    print(f"{pairs} HH pairs in {work}; model {args.model}", flush=True)
    ours = compare_trl.spawn("ours", str(args.model), ours_data, work / "ours", None, False, args.threads)
    trl = compare_trl.spawn("trl", str(args.model), trl_data, work / "trl", None, False, args.threads)
    report = compare_trl.table([("49,152 (SmolLM2-135M-Instruct)", ours, trl, pairs)])
    ref_rate = {name: pairs / r["reference_s"] for name, r in (("ours", ours), ("TRL", trl))}
    report += (
        f"\nReference pass: ours {ref_rate['ours']:.2f} pairs/s, TRL {ref_rate['TRL']:.2f} pairs/s. "
        f"Goals: wall time (end to end) at most 0.25x TRL's: **{ours['end_to_end_s'] / trl['end_to_end_s']:.2f}x**; "
        f"peak memory at most 0.5x TRL's: **{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x** "
        f"(above imports: **{(ours['peak_rss_mb'] - ours['baseline_rss_mb']) / (trl['peak_rss_mb'] - trl['baseline_rss_mb']):.2f}x**).\n"
        f"\nWhole benchmark: {time.perf_counter() - start:.0f} s, {args.threads} threads, torch "
        f"{__import__('torch').__version__}, transformers {__import__('transformers').__version__}, trl "
        f"{__import__('trl').__version__}.\n"
    )
    print(report)
    if args.write:
        command = " ".join(["python scripts/bench/real_model_vs_trl.py", *sys.argv[1:]])
        compare_trl.write_section(Path(args.write), report, command, title="Real model vs TRL")


if __name__ == "__main__":
    main()
