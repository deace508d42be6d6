"""How peak memory and step time grow with sequence length and vocabulary: ours (default flags) and TRL, one run.

    OMP_NUM_THREADS=2 python scripts/bench/bench_scaling.py [--write BENCHMARKS.md]

Data: real HH-RLHF pairs (tests/fixtures/hh_rlhf_sample.jsonl.gz) are short (about 1.1k tokens at most), so each pair
of length L is one HH pair's last exchange (its chosen and rejected replies) after a history of whole user/assistant
turns joined from other HH conversations, until prompt + longer reply fills 85-100% of L tokens. Model: the tiny
Llama of compare_trl.py (hidden 256, 4 layers, 8 heads, fp32) with a byte-level BPE trained on the fixture; the
larger vocabularies only widen the embedding and output head. Every point runs the same number of tokens per step
(pairs per step = tokens_per_step / 2L), so memory per token and time per token compare directly across lengths.
Each (trainer, point) runs in a fresh subprocess: peak RSS above the process's own RSS after imports, and the mean
step time over the steps after the first. The predicted time is the FLOP count (6 x matmul parameters per token plus
attention as a causal kernel computes it, half of the square: open_instruct/training/perf.py, causal=True) at the
rate measured for ours at the first length.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

import compare_trl  # noqa: E402  (same folder: HH parsing, tokenizer, RSS helpers)

SLACK = 0.95  # fill pairs to at most this share of L: TRL tokenizes prompt and reply apart (a few tokens differ)


# ---------------------------------------------------------------------------------------------------------- inputs
def conversations() -> list[tuple[list[dict], dict, dict]]:
    """(history messages, chosen reply, rejected reply) of every usable HH pair, and whole alternating turns."""
    pairs = compare_trl.load_hh_pairs(10**6)
    return [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]


def exchanges(pairs: list[tuple[list[dict], dict, dict]]) -> list[list[dict]]:
    """(user, assistant) turn pairs of the chosen transcripts: the blocks that histories are joined from."""
    blocks = []
    for prompt, chosen, _ in pairs:
        turns = prompt + [chosen]
        for i in range(0, len(turns) - 1, 2):
            user, assistant = turns[i], turns[i + 1]
            if (
                user["role"] == "user"
                and assistant["role"] == "assistant"
                and user["content"]
                and assistant["content"]
            ):
                blocks.append([user, assistant])
    return blocks


def token_count(tokenizer, messages: list[dict]) -> int:
    """Tokens of ``messages`` rendered by the chat template (transformers 5 returns a BatchEncoding)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    return len(out["input_ids"] if hasattr(out, "keys") else out)


def joined_pairs(tokenizer, length: int, count: int, seed: int) -> list[dict]:
    """``count`` multi-turn pairs whose longer side is 85-100% x SLACK of ``length`` tokens."""
    rng = random.Random(seed)
    pairs = conversations()
    blocks = exchanges(pairs)
    cost = [token_count(tokenizer, b) for b in blocks]

    def size(messages: list[dict]) -> int:
        return token_count(tokenizer, messages)

    target = int(length * SLACK)
    out = []
    for prompt, chosen, rejected in rng.sample(pairs, len(pairs)):
        base = max(size(prompt + [chosen]), size(prompt + [rejected]))
        if base > target:
            continue
        history: list[dict] = []
        budget = target - base
        for j in rng.sample(range(len(blocks)), len(blocks)):
            if cost[j] <= budget:
                history += blocks[j]
                budget -= cost[j]
            if budget < 0.15 * target:
                break
        while history and max(size(history + prompt + [chosen]), size(history + prompt + [rejected])) > target:
            history = history[2:]
        if max(size(history + prompt + [chosen]), size(history + prompt + [rejected])) < 0.85 * target:
            continue
        out.append({"prompt": history + prompt, "chosen": chosen, "rejected": rejected})
        if len(out) == count:
            return out
    raise SystemExit(f"could not build {count} pairs of {length} tokens from the HH fixture")


def write_point(work: Path, tokenizer, length: int, pairs_per_step: int, steps: int) -> dict:
    """The pairs of one sequence length, in our messages format and TRL's conversational format."""
    pairs = joined_pairs(tokenizer, length, pairs_per_step * steps, seed=length)
    ours, trl = work / f"pairs_{length}_messages.jsonl", work / f"pairs_{length}_trl.jsonl"
    with ours.open("w") as a, trl.open("w") as b:
        for p in pairs:
            a.write(json.dumps({"chosen": p["prompt"] + [p["chosen"]], "rejected": p["prompt"] + [p["rejected"]]}))
            a.write("\n")
            b.write(json.dumps({"prompt": p["prompt"], "chosen": [p["chosen"]], "rejected": [p["rejected"]]}) + "\n")
    lengths = [token_count(tokenizer, p["prompt"] + [p[side]]) for p in pairs for side in ("chosen", "rejected")]
    return {"ours": str(ours), "trl": str(trl), "tokens": sum(lengths), "lengths": lengths}


