"""The default chat template of a tokenizer that has none (``hh_rlhf``), on a GPT-2-style byte-level BPE tokenizer
built here: the text it renders is HH-RLHF's own transcript with an EOS after each reply, and the labels cover the
replies and nothing else."""

from __future__ import annotations

import re

import pytest

from open_instruct.config import TrainArguments
from open_instruct.data.formats import from_hh_rlhf
from open_instruct.data.sft import tokenize_conversation
from open_instruct.data.tokenize import IGNORE_INDEX, render, tokenize_pairs
from open_instruct.model.modeling import load_tokenizer
from open_instruct.settings import ModelSettings
from tests.data_helpers import GPT2_EOS, read_hh_rows, write_gpt2_style_tokenizer

# A transcript in HH-RLHF's layout whose turns need no whitespace clean-up: two speakers strictly alternating.
_STRICT = re.compile(
    r"(\n\nHuman: \S(?:(?!\n\n(?:Human|Assistant):).)*\S\n\nAssistant: \S(?:(?!\n\n(?:Human|Assistant):).)*\S)+", re.S
)


@pytest.fixture(scope="module")
def gpt2_like(tmp_path_factory):
    """(the tokenizer's folder, the ModelSettings that load it)."""
    texts = [r[side] for r in read_hh_rows()[:300] for side in ("chosen", "rejected")]
    folder = write_gpt2_style_tokenizer(tmp_path_factory.mktemp("gpt2_like"), texts)
    settings = ModelSettings.of(TrainArguments(model_name_or_path=str(folder), reference_logprobs_cache_path="unused"))
    return folder, settings


def _with_eos_after_replies(transcript: str) -> str:
    """The raw transcript with EOS closing each assistant turn, computed on the string alone."""
    return transcript.replace("\n\nHuman:", GPT2_EOS + "\n\nHuman:").removeprefix(GPT2_EOS) + GPT2_EOS


def test_a_tokenizer_without_template_gets_hh_rlhf_with_one_note(gpt2_like, capsys):
    folder, settings = gpt2_like
    tokenizer = load_tokenizer(settings)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "'hh_rlhf'" in notes[0] and repr(str(folder)) in notes[0], notes
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "Bye."},
    ]
    expected = f"\n\nHuman: Hi there\n\nAssistant: Hello.{GPT2_EOS}\n\nHuman: And?\n\nAssistant: Bye.{GPT2_EOS}"
    assert render(tokenizer, messages, add_generation_prompt=False) == expected
    assert render(tokenizer, messages[:3], add_generation_prompt=True) == expected[: expected.rindex(" Bye.")]


def test_real_hh_rows_render_as_their_own_transcript_and_label_the_reply(gpt2_like):
    tokenizer = load_tokenizer(gpt2_like[1])
    rows = [r for r in read_hh_rows() if _STRICT.fullmatch(r["chosen"]) and _STRICT.fullmatch(r["rejected"])]
    pairs = []
    for row in rows:
        try:
            pairs.append({"index": len(pairs), **from_hh_rlhf(row)})
        except Exception:  # rows whose prompts differ: the parser's concern, tested in test_formats
            continue
    assert len(pairs) >= 100
    records, stats = tokenize_pairs(tokenizer, pairs, max_seq_length=1 << 20)
    assert stats.kept == len(pairs) and stats.boundary_merges == 0
    eos = tokenizer.eos_token_id
    for row, record in zip(rows, records):
        for side in ("chosen", "rejected"):
            ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
            # The ids are the GPT-2-style tokenization of the dataset's own text, EOS after each reply.
            assert ids == tokenizer(_with_eos_after_replies(row[side]), add_special_tokens=False)["input_ids"]
            n_prompt = labels.count(IGNORE_INDEX)
            assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
            last_reply = row[side][row[side].rindex("\n\nAssistant:") + len("\n\nAssistant:") :]
            assert tokenizer.decode(ids[n_prompt:]) == last_reply + GPT2_EOS
            assert [t for t in labels if t != IGNORE_INDEX].count(eos) == 1 and ids[-1] == eos


def test_sft_labels_every_reply_with_its_eos_and_no_prompt(gpt2_like):
    tokenizer = load_tokenizer(gpt2_like[1])
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    ids, labels = tokenize_conversation(tokenizer, messages)
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    spans.append(current)
    assert [tokenizer.decode(span) for span in spans] == [f" Four.{GPT2_EOS}", f" You are welcome.{GPT2_EOS}"]
    unlabelled = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert unlabelled == "Be kind.\n\nHuman: What is two plus two?\n\nAssistant:\n\nHuman: Thanks\n\nAssistant:"
