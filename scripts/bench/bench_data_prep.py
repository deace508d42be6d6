"""Time preparing the real 2,000-row HH-RLHF sample: load + validate + mix, tokenize, and the prepared-data cache.

    OMP_NUM_THREADS=1 python scripts/bench/bench_data_prep.py [--repeats 3] [--vocab_size 8000]

The tokenizer is a byte-level BPE trained on the sample itself with the ``tokenizers`` library (the project ships no
real tokenizer and nothing is downloaded); training it is timed separately and not part of the preparation numbers.
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from open_instruct.config import TrainArguments  # noqa: E402
from open_instruct.data.chat_templates import CHAT_TEMPLATES  # noqa: E402
from open_instruct.data.mixer import parse_mixer_list  # noqa: E402
from open_instruct.data.prepare import prepare_preference_data  # noqa: E402
from open_instruct.data.tokenize import tokenize_pairs  # noqa: E402
from open_instruct.settings import DataSettings  # noqa: E402
from tests.data_helpers import HH_SAMPLE, read_hh_rows, train_bpe_tokenizer  # noqa: E402
from tests.data_oracle import build_mix  # noqa: E402

CPU: list[float] = []  # process CPU seconds of each timed call, in call order (wall time suffers on a busy machine)


def _timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    CPU.append(time.process_time() - cpu)
    return time.perf_counter() - start, result


def main() -> None:
    """Run the measurements and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--max_seq_length", type=int, default=2048)
    ns = parser.parse_args()
    if not HH_SAMPLE.is_file():
        sys.exit(f"HH sample not found at {HH_SAMPLE}")
    raw = read_hh_rows()
    t_train, tokenizer = _timed(
        lambda: train_bpe_tokenizer(
            [r[side] for r in raw for side in ("chosen", "rejected")], vocab_size=ns.vocab_size
        )
    )
    tokenizer.chat_template = CHAT_TEMPLATES["tulu"]
    entries = parse_mixer_list([str(HH_SAMPLE), "1.0"], ["train"])

    mix_times, tok_times, mix_cpu, tok_cpu = [], [], [], []
    for _ in range(ns.repeats):
        t, (pairs, _) = _timed(lambda: build_mix(entries, seed=0, skip_invalid=True))
        mix_times.append(t)
        mix_cpu.append(CPU[-1])
        t, (records, stats) = _timed(lambda: tokenize_pairs(tokenizer, pairs, ns.max_seq_length))  # noqa: B023
        tok_times.append(t)
        tok_cpu.append(CPU[-1])
    tokens = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in records)

    with tempfile.TemporaryDirectory() as cache_dir:
        args = TrainArguments(
            model_name_or_path="unused",
            mixer_list=[str(HH_SAMPLE), "1.0"],
            skip_invalid_rows=True,
            max_seq_length=ns.max_seq_length,
            dataset_local_cache_dir=cache_dir,
        )
        data = DataSettings.of(args)
        t_cold, cold = _timed(lambda: prepare_preference_data(data, tokenizer))
        t_warm, warm = _timed(lambda: prepare_preference_data(data, tokenizer))
        assert cold.statistics["cache"]["status"] == "written" and warm.statistics["cache"]["status"] == "loaded"

    median = statistics.median
    print(
        f"machine: {os.cpu_count()} CPU(s) visible, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"BPE tokenizer trained on the sample (vocab {len(tokenizer)}) in {t_train:.1f}s (not counted below)")
    print(
        f"{len(raw)} rows -> {len(pairs)} valid pairs -> {stats.kept} tokenized, {tokens} tokens, "
        f"max_seq_length {ns.max_seq_length}, template tulu"
    )
    print("\n| step | wall s | CPU s |\n|---|---|---|")
    print(
        f"| load + validate + mix (2,000 rows), median of {ns.repeats} | {median(mix_times):.2f} | "
        f"{median(mix_cpu):.2f} |"
    )
    print(
        f"| tokenize {len(pairs)} pairs ({tokens / median(tok_cpu) / 1e3:.0f}k tokens per CPU-second), "
        f"median of {ns.repeats} | {median(tok_times):.2f} | {median(tok_cpu):.2f} |"
    )
    print(
        f"| prepare_preference_data, cold (mix + tokenize + statistics + cache write) | {t_cold:.2f} | {CPU[-2]:.2f} |"
    )
    print(f"| prepare_preference_data, warm (cache hit) | {t_warm:.2f} | {CPU[-1]:.2f} |")


if __name__ == "__main__":
    main()
