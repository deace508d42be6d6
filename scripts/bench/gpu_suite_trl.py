"""TRL's DPOTrainer on the GPU suite's model and pairs (part ``trl`` of scripts/bench/gpu_suite.py); writes trl.json.

    python scripts/bench/gpu_suite_trl.py MODEL_DIR PAIRS_TRL.jsonl OUT_DIR TOKEN_BUDGET STEPS

Pairs per step: the token budget over the mean tokens of a pair, so both trainers see about as many tokens per step.
Tokens/s and MFU use our FLOP count (open_instruct/training/perf.py) on those mean lengths.
"""

from __future__ import annotations

import inspect
import json
import statistics
import sys
import time
from pathlib import Path

from gpu_suite import WARMUP, peak_memory_gib  # this folder is sys.path[0] when run as a script


def trl_options(out: str, batch: int, steps: int, cuda: bool, flash: bool) -> dict:
    """DPOConfig keywords: sigmoid DPO, precomputed reference, bf16 on GPUs; padding-free only with flash-attention,
    the only kernels with which TRL isolates packed sequences."""
    from trl import DPOConfig

    options = {
        "output_dir": str(Path(out) / "trl_run"),
        "per_device_train_batch_size": batch,
        "max_length": 2048,
        "loss_type": ["sigmoid"],
        "beta": 0.1,
        "learning_rate": 1e-6,
        "max_steps": steps,
        "precompute_ref_log_probs": True,
        "precompute_ref_batch_size": 8,
        "use_cpu": not cuda,
        "bf16": cuda,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 1,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    if "padding_free" in inspect.signature(DPOConfig).parameters:
        options["padding_free"] = flash
    return options


def mean_side_tokens(tokenizer, rows: list[dict]) -> float:
    """Mean tokens of one side of a pair (prompt + reply, chat template applied), over the first 64 pairs."""
    return statistics.fmean(
        len(tokenizer(tokenizer.apply_chat_template(r["prompt"] + r[side], tokenize=False))["input_ids"])
        for r in rows[:64]
        for side in ("chosen", "rejected")
    )


def child_trl(model_dir: str, data: str, out: str, budget: str, steps: str) -> None:
    """Train with TRL, time its steps and reference pass, write ``<out>/trl.json``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import is_flash_attn_2_available
    from trl import DPOConfig, DPOTrainer

    from open_instruct.training.perf import FlopCounter, mfu, peak_flops

    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    side_tokens = mean_side_tokens(tokenizer, rows)
    batch = max(1, round(int(budget) / (2 * side_tokens)))  # pairs per step at our token budget
    cuda = torch.cuda.is_available()
    flash = cuda and is_flash_attn_2_available()
    options = trl_options(out, batch, int(steps), cuda, flash)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times[-1] = time.perf_counter() - times[-1]

    precompute, ref = DPOTrainer._precompute_ref_logps, {}

    def timed(self, *a, **k):
        start = time.perf_counter()
        result = precompute(self, *a, **k)
        ref["seconds"] = time.perf_counter() - start
        return result

    DPOTrainer._precompute_ref_logps = timed
    attn = "flash_attention_2" if flash else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    counter = FlopCounter(model)
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(**options),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    step_s = statistics.median(times[WARMUP:] or times)
    flops = counter({"attention_mask": torch.ones(2 * batch, round(side_tokens))})
    peak = peak_flops("cuda") if cuda else None
    result = {
        "budget": int(budget),
        "pairs_per_step": batch,
        "steps": len(times),
        "tokens_per_s": 2 * side_tokens * batch / step_s,
        "mfu": mfu(flops, step_s, peak) if peak else None,
        "peak_memory_gib": peak_memory_gib(),
        "reference_pairs_per_s": len(rows) / ref["seconds"] if ref.get("seconds") else None,
        "padding_free": options.get("padding_free", False),
    }
    (Path(out) / "trl.json").write_text(json.dumps(result))


if __name__ == "__main__":
    child_trl(*sys.argv[1:])
