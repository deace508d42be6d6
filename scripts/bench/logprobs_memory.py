"""Peak CPU memory of one forward+backward of the log-probs: full logits vs chunked, on a 128,256-token vocabulary.

    OMP_NUM_THREADS=1 python scripts/bench/logprobs_memory.py            # both variants, a markdown table
    python scripts/bench/logprobs_memory.py --variant chunked            # one measurement (what each child runs)

Each variant runs in a fresh subprocess. Peak = ``ru_maxrss`` after forward+backward minus ``ru_maxrss`` just before
it (model, batch and imports already resident), so it counts every tensor the step allocated, whatever allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 1024**3


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(variant: str, pairs: int, seq_len: int, prompt_len: int, vocab: int, hidden: int, chunk: int) -> dict:
    """Build the tiny Llama and batch, then run one forward+backward of ``variant``; returns the measurements."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from open_instruct.data.tokenize import IGNORE_INDEX
    from open_instruct.objectives.logprobs import sequence_logprobs

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).float()
    rows = 2 * pairs  # chosen and rejected in one concatenated forward
    input_ids = torch.randint(0, vocab, (rows, seq_len))
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :prompt_len] = IGNORE_INDEX  # the loss covers the replies only
    # warm up allocator and kernels on a small slice so one-time costs are not charged to the variant
    sequence_logprobs(
        model, input_ids[:1, :8], attention_mask[:1, :8], labels[:1, :8], impl=variant
    ).sums.sum().backward()
    model.zero_grad(set_to_none=False)
    before = _rss_bytes()
    start = time.perf_counter()
    lp = sequence_logprobs(model, input_ids, attention_mask, labels, impl=variant, chunk_size=chunk)
    lp.means.sum().backward()
    seconds = time.perf_counter() - start
    peak = _rss_bytes()
    return {
        "variant": variant,
        "peak_gib": (peak - before) / GIB,
        "baseline_gib": before / GIB,
        "seconds": seconds,
        "mean_logp": float(lp.means.detach().mean()),
        "label_tokens": int(lp.counts.sum()),
    }


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> None:
    """Run each variant in its own subprocess (or one variant with --variant) and print the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=("full", "chunked"), help="measure only this one, in this process")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--prompt_len", type=int, default=128, help="masked prompt tokens at the start of each row")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024, help="--logprob_chunk_size of the chunked variant")
    parser.add_argument(
        "--min_free_gib",
        type=float,
        default=20.0,
        help="refuse to start the full variant with less available memory than this",
    )
    args = parser.parse_args(argv)
    shape = {k: getattr(args, k) for k in ("pairs", "seq_len", "prompt_len", "vocab", "hidden", "chunk")}
    if args.variant:
        print(json.dumps(measure(args.variant, **shape)))
        return
    results = []
    for variant in ("chunked", "full"):
        if variant == "full" and _available_bytes() < args.min_free_gib * GIB:
            sys.exit(
                f"only {_available_bytes() / GIB:.1f} GiB available, the full variant wants "
                f"{args.min_free_gib} GiB (--min_free_gib); not starting it"
            )
        cmd = [sys.executable, __file__, "--variant", variant] + [f"--{k}={v}" for k, v in shape.items()]
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{variant}: {results[-1]}", file=sys.stderr)
    chunked, full = results
    print(
        f"batch {args.pairs} pairs x {args.seq_len} tokens (rows {2 * args.pairs}, {chunked['label_tokens']} label "
        f"tokens), vocab {args.vocab}, hidden {args.hidden}, 2 layers, fp32, chunk {args.chunk}\n"
    )
    print("| log-probs | peak memory of forward+backward (GiB) | time (s) | mean log-prob |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['peak_gib']:.2f} | {r['seconds']:.1f} | {r['mean_logp']:.6f} |")
    print(f"\nchunked / full peak: {chunked['peak_gib'] / full['peak_gib']:.3f}")


if __name__ == "__main__":
    main()
