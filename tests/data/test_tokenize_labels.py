"""Rendering and label masks: labels exactly on the final assistant reply, computed independently here."""

from __future__ import annotations

import re

import pytest

from open_instruct.data.tokenize import IGNORE_INDEX, tokenize_pairs, tokenize_side

CONVERSATION = [
    {"role": "system", "content": "the words"},
    {"role": "user", "content": "please repeat these words : cat dog"},
    {"role": "assistant", "content": "cat dog"},
    {"role": "user", "content": "count up from 3 to 5"},
]
REPLY = [{"role": "assistant", "content": "3 4 5"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_labels_cover_exactly_the_final_reply(tokenizer):
    ids, labels = tokenize_side(tokenizer, CONVERSATION, REPLY, add_bos=False)
    # Independent expectation: the template's text for the whole conversation, split by the word-level tokenizer.
    text = tokenizer.apply_chat_template(CONVERSATION + REPLY, tokenize=False)
    words = re.findall(r"<\|[a-z]+\|>|</?s>|[^\s<]+", text)
    assert ids == tokenizer.convert_tokens_to_ids(words)
    labelled = [tokenizer.convert_ids_to_tokens(t) for t in labels if t != IGNORE_INDEX]
    assert labelled == ["3", "4", "5", "</s>"]  # the reply and its EOS, nothing of the earlier assistant turn
    first = labels.index(next(t for t in labels if t != IGNORE_INDEX))
    assert tokenizer.convert_ids_to_tokens(ids[first - 1]) == "<|assistant|>"


def test_single_bos(tokenizer):
    ids, _ = tokenize_side(tokenizer, CONVERSATION, REPLY, add_bos=True)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.eos_token_id) == 2  # one per assistant turn


def pair(prompt_words: int, reply_words: int, index: int = 0) -> dict:
    prompt = [{"role": "user", "content": " ".join(["cat"] * prompt_words)}]
    return {
        "index": index,
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": " ".join(["dog"] * reply_words)}],
        "rejected": [{"role": "assistant", "content": "lion"}],
    }


def test_truncation_and_drops(tokenizer):
    # Rendered prompt = <s> <|user|> words... <|assistant|> : prompt_words + 3 tokens.
    pairs = [pair(3, 2, 0), pair(3, 20, 1), pair(20, 2, 2)]
    records, stats = tokenize_pairs(tokenizer, pairs, max_seq_length=12)
    assert [r["index"] for r in records] == [0, 1]
    assert stats.truncated == 1 and stats.kept == 2
    assert stats.dropped == {"prompt_too_long": 1}
    cut = records[1]
    assert len(cut["chosen_input_ids"]) == 12
    assert sum(1 for t in cut["chosen_labels"] if t != IGNORE_INDEX) == 12 - 6


def test_max_response_length_cuts_each_reply(tokenizer):
    pairs = [pair(3, 20, 0), pair(3, 2, 1)]
    records, stats = tokenize_pairs(tokenizer, pairs, max_seq_length=100, max_response_length=5)
    long_reply, short_reply = records
    # The long chosen reply (20 words + EOS) keeps exactly its first 5 tokens; its prompt is untouched.
    assert [t for t in long_reply["chosen_labels"] if t != IGNORE_INDEX] == tokenizer.convert_tokens_to_ids(
        ["dog"] * 5
    )
    assert len(long_reply["chosen_input_ids"]) == 6 + 5
    # Short replies (2 words + EOS, 1 word + EOS) are kept whole.
    assert sum(1 for t in short_reply["chosen_labels"] if t != IGNORE_INDEX) == 3
    assert sum(1 for t in long_reply["rejected_labels"] if t != IGNORE_INDEX) == 2
    assert stats.truncated == 1
