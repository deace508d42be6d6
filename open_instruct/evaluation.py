"""Held-out preference accuracy: how often the policy itself prefers the chosen reply.

A pair counts as correct when the policy's average log-prob per reply token is higher for the chosen reply than for
the rejected one. Unlike the implicit-reward accuracy logged during training, this needs no reference model, so it is
meaningful before training too.

    python -m open_instruct.evaluation --model_name_or_path DIR --data test.jsonl
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from open_instruct.data.collate import PaddedPairCollator
from open_instruct.logprobs import sequence_logprobs


@torch.no_grad()
def preference_accuracy(model: Any, records: list[dict[str, Any]], pad_token_id: int, batch_size: int = 64) -> float:
    """Fraction of pairs whose chosen reply has the higher mean log-prob under ``model``."""
    model.eval()
    collate = PaddedPairCollator(pad_token_id)
    correct = 0
    for start in range(0, len(records), batch_size):
        batch = collate(records[start : start + batch_size])
        lp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        half = batch["index"].shape[0]
        correct += int((lp.means[:half] > lp.means[half:]).sum())
    return correct / max(len(records), 1)


def main(argv: list[str] | None = None) -> None:
    """Print the held-out preference accuracy of a model on a preference file."""
    from transformers import AutoModelForCausalLM

    from open_instruct.config import DPOArguments
    from open_instruct.data.prepare import prepare_preference_data
    from open_instruct.modeling import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--data", required=True, help="a preference file (any supported format)")
    parser.add_argument("--max_seq_length", type=int, default=2048)
    parser.add_argument("--label", default="held-out preference accuracy")
    ns = parser.parse_args(argv)
    args = DPOArguments(
        model_name_or_path=ns.model_name_or_path,
        mixer_list=[ns.data, "1.0"],
        mixer_list_splits=["test"],
        max_seq_length=ns.max_seq_length,
    )
    tokenizer = load_tokenizer(args)
    records = prepare_preference_data(args, tokenizer).records
    model = AutoModelForCausalLM.from_pretrained(ns.model_name_or_path)
    accuracy = preference_accuracy(model, records, tokenizer.pad_token_id)
    print(f"{ns.label}: {100 * accuracy:.2f}% of {len(records)} pairs")


if __name__ == "__main__":
    main()
