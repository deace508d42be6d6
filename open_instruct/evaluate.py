"""Held-out preference accuracy of a model, offline: how often the policy itself prefers the chosen reply (average
log-prob per reply token), with no reference model, so it is meaningful before training too.

    python -m open_instruct.evaluate --model_name_or_path DIR --data test.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package, not this folder's modules by bare name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from open_instruct.config import TrainArguments, settings_of
from open_instruct.data.prepare import prepare_preference_data
from open_instruct.model.modeling import load_tokenizer
from open_instruct.training.evaluation import preference_accuracy


def main(argv: list[str] | None = None) -> None:
    """Print the held-out preference accuracy of a model on a preference file."""
    from transformers import AutoModelForCausalLM  # transformers is slow to import: after the arguments parse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--data", required=True, help="a preference file (any supported format)")
    parser.add_argument("--max_seq_length", type=int, default=2048)
    parser.add_argument("--label", default="held-out preference accuracy")
    ns = parser.parse_args(argv)
    cfg = settings_of(
        TrainArguments(
            model_name_or_path=ns.model_name_or_path,
            mixer_list=[ns.data, "1.0"],
            mixer_list_splits=["test"],
            max_seq_length=ns.max_seq_length,
        )
    )
    tokenizer = load_tokenizer(cfg.model)
    records = prepare_preference_data(cfg.data, tokenizer).records
    model = AutoModelForCausalLM.from_pretrained(ns.model_name_or_path)
    accuracy = preference_accuracy(model, records, tokenizer.pad_token_id)
    print(f"{ns.label}: {100 * accuracy:.2f}% of {len(records)} pairs")


if __name__ == "__main__":
    main()
