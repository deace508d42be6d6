"""Tokenization on a real byte-level BPE tokenizer: boundary ids, labels, BOS/EOS never doubled, truncation."""

from __future__ import annotations

import pytest

from open_instruct.data.chat_templates import CHAT_TEMPLATES, LABEL_RULE_TEMPLATES
from open_instruct.data.synthetic import CHAT_TEMPLATE as OWN_TEMPLATE
from open_instruct.data.tokenize import IGNORE_INDEX, tokenize_pairs
from tests.data_helpers import HH_SAMPLE, read_hh_rows, train_bpe_tokenizer


def _m(role, content):
    return {"role": role, "content": content}


PAIRS = [
    {
        "prompt": [_m("user", "How do I boil an egg?")],
        "chosen": [_m("assistant", "Simmer it for nine minutes.")],
        "rejected": [_m("assistant", "Eggs cannot be boiled.")],
    },
    {
        "prompt": [_m("system", "Be brief."), _m("user", "Hi"), _m("assistant", "Hello!"), _m("user", "2+2?")],
        "chosen": [_m("assistant", " 4")],
        "rejected": [_m("assistant", "\nfive, café ☕")],
    },
    {
        "prompt": [_m("user", "Say done")],
        "chosen": [_m("assistant", "done</s>")],  # the EOS text already there
        "rejected": [_m("assistant", "not done")],
    },
]
TEMPLATES = {**{name: CHAT_TEMPLATES[name] for name in LABEL_RULE_TEMPLATES}, "own": OWN_TEMPLATE}


@pytest.fixture(scope="module")
def bpe():
    texts = [r[side] for r in read_hh_rows(HH_SAMPLE)[:400] for side in ("chosen", "rejected")]
    return train_bpe_tokenizer(texts, vocab_size=2000)


def _with_template(tokenizer, template):
    tokenizer.chat_template = template
    return tokenizer


def _render(tokenizer, messages, gen):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _indexed(pairs):
    return [{"index": i, **p} for i, p in enumerate(pairs)]


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_prompt_plus_reply_ids_are_the_whole_conversation_ids(bpe, name, add_bos):
    tok = _with_template(bpe, TEMPLATES[name])
    records, stats = tokenize_pairs(tok, _indexed(PAIRS), max_seq_length=4096, add_bos=add_bos)
    assert stats.kept == len(PAIRS) and stats.boundary_merges == 0
    for pair, record in zip(PAIRS, records):
        prompt_text = _render(tok, pair["prompt"], True)
        for side in ("chosen", "rejected"):
            reply = [{**pair[side][0], "content": pair[side][0]["content"].removesuffix("</s>")}]
            full_text = _render(tok, pair["prompt"] + reply, False)
            if tok.eos_token in full_text[len(prompt_text) :]:  # the sequence ends at the reply's EOS
                full_text = full_text[: full_text.rindex(tok.eos_token) + len(tok.eos_token)]
            expected = tok(full_text, add_special_tokens=False)["input_ids"]
            if add_bos and expected[0] != tok.bos_token_id:
                expected = [tok.bos_token_id] + expected
            ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
            assert ids == expected
            n_prompt = labels.count(IGNORE_INDEX)
            assert labels[n_prompt:] == ids[n_prompt:] and IGNORE_INDEX not in labels[n_prompt:]
            # The boundary: prompt ids decode to the prompt's text, labelled ids to the reply's text only.
            bos_text = "<s>" if add_bos and not prompt_text.startswith("<s>") else ""
            assert tok.decode(ids[:n_prompt]) == bos_text + prompt_text
            assert tok.decode(ids[n_prompt:]) == full_text[len(prompt_text) :]


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_never_a_doubled_bos_or_eos(bpe, name, add_bos):
    tok = _with_template(bpe, TEMPLATES[name])
    records, stats = tokenize_pairs(tok, _indexed(PAIRS), max_seq_length=4096, add_bos=add_bos)
    assert stats.eos_stripped == 1
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for record in records:
        for side in ("chosen", "rejected"):
            ids, labels = record[f"{side}_input_ids"], record[f"{side}_labels"]
            want_bos = 1 if add_bos or "bos_token" in TEMPLATES[name] else 0
            assert ids.count(bos) == want_bos and (not want_bos or ids[0] == bos)
            assert not any(a == b == eos for a, b in zip(ids, ids[1:]))
            reply = [t for t in labels if t != IGNORE_INDEX]
            assert reply.count(eos) == 1
            # The sequence ends with it: the newline the synthetic tokenizer's own template puts after it is dropped.
            assert reply[-1] == eos and ids[-1] == eos


