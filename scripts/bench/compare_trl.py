"""This project's DPO against TRL's DPOTrainer, in one run, on the same machine, data, model and settings.

    OMP_NUM_THREADS=2 python scripts/bench/compare_trl.py [--pairs 256] [--write BENCHMARKS.md]

Inputs shared by both: 256 HH-RLHF (harmless-base) pairs from the repository's fixture, a byte-level BPE tokenizer trained
on that sample, a freshly initialised tiny Llama (hidden 256, 4 layers, 8 heads), per-device batch 8, max length 512,
sigmoid DPO with beta 0.1, fp32, a precomputed reference (batch 16 for both), 2 threads. Each trainer runs in its own
subprocess so peak resident memory is its own. A second row repeats both with a 128,256-token vocabulary (fewer
optimizer steps and pairs so the whole run stays near 15 minutes on 2 CPU cores; the table says how many).

Also measured in our subprocess: our DPO step time over a plain causal-LM forward+backward+AdamW step on the same
packed real tokens (transformers' own loss over full logits), and our reference pass over a plain no-grad forward
(full logits) over the same reference batches. ``--profile`` adds a torch.profiler table of our training step.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# 411 real HH-RLHF (harmless-base) pairs shipped with the repository (tests/fixtures/NOTICE).
HH_SAMPLE = ROOT / "tests" / "fixtures" / "hh_rlhf_sample.jsonl.gz"
WARMUP_STEPS = 2
_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_clock(ends: list[float]):
    """A TRL/transformers callback that appends ``time.perf_counter()`` at the start of training and after each step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    return StepClock()


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------------------------------------- inputs
def hh_to_messages(text: str) -> list[dict[str, str]]:
    """An HH transcript (``\\n\\nHuman: ...\\n\\nAssistant: ...``) as chat messages. Local stand-in: the project's
    own HH parser (open_instruct/data/formats.py) had not landed when this benchmark was written."""
    parts = _TURN.split(text)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def load_hh_pairs(n: int) -> list[dict]:
    """The first ``n`` usable HH pairs as {prompt: [msgs], chosen: msg, rejected: msg}."""
    pairs = []
    with gzip.open(HH_SAMPLE, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            chosen, rejected = hh_to_messages(row["chosen"]), hh_to_messages(row["rejected"])
            if (
                len(chosen) < 2
                or chosen[:-1] != rejected[:-1]
                or chosen[-1]["role"] != "assistant"
                or rejected[-1]["role"] != "assistant"
                or not chosen[-1]["content"]
                or not rejected[-1]["content"]
            ):
                continue
            pairs.append({"prompt": chosen[:-1], "chosen": chosen[-1], "rejected": rejected[-1]})
            if len(pairs) == n:
                break
    return pairs


def hh_tokenizer(vocab_size: int = 8192):
    """A byte-level BPE trained on the HH sample (nothing is downloaded), with our chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from open_instruct.data.synthetic import CHAT_TEMPLATE

    texts = []
    with gzip.open(HH_SAMPLE, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    special = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_pairs(work: Path, n_pairs: int) -> tuple[str, str, int]:
    """The first ``n_pairs`` usable HH pairs, in our messages format and in TRL's conversational format: (our file,
    TRL's file, pairs written)."""
    work.mkdir(parents=True, exist_ok=True)
    pairs = load_hh_pairs(n_pairs)
    ours, trl = work / "pairs_messages.jsonl", work / "pairs_trl.jsonl"
    with ours.open("w") as a, trl.open("w") as b:
        for p in pairs:
            a.write(
                json.dumps({"chosen": p["prompt"] + [p["chosen"]], "rejected": p["prompt"] + [p["rejected"]]}) + "\n"
            )
            b.write(json.dumps({"prompt": p["prompt"], "chosen": [p["chosen"]], "rejected": [p["rejected"]]}) + "\n")
    return str(ours), str(trl), len(pairs)


def build_inputs(work: Path, n_pairs: int, vocab_sizes: list[int]) -> dict:
    """Write the pairs (our messages jsonl + TRL's conversational jsonl), the tokenizer and one model per vocab."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ours, trl, n_written = write_pairs(work, n_pairs)
    tokenizer = hh_tokenizer()
    models_by_vocab = {}
    for vocab in vocab_sizes:
        import torch

        folder = work / f"model_{vocab}"
        config = LlamaConfig(
            vocab_size=max(vocab, len(tokenizer)),
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        models_by_vocab[vocab] = str(folder)
    return {"ours_data": ours, "trl_data": trl, "models": models_by_vocab, "pairs": n_written}


# ---------------------------------------------------------------------------------------------------------- ours
def run_ours(model_dir: str, data: str, out: Path, max_steps: int | None, profile: bool) -> dict:
    """Train with this project's recipe at its default flags (the run picks its batch layout), then time the plain
    baselines on the same tokens."""

    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (imported before the clock, as TRL's are)

    from open_instruct.config import TrainArguments, validate
    from open_instruct.dpo_tune_cache import run
    from open_instruct.training import reference_cache

    baseline_rss = _current_rss_mb()
    timings: dict[str, float] = {}
    compute = reference_cache.compute

    def timed_compute(*a, **k):
        start = time.perf_counter()
        result = compute(*a, **k)
        timings["reference_s"] = time.perf_counter() - start
        return result

    reference_cache.compute = timed_compute
    args = TrainArguments(
        model_name_or_path=model_dir,
        mixer_list=[data, "1.0"],
        max_seq_length=512,
        per_device_train_batch_size=8,
        loss_type="dpo",
        beta=0.1,
        learning_rate=5e-7,
        warmup_ratio=0.0,
        seed=1,
        max_train_steps=max_steps,
        output_dir=str(out / "run"),
        reference_logprobs_cache_path=str(out / "refcache"),
        num_sample_prompts=0,  # TRL samples nothing: time the training alone
        reference_batch_size=16,
    )
    validate(args)
    start = time.perf_counter()
    run(args)
    end_to_end = time.perf_counter() - start
    peak = _rss_mb()
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    step_tokens = [b["token_count"] - a["token_count"] for a, b in zip([{"token_count": 0}] + rows, rows)]
    step_s = [t / r["perf/tokens_per_second_step"] for t, r in zip(step_tokens, rows)]
    result = {
        "end_to_end_s": end_to_end,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline_rss,
        "steps": len(rows),
        "step_s": statistics.fmean(step_s[WARMUP_STEPS:]),
        "train_tokens": rows[-1]["token_count"],
        "train_s": sum(step_s),
        "reference_s": timings["reference_s"],
        "step_tokens_steady": statistics.fmean(step_tokens[WARMUP_STEPS:]),
    }
    if os.environ.get("COMPARE_TRL_BASELINES", "1") == "1":  # real_model_vs_trl.py leaves them out
        result.update(plain_baselines(model_dir, data, len(rows), out, profile))
    return result


def plain_baselines(model_dir: str, data: str, steps: int, out: Path, profile: bool) -> dict:
    """Plain causal-LM fwd+bwd+step and plain no-grad forward over the same packed batches as our run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from open_instruct.config import TrainArguments
    from open_instruct.data.prepare import prepare_preference_data
    from open_instruct.data.sampler import pair_dataloader
    from open_instruct.model.packing import packed_forward_kwargs, prepare_model_for_packing
    from open_instruct.settings import DataSettings

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = TrainArguments(
        model_name_or_path=model_dir,
        mixer_list=[data, "1.0"],
        max_seq_length=512,
        seed=1,
        reference_logprobs_cache_path=str(out / "unused"),
    )
    records = prepare_preference_data(DataSettings.of(args), tokenizer).records
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    prepare_model_for_packing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-7)
    torch.manual_seed(1)
    train = list(pair_dataloader(records, tokenizer.pad_token_id, 8, seed=1, packing=True))[:steps]
    times = []
    model.train()
    for batch in train:
        start = time.perf_counter()
        loss = model(
            input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False, **packed_forward_kwargs(batch)
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for batch in pair_dataloader(records, tokenizer.pad_token_id, 16, seed=1, packing=True, shuffle=False):
            model(input_ids=batch["input_ids"], use_cache=False, **packed_forward_kwargs(batch))
    forward_s = time.perf_counter() - start
    result = {"plain_step_s": statistics.fmean(times[WARMUP_STEPS:]), "plain_forward_s": forward_s}
    if profile:
        result["profile"] = profile_our_step(model, train[WARMUP_STEPS : WARMUP_STEPS + 3])
    return result


def profile_our_step(model, batches) -> str:
    """torch.profiler table (top operators by total CPU time) of our packed DPO step on a few batches."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from open_instruct.model.packing import packed_sequence_logprobs
    from open_instruct.objectives.losses import LossSettings, PreferenceLogps, sigmoid_dpo

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-7)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            lp = packed_sequence_logprobs(model, batch)
            half = lp.sums.shape[0] // 2
            zeros = torch.zeros(half)
            loss = sigmoid_dpo(
                PreferenceLogps(lp.sums[:half], lp.sums[half:], zeros, zeros), LossSettings(beta=0.1)
            ).losses.mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=18)


# ---------------------------------------------------------------------------------------------------------- TRL
def run_trl(model_dir: str, data: str, out: Path, max_steps: int | None) -> dict:
    """Train with TRL's DPOTrainer (precomputed reference) on the same pairs and model."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    baseline_rss = _current_rss_mb()
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    timings: dict[str, float] = {}
    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **k):
        start = time.perf_counter()
        result = precompute(self, *a, **k)
        timings["reference_s"] = time.perf_counter() - start
        return result

    DPOTrainer._precompute_ref_logps = timed_precompute
    step_ends: list[float] = []

    config = DPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_length=512,
        loss_type=["sigmoid"],
        beta=0.1,
        learning_rate=5e-7,
        warmup_steps=0,
        num_train_epochs=1,
        max_steps=max_steps or -1,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=16,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[step_clock(step_ends)],
    )
    trainer.train()
    end_to_end = time.perf_counter() - start
    step_s = [b - a for a, b in zip(step_ends, step_ends[1:])]
    lengths = [
        min(len(r["prompt_ids"]) + len(r["chosen_ids"]), 512) + min(len(r["prompt_ids"]) + len(r["rejected_ids"]), 512)
        for r in trainer.train_dataset
    ]
    steps = len(step_s)
    tokens = sum(lengths) * steps * 8 / max(len(lengths), 1)  # expected real tokens over the steps run
    return {
        "end_to_end_s": end_to_end,
        "peak_rss_mb": _rss_mb(),
        "baseline_rss_mb": baseline_rss,
        "steps": steps,
        "step_s": statistics.fmean(step_s[WARMUP_STEPS:]),
        "train_s": sum(step_s),
        "train_tokens": tokens,
        "reference_s": timings.get("reference_s", float("nan")),
    }


