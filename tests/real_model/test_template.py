"""The model's chat template as shipped (ChatML with a default system prompt and a newline after each ``<|im_end|>``):
labels cover each reply and its ``<|im_end|>``, nothing the template adds before or after; the prompt is exactly the
template's rendering, default system prompt included. Checked against the template's own text on real HH rows."""

from __future__ import annotations

import pytest

from open_instruct.data.formats import from_hh_rlhf
from open_instruct.data.tokenize import IGNORE_INDEX
from tests.real_model.conftest import prepared, short_hh_rows, write_hh

pytestmark = pytest.mark.real_model
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
END = "<|im_end|>"


@pytest.mark.parametrize("add_bos", [False, True])
def test_labels_cover_the_reply_and_its_end_token_only(real_model_dir, tmp_path, add_bos):
    rows = short_hh_rows(24)
    data = write_hh(tmp_path / "hh.jsonl", rows)
    tokenizer, records = prepared(real_model_dir, data, tmp_path / "data_cache", 4096, add_bos)
    assert tokenizer.eos_token == tokenizer.pad_token == END  # the case where padding may not hide the end token
    assert len(records) == len(rows)
    eos = tokenizer.eos_token_id
    for row, record in zip(rows, records):
        pair = from_hh_rlhf(row)
        prompt_text = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        assert prompt_text.startswith(DEFAULT_SYSTEM) and prompt_text.count("You are a helpful AI") == 1
        for side in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=False)
            reply = pair[side][0]["content"]
            # The template's own text: prompt, reply, end token, and a newline we must leave out.
            assert full == prompt_text + reply + END + "\n"
            ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
            n_prompt = labels.count(IGNORE_INDEX)
            assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
            assert tokenizer.decode(ids[:n_prompt]) == prompt_text
            assert tokenizer.decode(ids[n_prompt:]) == reply + END
            assert ids[-1] == eos and ids[n_prompt:].count(eos) == 1
            # The ids are the template's text tokenized as one piece (no doubled start token, none added).
            assert ids == tokenizer(prompt_text + reply + END, add_special_tokens=False)["input_ids"]
