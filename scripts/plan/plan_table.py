"""The plan table of docs/planning.md: Tulu 3 8B and 70B DPO at 2k tokens on 1, 4 and 16 nodes of 8 H100-80GB, ZeRO-2 vs ZeRO-3
vs ZeRO-3 with the optimizer offloaded, each row the plan ``--dry_run`` prints for that command (offline: the model
configs shipped under configs/models/, the Tulu 3 8B preference mixture's 272,898 pairs given as its size).

    python scripts/plan/plan_table.py > table.md
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from open_instruct.config import settings_of, validate  # noqa: E402
from open_instruct.config.cli import parse_args  # noqa: E402
from open_instruct.plan.check import dry_run  # noqa: E402

GLOBAL_BATCH = 128
PAIRS = 272_898  # allenai/llama-3.1-tulu-3-8b-preference-mixture, train split
ENGINES = {
    "ZeRO-2": ["--zero_stage", "2"],
    "ZeRO-3": ["--zero_stage", "3"],
    "ZeRO-3 + offload": ["--zero_stage", "3", "--offload_optimizer"],
}


COMMON = ["--dry_run", "--dry_run_gpu", "H100-80GB", "--dry_run_num_pairs", str(PAIRS), "--mixed_precision", "bf16"]


def varying_flags(nodes: int, engine: str) -> list[str]:
    """The flags that change from row to row (the global batch stays 128 pairs)."""
    gpus = 8 * nodes
    return [
        *("--dry_run_num_nodes", str(nodes), "--dry_run_num_processes", str(gpus)),
        *("--gradient_accumulation_steps", str(GLOBAL_BATCH // gpus), *ENGINES[engine]),
    ]


def plan_row(model: str, nodes: int, engine: str) -> tuple[list[str], object]:
    flags = varying_flags(nodes, engine)
    args = parse_args([f"configs/train_configs/tulu3/dpo_{model}.yaml", *COMMON, *flags])
    validate(args)
    with contextlib.redirect_stdout(io.StringIO()):
        plan = dry_run(settings_of(args))
    return flags, plan


def hours(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds / 3600:.1f} h"


def main() -> None:
    os.chdir(ROOT)
    print(
        "Command: `python open_instruct/dpo_tune_cache.py configs/train_configs/tulu3/dpo_<8b|70b>.yaml "
        + " ".join(COMMON)
        + " <flags>`\n"
    )
    print(
        "| model | GPUs | engine | weights+grads+optimizer | activations+log-probs | peak GiB/GPU | fits 80 GB | "
        "step | total | flags |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- |")
    for model in ("8b", "70b"):
        for nodes in (1, 4, 16):
            for engine in ENGINES:
                flags, plan = plan_row(model, nodes, engine)
                step = max(plan.phases, key=lambda p: p.total).parts
                states = sum(step.get(k, 0) for k in ("parameters", "gradients", "optimizer states"))
                work = sum(step.get(k, 0) for k in ("activations", "log-prob chunk"))
                print(
                    f"| Tulu 3 {model.upper()} | {nodes} x 8 | {engine} | {states / 2**30:.1f} | {work / 2**30:.1f} | "
                    f"{plan.peak / 2**30:.1f} | {'yes' if plan.fits() else 'no'} | {plan.time.step_seconds:.1f} s | "
                    f"{hours(plan.time.total_seconds)} | `{' '.join(flags)}` |"
                )


if __name__ == "__main__":
    main()
