"""AdamW on CPU: torch's fused kernel against the unfused per-parameter step, on a model's parameter shapes.

python scripts/bench/bench_adamw.py [--vocab 128256 --hidden 256 --layers 4 --steps 5]

Each kernel runs in a fresh subprocess on the same parameters and gradients (a Llama-shaped set: untied embedding and
output layer of [vocab, hidden], and per layer four attention and three MLP matrices with the MLP 4x wide). It
prints the steady step time, how far the resident set rose above its level before the steps (the step's own
temporaries), and the largest difference between the two kernels' weights after the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_trl  # noqa: E402  (same folder: the resident-set helpers)


def _shapes(vocab: int, hidden: int, layers: int) -> list[tuple[int, ...]]:
    per_layer = [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden)]
    return [(vocab, hidden), (vocab, hidden)] + per_layer * layers + [(hidden,)] * (2 * layers + 1)


def child(kernel: str, vocab: int, hidden: int, layers: int, steps: int, out: str) -> dict:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02) for shape in _shapes(vocab, hidden, layers)]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True if kernel == "fused" else None)
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad
    optimizer.step()  # the moments exist from here on
    before = compare_trl._current_rss_mb()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    seconds = (time.perf_counter() - start) / steps
    peak = compare_trl._rss_mb()
    torch.save([p.detach() for p in params[:2]], os.path.join(out, f"{kernel}.pt"))
    return {
        "kernel": kernel,
        "step_s": seconds,
        "rise_mb": max(0.0, peak - before),
        "params_m": sum(p.numel() for p in params) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.vocab, a.hidden, a.layers, a.steps, a.out)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for kernel in ("unfused", "fused"):
            argv = [sys.executable, __file__, "--child", kernel, "--out", out, *sys.argv[1:]]
            rows.append(json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout))
        unfused, fused = (torch.load(os.path.join(out, f"{k}.pt")) for k in ("unfused", "fused"))
    diff = max(float((x - y).abs().max()) for x, y in zip(unfused, fused, strict=True))
    print(f"{rows[0]['params_m']:.1f}M parameters, {a.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| AdamW kernel | step s | resident set rise during the steps MB |\n| --- | --- | --- |")
    for row in rows:
        print(f"| {row['kernel']} | {row['step_s']:.3f} | {row['rise_mb']:.0f} |")
    print(f"largest weight difference between the kernels (embedding and output layer): {diff:.2e}")


if __name__ == "__main__":
    main()