def write_model(work: Path, tokenizer, vocab: int, max_positions: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = work / f"model_{vocab}"
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------------------- runs
def run_ours(model_dir: str, data: str, out: Path, length: int, batch: int, steps: int) -> dict:
    from open_instruct.config import TrainArguments, validate
    from open_instruct.dpo_tune_cache import run

    baseline = compare_trl._current_rss_mb()
    args = TrainArguments(
        model_name_or_path=model_dir,
        mixer_list=[data, "1.0"],
        max_seq_length=length,
        per_device_train_batch_size=batch,
        loss_type="dpo",
        beta=0.1,
        learning_rate=5e-7,
        warmup_ratio=0.0,
        seed=1,
        max_train_steps=steps,
        output_dir=str(out / "run"),
        reference_logprobs_cache_path=str(out / "refcache"),
        num_sample_prompts=0,  # TRL samples nothing: time the training alone
        dataset_local_cache_dir=str(out / "dscache"),
    )
    validate(args)
    run(args)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens = [b["token_count"] - a["token_count"] for a, b in zip([{"token_count": 0}] + rows, rows)]
    step_s = [t / r["perf/tokens_per_second_step"] for t, r in zip(tokens, rows)]
    return {"peak_mb": compare_trl._rss_mb() - baseline, "step_s": statistics.fmean(step_s[1:]), "steps": len(rows)}


def run_trl(model_dir: str, data: str, out: Path, length: int, batch: int, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    baseline = compare_trl._current_rss_mb()
    ends: list[float] = []

    config = DPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=batch,
        max_length=length,
        loss_type=["sigmoid"],
        beta=0.1,
        learning_rate=5e-7,
        warmup_steps=0,
        max_steps=steps,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=2 * batch,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[compare_trl.step_clock(ends)],
    )
    trainer.train()
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    return {"peak_mb": compare_trl._rss_mb() - baseline, "step_s": statistics.fmean(step_s[1:]), "steps": len(step_s)}


def child(argv: list[str]) -> None:
    """Subprocess entry: ``--child ours|trl MODEL DATA OUT LENGTH BATCH STEPS``."""
    if argv[0] == "ours":  # start as our command-line entry does, before torch is imported (training/host_memory.py)
        from open_instruct.training.host_memory import reexec_with_lean_malloc

        reexec_with_lean_malloc()
    import torch

    which, model_dir, data, out, length, batch, steps = argv
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    fn = run_ours if which == "ours" else run_trl
    result = fn(model_dir, data, Path(out), int(length), int(batch), int(steps))
    (Path(out) / "result.json").write_text(json.dumps(result))


def spawn(which: str, model_dir: str, data: str, out: Path, length: int, batch: int, steps: int, threads: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "HF_DATASETS_CACHE": str(out / "hf_datasets"),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, __file__, "--child", which, model_dir, data, str(out), str(length), str(batch), str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else f"rc {proc.returncode}"
        }
    return json.loads((out / "result.json").read_text())


# ---------------------------------------------------------------------------------------------------------- report
def flops_per_step(model_dir: str, lengths: list[int], pairs_per_step: int, total_pairs: int) -> float:
    """Training FLOPs of one average step (the policy's forward + backward over its real tokens)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from open_instruct.training.perf import matmul_parameters, training_flops

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = training_flops(
        matmul_parameters(model), config.num_hidden_layers, config.hidden_size, torch.tensor(lengths), causal=True
    )
    return total * pairs_per_step / total_pairs


def table(points: list[dict]) -> str:
    head = (
        "| axis | length | vocab | pairs/step | tokens/step | ours peak MB | TRL peak MB | ours/TRL mem "
        "| ours KB/token | ours s/step | TRL s/step | ours/TRL time | ours s / FLOP-predicted s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for p in points:
        o, t = p["ours"], p["trl"]

        def num(r: dict, key: str, fmt: str) -> str:
            return format(r[key], fmt) if key in r else "failed"

        mem = f"{o['peak_mb'] / t['peak_mb']:.2f}" if "peak_mb" in o and "peak_mb" in t else "-"
        speed = f"{o['step_s'] / t['step_s']:.2f}" if "step_s" in o and "step_s" in t else "-"
        per_token = f"{o['peak_mb'] * 1024 / p['tokens_per_step']:.0f}" if "peak_mb" in o else "-"
        predicted = f"{p['flop_ratio']:.2f}" if "flop_ratio" in p else "-"
        lines.append(
            f"| {p['axis']} | {p['length']:,} | {p['vocab']:,} | {p['pairs_per_step']} | {p['tokens_per_step']:,.0f} "
            f"| {num(o, 'peak_mb', '.0f')} | {num(t, 'peak_mb', '.0f')} | {mem} | {per_token} "
            f"| {num(o, 'step_s', '.2f')} | {num(t, 'step_s', '.2f')} | {speed} | {predicted} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, axis, key in ((0, "length", "length"), (1, "vocab", "vocab")):
        chosen = [p for p in points if p["axis"] == axis]
        xs = [p[key] for p in chosen]
        for row, metric, label in ((0, "peak_mb", "peak RSS above imports (MB)"), (1, "step_s", "s / step")):
            ax = axes[row][col]
            for who, style in (("ours", "o-"), ("trl", "s--")):
                ys = [p[who].get(metric, float("nan")) for p in chosen]
                ax.plot(xs, ys, style, label="ours (default flags)" if who == "ours" else "TRL DPOTrainer")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:,}" for x in xs])
            ax.set_xlabel("sequence length (tokens)" if axis == "length" else "vocabulary")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle("DPO cost vs sequence length (8k vocabulary) and vocabulary, same tokens per step")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


def write_section(path: Path, report: str, command: str, image: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = (
        f"## Scaling with sequence length and vocabulary\n\nCommand: `{command}`\n\n{report}\n![scaling]({image})\n"
    )
    pattern = re.compile(r"## Scaling with sequence length and vocabulary\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _: section.rstrip("\n") + "\n", text) if pattern.search(text) else text + "\n" + section
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[8192, 32768, 128256])
    parser.add_argument("--vocab_length", type=int, default=1024, help="Sequence length of the vocabulary axis.")
    parser.add_argument("--tokens_per_step", type=int, default=8192, help="Per step on the length axis.")
    parser.add_argument("--vocab_tokens_per_step", type=int, default=4096, help="Per step on the vocabulary axis.")
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps per run (the first is not timed).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_trl", action="store_true")
    parser.add_argument("--write", default=None, help="Markdown file that gets the table (and the PNG beside it).")
    args = parser.parse_args()
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    tokenizer = compare_trl.hh_tokenizer()
    max_positions = max(args.lengths + [args.vocab_length])
    models = {v: write_model(work, tokenizer, v, max_positions) for v in sorted({8192, *args.vocabs})}
    grid = [("length", n, 8192, args.tokens_per_step) for n in args.lengths]
    grid += [("vocab", args.vocab_length, v, args.vocab_tokens_per_step) for v in args.vocabs]
    data: dict[tuple[int, int], dict] = {}
    points = []
    for axis, length, vocab, tokens in grid:
        batch = max(1, tokens // (2 * length))
        if (length, batch) not in data:
            data[(length, batch)] = write_point(work, tokenizer, length, batch, args.steps)
        point = data[(length, batch)]
        name = f"{axis}_{length}_{vocab}"
        print(f"{name}: {batch} pairs/step", flush=True)
        ours = spawn(
            "ours", models[vocab], point["ours"], work / f"ours_{name}", length, batch, args.steps, args.threads
        )
        trl = (
            {}
            if args.skip_trl
            else spawn(
                "trl", models[vocab], point["trl"], work / f"trl_{name}", length, batch, args.steps, args.threads
            )
        )
        print(f"  ours {ours}\n  trl {trl}", flush=True)
        total_pairs = len(point["lengths"]) // 2
        flops = flops_per_step(models[vocab], point["lengths"], batch, total_pairs)
        points.append(
            {
                "axis": axis,
                "length": length,
                "vocab": vocab,
                "pairs_per_step": batch,
                "tokens_per_step": point["tokens"] * batch / total_pairs,
                "flops_per_step": flops,
                "ours": ours,
                "trl": trl,
            }
        )
    for axis in ("length", "vocab"):
        chosen = [p for p in points if p["axis"] == axis and "step_s" in p["ours"]]
        if chosen:
            rate = chosen[0]["flops_per_step"] / chosen[0]["ours"]["step_s"]  # FLOP/s of ours at the first point
            for p in chosen:
                p["flop_ratio"] = p["ours"]["step_s"] / (p["flops_per_step"] / rate)
    report = table(points)
    import torch
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if not args.skip_trl:
        versions += f", trl {__import__('trl').__version__}"
    report += (
        f"\nWhole benchmark: {time.perf_counter() - start:.0f} s, {args.threads} threads, {args.steps} steps per run "
        f"(first not timed), {versions}; load average at the end {os.getloadavg()[0]:.1f}.\n"
    )
    print(report)
    (work / "points.json").write_text(json.dumps(points, indent=1))
    print(f"points: {work / 'points.json'}")
    if args.write:
        target = Path(args.write)
        image = target.parent / "docs" / "scaling.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        plot(points, image)
        command = "OMP_NUM_THREADS=2 python scripts/bench/bench_scaling.py " + " ".join(sys.argv[1:])
        write_section(target, report, command.strip(), str(image.relative_to(target.parent)))


if __name__ == "__main__":
    main()
