"""The documented three-stage pipeline on CPU in a few minutes: pretrain a tiny Llama from scratch, SFT it, DPO it.

    python examples/pipeline.py [--out_dir output/pipeline] [--pretrain_steps 200] [--sft_steps 100] [--dpo_steps 100]

Everything is generated here (open_instruct.data.synthetic): a word-level tokenizer, raw text for pretraining (task
prompts followed by their correct replies), chat data for SFT and preference pairs for DPO, each with a held-out
split whose prompts training never sees. The stages go through the documented ``modern_llm`` API, each taking the
path the previous one returned: the pretraining folder's ``pretrain_final.pt``, then ``sft_final.pt``, then the DPO
folder. Printed: held-out perplexity before and after pretraining and after SFT, and the policy's own held-out
preference accuracy before and after DPO.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

from modern_llm.config import ModelConfig, TrainingConfig
from modern_llm.data.instruction_datasets import InstructionDatasetConfig
from modern_llm.data.preference_datasets import PreferenceDatasetConfig
from modern_llm.training.train_dpo import DPOConfig, run_dpo
from modern_llm.training.train_lm import run_training
from modern_llm.training.train_sft import run_sft


def eval_rows(output_dir: Path) -> list[dict]:
    """The evaluation rows of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss" in r]


def load(checkpoint: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a stage's output: a ``.pt`` of ours or a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from open_instruct.model.state_dict import load_pt_checkpoint

    if checkpoint.suffix == ".pt":
        return load_pt_checkpoint(checkpoint)
    return AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)


def policy_accuracy(checkpoint: Path, test_file: Path) -> float:
    """Held-out preference accuracy of a checkpoint on its own (no reference): open_instruct.training.evaluation."""
    from open_instruct.config import TrainArguments
    from open_instruct.data.prepare import prepare_preference_data
    from open_instruct.settings import DataSettings
    from open_instruct.training.evaluation import preference_accuracy

    model, tokenizer = load(checkpoint)
    args = TrainArguments(model_name_or_path=str(checkpoint), mixer_list=[str(test_file), "1.0"], max_seq_length=64)
    records = prepare_preference_data(DataSettings.of(args), tokenizer).records
    return preference_accuracy(model, records, tokenizer.pad_token_id)


def main(argv: list[str] | None = None) -> None:
    """Pretrain, SFT, DPO; print the held-out numbers of each stage."""
    from open_instruct.data.synthetic import write_task, write_text_corpus, write_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Under the checkout's git-ignored output/ folder (also the demo's), wherever the script is started from.
    default_out = Path(__file__).resolve().parents[1] / "output" / "pipeline"
    parser.add_argument("--out_dir", default=str(default_out), help=f"default: {default_out}")
    parser.add_argument("--n_text", type=int, default=2000, help="pretraining documents")
    parser.add_argument("--n_train", type=int, default=1024, help="SFT conversations / DPO pairs")
    parser.add_argument("--pretrain_steps", type=int, default=200)
    parser.add_argument("--sft_steps", type=int, default=100)
    parser.add_argument("--dpo_steps", type=int, default=100)
    ns = parser.parse_args(argv)
    out = Path(ns.out_dir)
    for stage in ("pretrain", "sft", "dpo"):  # a fresh run: metrics.jsonl is appended to, never truncated
        shutil.rmtree(out / stage, ignore_errors=True)
    tokenizer = str(write_tokenizer(out / "tokenizer"))
    text_train, text_test = write_text_corpus(out / "text", n_train=ns.n_text, n_test=200, seed=0)
    train_file, test_file = write_task(out / "data", n_train=ns.n_train, n_test=128, seed=0)

    # Stage 1: pretraining from scratch on raw text, held-out perplexity before training and at the end.
    model_config = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, max_seq_len=64)
    pretrain_config = TrainingConfig(
        run_name="pipeline-pretrain",
        dataset_name=str(text_train),
        eval_dataset_name=str(text_test),
        tokenizer_name=tokenizer,
        output_dir=out / "pretrain",
        batch_size=16,
        micro_batch_size=16,
        gradient_accumulation_steps=1,
        learning_rate=3e-3,
        max_steps=ns.pretrain_steps,
        warmup_steps=5,
        log_every=10,
        eval_every=ns.pretrain_steps,
        save_format="pt",
    )
    pretrain_ckpt = run_training(model_config=model_config, train_config=pretrain_config)
    ppl = [r["eval/perplexity"] for r in eval_rows(out / "pretrain")]
    print(f"pretraining: held-out perplexity {ppl[0]:.2f} before, {ppl[-1]:.2f} after ({pretrain_ckpt})")

    # Stage 2: supervised fine-tuning on the chosen conversations (a preference file serves as chat data).
    sft_config = TrainingConfig(
        run_name="pipeline-sft",
        output_dir=out / "sft",
        batch_size=32,
        micro_batch_size=32,
        learning_rate=3e-3,
        warmup_steps=5,
        max_steps=ns.sft_steps,
        log_every=10,
        eval_every=max(1, ns.sft_steps // 2),
        save_format="pt",
    )
    instruction_config = InstructionDatasetConfig(str(train_file), eval_dataset_name=str(test_file), max_seq_length=64)
    sft_ckpt = run_sft(pretrain_checkpoint=pretrain_ckpt, train_config=sft_config, dataset_config=instruction_config)
    sft_eval = eval_rows(out / "sft")
    print(
        f"SFT: held-out perplexity of the assistant replies at steps {[r['training_step'] for r in sft_eval]}: "
        f"{[round(math.exp(r['eval/loss']), 3) for r in sft_eval]} ({sft_ckpt})"
    )

    # Stage 3: DPO from sft_final.pt, evaluated on the held-out pairs.
    dpo_train_config = TrainingConfig(
        run_name="pipeline-dpo",
        output_dir=out / "dpo",
        batch_size=16,
        micro_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=2e-3,
        warmup_steps=5,
        max_steps=ns.dpo_steps,
        log_every=10,
        eval_every=max(1, ns.dpo_steps // 2),
    )
    preference_config = PreferenceDatasetConfig(str(train_file), eval_dataset_name=str(test_file))
    dpo_ckpt = run_dpo(
        sft_checkpoint=sft_ckpt,
        train_config=dpo_train_config,
        dpo_config=DPOConfig(beta=0.1),
        preference_config=preference_config,
    )
    final = eval_rows(out / "dpo")[-1]
    print(
        f"DPO: held-out eval/loss {final['eval/loss']:.4f}, eval/rewards/accuracy "
        f"{100 * final['eval/rewards/accuracy']:.2f}%, eval/rewards/margin {final['eval/rewards/margin']:.4f}"
    )
    print(
        f"held-out preference accuracy of the policy alone: before DPO {100 * policy_accuracy(sft_ckpt, test_file):.2f}%"
        f", after DPO {100 * policy_accuracy(dpo_ckpt, test_file):.2f}%"
    )
    print(f"final checkpoint: {dpo_ckpt}")


if __name__ == "__main__":
    main()
