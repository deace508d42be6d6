"""The three-stage pipeline on CPU in about a minute: a "pretrained" tiny model, then SFT, then DPO.

    python examples/pipeline.py [--out_dir .pipeline] [--sft_steps 100] [--dpo_steps 150]

The pretrained checkpoint is the embedded tiny Llama (random weights) and the data the synthetic preference task
(open_instruct.data.synthetic). SFT learns the chosen replies (held-out NLL drops); DPO then learns to prefer them
(held-out preference accuracy rises). Both stages go through the public API: run_sft and run_dpo.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from open_instruct import DPOConfig, PreferenceDatasetConfig, SFTDatasetConfig, TrainingConfig, run_dpo, run_sft


def eval_rows(output_dir: Path) -> list[dict]:
    """The evaluation rows of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss" in r]


def policy_accuracy(model_dir: Path, test_file: Path) -> float:
    """Held-out preference accuracy of a checkpoint on its own (no reference): open_instruct.evaluation."""
    from transformers import AutoModelForCausalLM

    from open_instruct.config import DPOArguments
    from open_instruct.data.prepare import prepare_preference_data
    from open_instruct.evaluation import preference_accuracy
    from open_instruct.modeling import load_tokenizer

    args = DPOArguments(model_name_or_path=str(model_dir), mixer_list=[str(test_file), "1.0"], max_seq_length=64)
    tokenizer = load_tokenizer(args)
    records = prepare_preference_data(args, tokenizer).records
    return preference_accuracy(AutoModelForCausalLM.from_pretrained(model_dir), records, tokenizer.pad_token_id)


def main(argv: list[str] | None = None) -> None:
    """Run SFT then DPO and print the held-out numbers of each stage."""
    from open_instruct.data.synthetic import write_task, write_tiny_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=".pipeline")
    parser.add_argument("--n_train", type=int, default=1024)
    parser.add_argument("--sft_steps", type=int, default=100)
    parser.add_argument("--dpo_steps", type=int, default=150)
    ns = parser.parse_args(argv)
    out = Path(ns.out_dir)
    for stage in ("sft", "dpo"):  # a fresh run: metrics.jsonl is appended to, never truncated
        shutil.rmtree(out / stage, ignore_errors=True)
    train_file, test_file = write_task(out / "data", n_train=ns.n_train, n_test=128, seed=0)
    pretrained = write_tiny_model(out / "pretrained", seed=0)

    # Stage 2: supervised fine-tuning on the chosen conversations (a preference file serves as chat data).
    sft = run_sft(
        pretrained,
        TrainingConfig(
            run_name="pipeline-sft",
            output_dir=str(out / "sft"),
            batch_size=32,
            micro_batch_size=32,
            learning_rate=3e-3,
            warmup_steps=5,
            max_steps=ns.sft_steps,
            log_every=10,
            eval_every=ns.sft_steps // 2,
        ),
        SFTDatasetConfig(str(train_file), eval_dataset_name=str(test_file), max_seq_length=64),
    )
    print(
        f"SFT: held-out NLL per assistant token at steps {[r['training_step'] for r in eval_rows(out / 'sft')]}: "
        f"{[round(r['eval/loss'], 3) for r in eval_rows(out / 'sft')]}"
    )

    # Stage 3: DPO from the SFT checkpoint, evaluated on the held-out pairs every few steps.
    dpo = run_dpo(
        sft,
        TrainingConfig(
            run_name="pipeline-dpo",
            output_dir=str(out / "dpo"),
            batch_size=16,
            micro_batch_size=8,
            gradient_accumulation_steps=2,
            learning_rate=1e-3,
            warmup_steps=5,
            max_steps=ns.dpo_steps,
            log_every=10,
            eval_every=ns.dpo_steps // 2,
        ),
        DPOConfig(
            beta=5.0,
            loss_type="dpo_norm",
            max_length=32,
            max_prompt_length=32,
            reference_cache_dir=str(out / "reference_cache"),
        ),
        PreferenceDatasetConfig(str(train_file), eval_dataset_name=str(test_file)),
    )
    final = eval_rows(out / "dpo")[-1]
    print(
        f"DPO: held-out eval/loss {final['eval/loss']:.4f}, eval/rewards/accuracy "
        f"{100 * final['eval/rewards/accuracy']:.2f}%, eval/rewards/margin {final['eval/rewards/margin']:.4f}"
    )
    print(
        f"held-out preference accuracy of the policy alone: after SFT {100 * policy_accuracy(sft, test_file):.2f}%, "
        f"after DPO {100 * policy_accuracy(dpo, test_file):.2f}%"
    )
    print(f"final checkpoint: {dpo}")


if __name__ == "__main__":
    main()
