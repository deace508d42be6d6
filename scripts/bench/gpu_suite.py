"""The GPU suite: one command on one H100/H200, about 7 minutes; ``--tiny`` runs the same plumbing on CPU (CI).

    bash scripts/bench/gpu_suite.sh                 # all parts, results under gpu_suite_out/
    bash scripts/bench/gpu_suite.sh --only train    # rerun one part; the report is rebuilt from every part's file
    python scripts/bench/gpu_suite.py --tiny        # CPU, tiny model, a few steps: checks the suite itself

Parts (each writes ``<out>/part_<name>.json``; every invocation ends by writing ``suite.json`` and ``suite.md``):
1. ``tests``: ``pytest -m gpu`` (Liger vs chunked in fp32 and bf16; packed vs padded per attention kernel; torch
   varlen / FlexAttention on the packed layout).
2. ``train``: a randomly initialised Llama-3.2-1B-shaped model (16 layers, hidden 2048, 128,256 vocabulary, built here,
   no hub) trained with our CLI for ``--steps`` steps on micro-batches of 4k (and 8k) tokens in bf16: the default
   layout and padded (``settings``), with and without ``--use_liger_kernel``, under ZeRO-2, ZeRO-3 and FSDP2; one
   process (torchrun) each, the first one profiled (``<run>/out/profile/top_ops_rank0.txt``).
3. ``trl``: TRL's DPOTrainer (precomputed reference, bf16; padding-free only with flash-attention installed, padded
   otherwise) on the same model and pairs, at the 4k budget's pairs per step, where TRL is installed.
4. ``report``: tokens/s, MFU (``perf/mfu_step``, and against a bf16 matmul measured here), peak
   ``torch.cuda.max_memory_allocated``, reference pairs/s.

Liger rows run Liger's model kernels and its fused log-probs on every engine: the kernel runs as the output layer's own
forward, where ZeRO-3 gathers and FSDP2 unshards the layer (open_instruct/objectives/fused_head.py). ZeRO-3 and FSDP2
each have a chunked twin (the same row without ``--use_liger_kernel``), so the report shows what the kernel changes.

On a short-lived GPU machine: ``scripts/bench/gpu_lease.sh DEST`` runs the parts in order of value, each under a time
cap, and copies the small results to DEST (the wheels of ``scripts/bench/gpu_wheels.sh download`` carried in .whl/).
``--rows`` runs chosen training rows only (a second, shorter call).

Numbers are medians over the steps after ``WARMUP`` steps. The pairs are synthetic (the word-level task tokenizer's
words at random, prompts 64-320 words, replies 64-400): throughput depends on token counts, not on their meaning.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from gpu_suite_report import part_report  # noqa: E402  (this folder is sys.path[0] when run as a script)

PARTS = ("tests", "train", "trl", "report")
WARMUP = 5  # the profiled row's profiler records steps 1-4
LLAMA_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
TINY = {**LLAMA_1B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY.update(num_attention_heads=4, num_key_value_heads=2)


def settings(tiny: bool) -> dict:
    """What each mode runs: the model shape, pairs, steps, and the grid of (token budget, layout, liger, engine).

    Layouts: ``default`` (no layout flag: on CUDA in bf16, packed rows under ``torch_varlen``), ``varlen`` (the same,
    asked for: ``--packing --attn_implementation torch_varlen``), ``packed`` (``--packing``: the packed path's own
    kernel choice), ``padded`` (``--packing false``, grouped by length). The first row is the one profiled
    (``--profiling``). The first lease (BENCHMARKS.md) measured each layout; this grid keeps what the next one needs.
    Each row costs 45-70 s on an H200 (start, imports, 1B load, reference pass, steps, final save).
    """
    if tiny:  # torch_varlen needs CUDA: the CPU check runs the other two layouts
        return {
            "shape": TINY,
            "pairs": 48,
            "lengths": (8, 40),
            "steps": 6,  # the profiled row needs 4
            "grid": [(256, "packed", False, "zero2"), (256, "padded", True, "zero3"), (256, "packed", False, "fsdp2")],
            "trl_budget": 256,
            "run_timeout_s": 300,
        }
    grid = [(4096, "default", True, "zero2"), (4096, "default", True, "fsdp2"), (4096, "padded", True, "zero2")]
    grid += [(4096, "default", False, "zero2"), (4096, "default", True, "zero3"), (8192, "default", True, "zero2")]
    grid += [(4096, "default", False, "zero3"), (4096, "default", False, "fsdp2")]  # the Liger rows' chunked twins
    return {
        "shape": LLAMA_1B,
        "pairs": 256,
        "lengths": (64, 400),
        "steps": 14,
        "grid": grid,
        "trl_budget": 4096,
        "run_timeout_s": 150,
    }


# ------------------------------------------------------------------------------------------------------ inputs
def build_inputs(out: Path, cfg: dict) -> tuple[Path, Path, Path]:
    """(model folder, our pairs jsonl, TRL's pairs jsonl), written once per output folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from open_instruct.data.synthetic import FILLER, NUMBERS, WORDS, build_tokenizer

    model_dir, ours, trl = out / "model", out / "pairs.jsonl", out / "pairs_trl.jsonl"
    if not model_dir.exists():
        tokenizer = build_tokenizer()
        config = LlamaConfig(
            **cfg["shape"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        tmp = out / "model.tmp"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(model_dir)
        del model
    if not ours.exists():
        rng, vocab = random.Random(0), list(WORDS) + NUMBERS + FILLER
        low, high = cfg["lengths"]

        def text(n: int) -> str:
            return " ".join(rng.choice(vocab) for _ in range(n))

        with ours.open("w") as a, trl.open("w") as b:
            for _ in range(cfg["pairs"]):
                prompt = [{"role": "user", "content": text(rng.randint(low, max(low, high * 4 // 5)))}]
                chosen = {"role": "assistant", "content": text(rng.randint(low, high))}
                rejected = {"role": "assistant", "content": text(rng.randint(low, high))}
                a.write(json.dumps({"chosen": prompt + [chosen], "rejected": prompt + [rejected]}) + "\n")
                b.write(json.dumps({"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}) + "\n")
    return model_dir, ours, trl


def child_env(out: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "HF_DATASETS_CACHE": str(out / "hf_datasets"),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_memory_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------------------ part 1
def part_tests(out: Path, tiny: bool) -> dict:
    """``pytest -m gpu`` over tests/model/test_gpu_paths.py; on CPU (tiny) they are collected and skipped."""
    start = time.perf_counter()
    report = out / "gpu_tests.xml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "-rs",
            "tests/model/test_gpu_paths.py",
            f"--junitxml={report}",
        ],
        cwd=ROOT,
        env=child_env(out),
        capture_output=True,
        text=True,
    )
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(proc.stdout[-3000:])
    return {"returncode": proc.returncode, "summary": summary, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------------ part 2
def run_name(budget: int, layout: str, liger: bool, engine: str) -> str:
    return f"ours_{budget}_{layout}_{'liger' if liger else 'chunked'}_{engine}"


LAYOUT_FLAGS = {
    "default": [],
    "varlen": ["--packing", "--attn_implementation", "torch_varlen"],
    "packed": ["--packing"],
    "padded": ["--packing", "false"],
}


def engine_flags(engine: str) -> list[str]:
    """``zero2`` / ``zero3``: DeepSpeed ZeRO at that stage; ``fsdp2``: FSDP2 (one shard per process)."""
    return ["--fsdp"] if engine == "fsdp2" else ["--zero_stage", engine.removeprefix("zero")]


def train_flags(
    model: Path, data: Path, run_dir: Path, budget: int, layout: str, liger: bool, engine: str, steps: int
) -> list[str]:
    flags = [
        "--model_name_or_path", str(model),
        "--mixer_list", str(data), "1.0",
        "--max_seq_length", "2048",
        "--max_tokens_per_batch", str(budget),
        "--per_device_train_batch_size", "1",
        "--max_train_steps", str(steps),
        "--learning_rate", "1e-6",
        "--warmup_ratio", "0",
        "--loss_type", "dpo_norm",
        "--mixed_precision", "bf16",
        "--logging_steps", "1",
        "--seed", "1",
        "--output_dir", str(run_dir / "out"),
        "--reference_logprobs_cache_path", str(run_dir / "reference_cache"),
        "--dataset_local_cache_dir", str(run_dir.parent / "dataset_cache"),
        "--reference_batch_size", "8",
    ]  # fmt: skip
    return flags + LAYOUT_FLAGS[layout] + engine_flags(engine) + (["--use_liger_kernel"] if liger else [])


def parse_row(text: str) -> tuple[int, str, bool, str]:
    """``4096/varlen/liger/zero2`` -> (4096, "varlen", True, "zero2")."""
    budget, layout, kernel, engine = text.strip().split("/")
    if layout not in LAYOUT_FLAGS or kernel not in ("liger", "chunked") or engine not in ("zero2", "zero3", "fsdp2"):
        raise SystemExit(f"error: --rows: bad row {text!r} (BUDGET/LAYOUT/liger|chunked/zero2|zero3|fsdp2)")
    return int(budget), layout, kernel == "liger", engine


def child_train(argv: list[str]) -> None:
    """Inside torchrun: our CLI's run, timing the reference pass; writes ``child.json`` beside the run."""
    from open_instruct.config import validate
    from open_instruct.config.cli import parse_args
    from open_instruct.dpo_tune_cache import run
    from open_instruct.training import reference_cache
    from open_instruct.training.recipe import preflight

    compute, timing = reference_cache.compute, {}

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = compute(*args, **kwargs)
        timing["reference_s"], timing["reference_pairs"] = time.perf_counter() - start, kwargs.get("rows", args[4])
        return result

    reference_cache.compute = timed
    args = parse_args(argv)
    validate(args)
    preflight(args)
    start = time.perf_counter()
    out = run(args)
    if int(os.environ.get("RANK", "0")) == 0:
        result = {**timing, "run_s": time.perf_counter() - start, "peak_memory_gib": peak_memory_gib()}
        (Path(out).parent / "child.json").write_text(json.dumps(result))


def summarize_run(run_dir: Path) -> dict:
    """Medians after warm-up from metrics.jsonl, plus what the child measured."""
    rows = [json.loads(line) for line in (run_dir / "out" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in rows if "perf/tokens_per_second_step" in r][WARMUP:] or rows
    child = json.loads((run_dir / "child.json").read_text())

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    pairs = child.get("reference_pairs")
    return {
        "steps": len(rows),
        "tokens_per_s": median("perf/tokens_per_second_step"),
        "mfu": median("perf/mfu_step"),
        "peak_memory_gib": child["peak_memory_gib"],
        "reference_pairs_per_s": pairs / child["reference_s"] if pairs and child.get("reference_s") else None,
        "final_loss": rows[-1].get("train_loss") if rows else None,
        "run_s": child["run_s"],
    }


def run_row(out: Path, model: Path, data: Path, row: tuple, steps: int, limit_s: int, profile: bool) -> dict:
    """One training run under torchrun, its output streamed to ``<out>/<name>.log`` (kept when it is cut off)."""
    budget, layout, liger, engine = row
    name = run_name(*row)
    run_dir, log = out / name, out / f"{name}.log"
    flags = train_flags(model, data, run_dir, budget, layout, liger, engine, steps) + (
        ["--profiling"] if profile else []
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
        "--master_port", str(free_port()), __file__, "--child-train", *flags,
    ]  # fmt: skip
    start = time.perf_counter()
    with log.open("w") as sink:
        try:
            proc = subprocess.run(
                command, cwd=ROOT, env=child_env(out), stdout=sink, stderr=subprocess.STDOUT, timeout=limit_s
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        why = f"timed out after {limit_s} s" if code is None else f"exit code {code}"
        tail = log.read_text()[-1500:]
        print(f"{name}: FAILED ({why}); log {log}\n{tail}", flush=True)
        return {"error": f"{why}: {tail}"}
    result = {"budget": budget, "layout": layout, "liger": liger, "engine": engine}
    result.update(summarize_run(run_dir), wall_s=time.perf_counter() - start)
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def part_train(out: Path, cfg: dict, steps: int) -> dict:
    """Every row of the grid in turn, the first one profiled; ``part_train.json`` is rewritten after each row, so
    the rows done survive a cut-off part."""
    model, data, _ = build_inputs(out, cfg)
    results = {}
    for index, row in enumerate(cfg["grid"]):
        results[run_name(*row)] = run_row(out, model, data, row, steps, cfg["run_timeout_s"], profile=index == 0)
        (out / "part_train.json").write_text(json.dumps(results, indent=2))
    return results


# ------------------------------------------------------------------------------------------------------ part 3
def part_trl(out: Path, cfg: dict, steps: int) -> dict:
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "trl is not installed"}
    model, _, trl_data = build_inputs(out, cfg)
    command = [sys.executable, str(Path(__file__).with_name("gpu_suite_trl.py")), str(model), str(trl_data), str(out)]
    proc = subprocess.run(
        [*command, str(cfg["trl_budget"]), str(steps)], cwd=ROOT, env=child_env(out), capture_output=True, text=True
    )
    (out / "trl.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"trl: FAILED; log {out / 'trl.log'}\n{proc.stderr[-2000:]}", flush=True)
        return {f"trl_{cfg['trl_budget']}": {"error": (proc.stderr or proc.stdout)[-1500:]}}
    result = json.loads((out / "trl.json").read_text())
    print(f"trl: {json.dumps(result)}", flush=True)
    return {f"trl_{cfg['trl_budget']}": result}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-train"]:
        child_train(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=PARTS, help="Run one part (the report is always rebuilt).")
    parser.add_argument("--tiny", "--dry-run", action="store_true", help="CPU, tiny model, a few steps (CI).")
    parser.add_argument("--out", default=None, help="Output folder (default gpu_suite_out/, tiny: gpu_suite_tiny/).")
    parser.add_argument("--steps", type=int, default=None, help="Training steps per run (default 14; tiny 6).")
    parser.add_argument(
        "--rows",
        default=None,
        help="Training runs in place of the grid, comma-separated BUDGET/LAYOUT/liger|chunked/ENGINE "
        "(e.g. 4096/default/liger/zero2,4096/varlen/liger/fsdp2); LAYOUT: " + ", ".join(LAYOUT_FLAGS),
    )
    args = parser.parse_args(argv)
    cfg = settings(args.tiny)
    if args.rows:
        cfg["grid"] = [parse_row(row) for row in args.rows.split(",")]
    steps = args.steps or cfg["steps"]
    out = Path(args.out or ROOT / ("gpu_suite_tiny" if args.tiny else "gpu_suite_out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    failed = False
    parts = PARTS[:-1] if args.only is None else [p for p in (args.only,) if p != "report"]
    for part in parts:
        start = time.perf_counter()
        print(f"== part {part}", flush=True)
        if part == "tests":
            result = part_tests(out, args.tiny)
            failed |= result["returncode"] not in (0, 5)  # 5: nothing collected
        elif part == "train":
            result = part_train(out, cfg, steps)
            failed |= any("error" in r for r in result.values())
        else:
            result = part_trl(out, cfg, steps)
            failed |= any(isinstance(r, dict) and "error" in r for r in result.values())
        (out / f"part_{part}.json").write_text(json.dumps(result, indent=2))
        print(f"== part {part}: {time.perf_counter() - start:.0f}s", flush=True)
    part_report(out, cfg)
    print(f"wrote {out / 'suite.json'} and {out / 'suite.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