# ---------------------------------------------------------------------------------------------------------- report
def child(argv: list[str]) -> None:
    """Subprocess entry: ``--child ours|trl MODEL DATA OUT MAX_STEPS PROFILE``."""
    if argv[0] == "ours":  # start as our command-line entry does, before torch is imported (training/host_memory.py)
        from open_instruct.training.host_memory import reexec_with_lean_malloc

        reexec_with_lean_malloc()
    import torch

    which, model_dir, data, out, max_steps, profile = argv
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    steps = int(max_steps) or None
    fn = (
        run_ours(model_dir, data, Path(out), steps, profile == "1")
        if which == "ours"
        else run_trl(model_dir, data, Path(out), steps)
    )
    (Path(out) / f"{which}.json").write_text(json.dumps(fn))


def spawn(
    which: str, model_dir: str, data: str, out: Path, max_steps: int | None, profile: bool, threads: int
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "HF_DATASETS_CACHE": str(out / "hf_datasets"),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [
        sys.executable,
        __file__,
        "--child",
        which,
        model_dir,
        data,
        str(out),
        str(max_steps or 0),
        str(int(profile)),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{which} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads((out / f"{which}.json").read_text())
    print(f"  {which}: done in {time.perf_counter() - start:.0f}s", flush=True)
    return result


def table(rows: list[tuple[str, dict, dict, int]]) -> str:
    """Markdown table: one line per (vocab row, trainer), with ours/TRL ratios."""
    head = (
        "| vocab | pairs x steps | trainer | s/step (steady) | end-to-end s | reference pass s | peak RSS MB "
        "| peak RSS above imports MB | tokens/s (train) |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for label, ours, trl, pairs in rows:
        for name, r in (("ours (default flags)", ours), ("TRL DPOTrainer", trl)):
            lines.append(
                f"| {label} | {pairs} x {r['steps']} | {name} | {r['step_s']:.3f} | {r['end_to_end_s']:.1f} "
                f"| {r['reference_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} "
                f"| {r['train_tokens'] / r['train_s']:.0f} |"
            )
        ratio = {k: ours[k] / trl[k] for k in ("step_s", "end_to_end_s", "reference_s", "peak_rss_mb")}
        above = (ours["peak_rss_mb"] - ours["baseline_rss_mb"]) / (trl["peak_rss_mb"] - trl["baseline_rss_mb"])
        tps = (ours["train_tokens"] / ours["train_s"]) / (trl["train_tokens"] / trl["train_s"])
        lines.append(
            f"| {label} | | **ours / TRL** | **{ratio['step_s']:.2f}** | **{ratio['end_to_end_s']:.2f}** "
            f"| **{ratio['reference_s']:.2f}** | **{ratio['peak_rss_mb']:.2f}** | **{above:.2f}** | **{tps:.2f}** |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--big_vocab", type=int, default=128256)
    parser.add_argument("--big_vocab_pairs", type=int, default=64, help="Pairs for the large-vocabulary row.")
    parser.add_argument("--big_vocab_steps", type=int, default=8, help="Optimizer steps for the large-vocabulary row.")
    parser.add_argument("--profile", action="store_true", help="Print a torch.profiler table of our step.")
    parser.add_argument("--write", default=None, help="Markdown file whose '## Speed vs TRL' section gets the result.")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    inputs = build_inputs(work, args.pairs, [0])
    small = build_inputs(work / "big", args.big_vocab_pairs, [args.big_vocab])
    print(f"inputs in {work}: {inputs['pairs']} HH pairs", flush=True)
    rows = []
    for label, model_dir, data_ours, data_trl, steps, pairs in (
        ("8,192", inputs["models"][0], inputs["ours_data"], inputs["trl_data"], None, inputs["pairs"]),
        (
            f"{args.big_vocab:,}",
            small["models"][args.big_vocab],
            small["ours_data"],
            small["trl_data"],
            args.big_vocab_steps,
            small["pairs"],
        ),
    ):
        print(f"vocab {label}:", flush=True)
        ours = spawn(
            "ours", model_dir, data_ours, work / f"ours_{label}", steps, args.profile and not rows, args.threads
        )
        trl = spawn("trl", model_dir, data_trl, work / f"trl_{label}", steps, False, args.threads)
        rows.append((label, ours, trl, pairs))
    first = rows[0][1]
    report = table(rows)
    report += (
        f"\nOn the same packed real tokens ({args.pairs} pairs, vocab 8,192): our DPO step / plain causal-LM "
        f"forward+backward+AdamW step = {first['step_s']:.3f} / {first['plain_step_s']:.3f} = "
        f"**{first['step_s'] / first['plain_step_s']:.2f}**; our reference pass / plain no-grad forward (full logits) = "
        f"{first['reference_s']:.2f} / {first['plain_forward_s']:.2f} = "
        f"**{first['reference_s'] / first['plain_forward_s']:.2f}**.\n"
        f"\nWhole benchmark: {time.perf_counter() - start:.0f} s, {args.threads} threads, torch "
        f"{__import__('torch').__version__}, transformers {__import__('transformers').__version__}, trl "
        f"{__import__('trl').__version__}.\n"
    )
    print(report)
    if "profile" in first:
        print("torch.profiler, our packed DPO step (3 steps):\n" + first["profile"])
    if args.write:
        write_section(Path(args.write), report, " ".join(["python scripts/bench/compare_trl.py", *sys.argv[1:]]))


def write_section(path: Path, report: str, command: str, title: str = "Speed vs TRL") -> None:
    """Replace (or append) the '## <title>' section of a markdown file, atomically."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\nCommand: `OMP_NUM_THREADS=2 {command}`\n\n{report}"
    pattern = re.compile(rf"## {re.escape(title)}\n.*?(?=\n## |\Z)", re.S)
    text = (
        pattern.sub(lambda _: section.rstrip("\n") + "\n", text)
        if pattern.search(text)
        else (text.rstrip("\n") + "\n\n" + section)
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