def test_chatml_with_im_end_as_eos_ends_replies_once():
    texts = ["hello there friend"] * 20
    tok = train_bpe_tokenizer(texts, vocab_size=300, eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATES["chatml"]
    records, _ = tokenize_pairs(tok, _indexed(PAIRS[:1]), max_seq_length=512)
    reply = [t for t in records[0]["chosen_labels"] if t != IGNORE_INDEX]
    assert reply.count(tok.eos_token_id) == 1 and reply[-1] == tok.eos_token_id


def test_labels_cover_only_the_final_reply(bpe):
    tok = _with_template(bpe, CHAT_TEMPLATES["tulu"])
    records, _ = tokenize_pairs(tok, _indexed(PAIRS[1:2]), max_seq_length=4096)
    labelled = [t for t in records[0]["chosen_labels"] if t != IGNORE_INDEX]
    assert tok.decode(labelled) == " 4</s>"  # the content as given; not "Hello!" from the earlier turn


def test_a_straddling_boundary_token_is_labelled_and_counted(bpe):
    # The generation prompt ends with a space, the reply starts with a word: byte-level BPE has " Paris" as one token.
    tok = _with_template(
        bpe,
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
        "{% if not loop.last or add_generation_prompt %}{{ '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
    )
    pair = {
        "prompt": [_m("user", "Capital of France?")],
        "chosen": [_m("assistant", "Paris")],
        "rejected": [_m("assistant", "Rome")],
    }
    records, stats = tokenize_pairs(tok, _indexed([pair]), max_seq_length=512)
    assert stats.boundary_merges == 1
    ids, labels = records[0]["chosen_input_ids"], records[0]["chosen_labels"]
    first = labels.count(IGNORE_INDEX)
    assert tok.decode(ids[first:]).strip() == "Paris" and tok.decode(ids[:first]).endswith("assistant:")


def test_truncation_drops_long_prompts_and_cuts_long_replies(bpe):
    tok = _with_template(bpe, CHAT_TEMPLATES["tulu"])
    pairs = [
        {
            "prompt": [_m("user", "word " * n)],
            "chosen": [_m("assistant", "yes " * r)],
            "rejected": [_m("assistant", "no")],
        }
        for n, r in ((2, 2), (5, 60), (200, 2), (3, 3))
    ]
    limit = 40
    # Independent count: lengths of the prompt-only and the whole conversation, tokenized directly.
    want_dropped = want_cut = 0
    for p in pairs:
        prompt_len = len(tok(_render(tok, p["prompt"], True), add_special_tokens=False)["input_ids"])
        full = [
            len(tok(_render(tok, p["prompt"] + p[s], False), add_special_tokens=False)["input_ids"])
            for s in ("chosen", "rejected")
        ]
        want_dropped += prompt_len >= limit
        want_cut += prompt_len < limit and max(full) > limit
    assert want_dropped == 1 and want_cut == 1
    records, stats = tokenize_pairs(tok, _indexed(pairs), max_seq_length=limit)
    assert stats.dropped == {"prompt_too_long": want_dropped} and stats.truncated == want_cut
    assert stats.kept == len(records) == len(pairs) - want_dropped
    assert [r["index"] for r in records] == list(range(len(records)))  # renumbered for the reference table
    assert all(len(r[f"{s}_input_ids"]) <= limit for r in records for s in ("chosen", "rejected"))


class _SlowView:
    """The fast tokenizer seen as a slow one (no offsets), to exercise the common-prefix boundary."""

    is_fast = False

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        return self._inner(*args, **kwargs)


def test_slow_tokenizer_path_gives_the_same_records(bpe):
    tok = _with_template(bpe, CHAT_TEMPLATES["zephyr"])
    fast, _ = tokenize_pairs(tok, _indexed(PAIRS), 4096, add_bos=True)
    slow, _ = tokenize_pairs(_SlowView(tok), _indexed(PAIRS), 4096, add_bos=True)
    assert slow == fast
