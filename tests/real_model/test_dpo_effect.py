"""DPO works and does no harm, on the real model: the shared one-process run (3 steps on 6 real HH pairs) raises the
implicit reward accuracy on its training pairs, does not lower the held-out preference accuracy, and the trained
model still answers fixed factual prompts correctly under greedy decoding. Log-probs are computed here with plain
transformers from the records' labels, not by the project's code."""

from __future__ import annotations

import pytest
import torch

from open_instruct.data.tokenize import IGNORE_INDEX
from tests.real_model.conftest import PAIRS, one_thread, prepared, short_hh_rows, write_hh

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
HELD_OUT = 24
# Questions the untrained model answers correctly (greedy, as converted from the registry's 4-bit file).
FACTS = {
    "What is the capital of France?": "Paris",
    "What is the capital of Japan?": "Tokyo",
    "How many days are there in a week?": "7",
    "What color is the sky on a clear day?": "blue",
    "Who wrote Romeo and Juliet?": "Shakespeare",
    "What is the chemical symbol for water?": "H2O",
}


@torch.no_grad()
def _mean_reply_logps(model, records: list[dict]) -> torch.Tensor:
    """[pairs, 2]: the average log-prob per labelled token of each chosen and rejected reply, one sequence at a time."""
    out = torch.zeros(len(records), 2)
    for i, record in enumerate(records):
        for j, side in enumerate(("chosen", "rejected")):
            ids = torch.tensor([record[f"{side}_input_ids"]])
            labels = torch.tensor(record[f"{side}_labels"][1:])
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            mask = labels != IGNORE_INDEX
            out[i, j] = logps[mask].gather(1, labels[mask, None]).mean()
    return out


def _answers(model, tokenizer) -> dict[str, str]:
    answers = {}
    for question in FACTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        generated = model.generate(ids, max_new_tokens=24, do_sample=False)
        answers[question] = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    return answers


def test_dpo_raises_training_rewards_keeps_held_out_accuracy_and_facts(
    real_model_dir, train_file, one_process, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held_out = write_hh(tmp_path / "held_out.jsonl", short_hh_rows(HELD_OUT, skip=PAIRS, max_chars=300))
    _, train_records = prepared(real_model_dir, train_file, tmp_path / "train_cache")
    _, held_records = prepared(real_model_dir, held_out, tmp_path / "held_cache")
    assert len(train_records) == PAIRS and len(held_records) == HELD_OUT
    with one_thread():
        before = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
        after = AutoModelForCausalLM.from_pretrained(one_process, dtype=torch.float32).eval()
        reference, policy = _mean_reply_logps(before, train_records), _mean_reply_logps(after, train_records)
        held_before, held_after = _mean_reply_logps(before, held_records), _mean_reply_logps(after, held_records)
        answers = _answers(after, AutoTokenizer.from_pretrained(one_process))

    # Implicit rewards (dpo_norm: average log-probs) of the training pairs: all zero before, chosen ahead after.
    rewards = policy - reference
    reward_accuracy = (rewards[:, 0] > rewards[:, 1]).float().mean().item()
    assert reward_accuracy >= 0.75, rewards
    accuracy_before = (held_before[:, 0] > held_before[:, 1]).float().mean().item()
    accuracy_after = (held_after[:, 0] > held_after[:, 1]).float().mean().item()
    assert accuracy_after >= accuracy_before, (accuracy_before, accuracy_after)
    wrong = {q: a for q, a in answers.items() if FACTS[q].lower() not in a.lower()}
    assert not wrong, wrong
