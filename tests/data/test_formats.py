"""Every supported row format becomes the same normal form; the real HH sample is counted independently."""

from __future__ import annotations

import json

import pytest

from open_instruct.data.formats import RowError, detect_format, normalize, split_transcript
from open_instruct.data.sources import load_rows
from open_instruct.errors import UserError
from tests.data_helpers import HH_SAMPLE, read_hh_rows
from tests.data_oracle import normalize_rows

U1, A1, U2 = "Name a prime number.", "Seven.", "And an even one?"
GOOD, BAD = "Two is even and prime.", "Nine."
MULTI_TURN = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}, {"role": "user", "content": U2}]


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _rows_by_format() -> dict[str, tuple[dict, list[dict]]]:
    """One row per format, written from the formats' public descriptions, and the prompt it should give."""
    single = [_msg("user", U1)]
    return {
        "messages": (
            {
                "prompt": U1,
                "score_chosen": 9.0,
                "score_rejected": 2.0,
                "chosen": MULTI_TURN + [_msg("assistant", GOOD)],
                "rejected": MULTI_TURN + [_msg("assistant", BAD)],
            },
            MULTI_TURN,
        ),
        "prompt_chosen_rejected": ({"prompt": U1, "chosen": GOOD, "rejected": BAD}, single),
        "conversational": (
            {"prompt": MULTI_TURN, "chosen": [_msg("assistant", GOOD)], "rejected": [_msg("assistant", BAD)]},
            MULTI_TURN,
        ),
        "hh_rlhf": (
            {
                "chosen": f"\n\nHuman: {U1}\n\nAssistant: {A1}\n\nHuman: {U2}\n\nAssistant: {GOOD}",
                "rejected": f"\n\nHuman: {U1}\n\nAssistant: {A1}\n\nHuman: {U2}\n\nAssistant: {BAD}",
            },
            MULTI_TURN,
        ),
        "shp": (
            {
                "post_id": "x",
                "history": U1,
                "human_ref_A": BAD,
                "human_ref_B": GOOD,
                "labels": 0,
                "score_A": 3,
                "score_B": 10,
            },
            single,
        ),
    }


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_every_format_gives_the_same_normal_form(tmp_path, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, (row, prompt) in _rows_by_format().items():
        if suffix == ".parquet" and name == "messages":
            row = {k: v for k, v in row.items() if k != "score_chosen"}  # keep the arrow schema simple
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".jsonl":
            path.write_text(json.dumps(row) + "\n")
        elif suffix == ".json":
            path.write_text(json.dumps([row]))
        else:
            pq.write_table(pa.Table.from_pylist([row]), path)
        pairs, report = normalize_rows(str(path), load_rows(str(path), "train"), "auto", skip_invalid=False)
        expected_format = "prompt_chosen_rejected" if name == "conversational" else name
        assert report["format"] == expected_format, name
        assert pairs[0]["prompt"] == prompt, name
        assert pairs[0]["chosen"] == [_msg("assistant", GOOD)], name
        assert pairs[0]["rejected"] == [_msg("assistant", BAD)], name


def test_shp_label_one_prefers_a():
    row = {"history": U1, "human_ref_A": GOOD, "human_ref_B": BAD, "labels": 1}
    assert normalize(row, "shp")["chosen"][0]["content"] == GOOD
    with pytest.raises(RowError) as err:
        normalize({**row, "labels": 2}, "shp")
    assert err.value.reason == "bad_label"


@pytest.mark.parametrize(
    ("row", "fmt", "reason"),
    [
        (
            {
                "chosen": [_msg("user", "a"), _msg("assistant", "b")],
                "rejected": [_msg("user", "z"), _msg("assistant", "c")],
            },
            "messages",
            "prompts_differ",
        ),
        (
            {
                "chosen": [_msg("user", "a"), _msg("assistant", " ")],
                "rejected": [_msg("user", "a"), _msg("assistant", "c")],
            },
            "messages",
            "empty_reply",
        ),
        (
            {
                "chosen": [_msg("user", "a"), _msg("user", "b")],
                "rejected": [_msg("user", "a"), _msg("assistant", "c")],
            },
            "messages",
            "last_turn_not_assistant",
        ),
        ({"prompt": "a", "chosen": "same", "rejected": "same "}, "prompt_chosen_rejected", "identical_replies"),
        ({"prompt": " ", "chosen": "b", "rejected": "c"}, "prompt_chosen_rejected", "empty_prompt"),
        (
            {"prompt": "a", "chosen": [_msg("assistant", "b"), _msg("assistant", "b")], "rejected": "c"},
            "prompt_chosen_rejected",
            "bad_messages",
        ),
        ({"prompt": "a", "rejected": "c"}, "prompt_chosen_rejected", "missing_field"),
        ({"chosen": "no transcript here", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "hh_rlhf", "not_a_transcript"),
        (
            {
                "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c",
                "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c",
            },
            "hh_rlhf",
            "last_turn_not_assistant",
        ),
    ],
)
def test_malformed_rows_have_the_right_reason(row, fmt, reason):
    with pytest.raises(RowError) as err:
        normalize(row, fmt)
    assert err.value.reason == reason


def test_detection_and_explicit_override():
    assert detect_format(["chosen", "rejected"], {"chosen": "\n\nHuman: a", "rejected": "x"}) == "hh_rlhf"
    assert detect_format(["chosen", "rejected"], {"chosen": [_msg("user", "a")]}) == "messages"
    with pytest.raises(RowError, match="unrecognised columns"):
        detect_format(["question", "answer"], {})
    rows = [{"prompt": U1, "chosen": GOOD, "rejected": BAD}]
    with pytest.raises(UserError, match="--dataset_format shp needs column\\(s\\) history, human_ref_A"):
        normalize_rows("d.jsonl", rows, "shp", skip_invalid=False)
    # prompt/chosen/rejected strings forced through the messages parser: each row is then malformed.
    with pytest.raises(UserError, match="d.jsonl: row 1: bad_messages"):
        normalize_rows("d.jsonl", rows, "messages", skip_invalid=False)


def test_invalid_rows_error_names_dataset_row_and_reason_and_counts_all():
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    rows = [good, good, {**good, "chosen": ""}, {**good, "rejected": "b"}, {**good, "chosen": " "}]
    with pytest.raises(UserError) as err:
        normalize_rows("mine.jsonl", rows, "auto", skip_invalid=False)
    message = str(err.value)
    assert message.startswith("mine.jsonl: row 3: empty_reply")
    assert "3 invalid of 5 rows: 2 empty_reply, 1 identical_replies" in message
    assert "--skip_invalid_rows" in message
    pairs, report = normalize_rows("mine.jsonl", rows, "auto", skip_invalid=True)
    assert [p["source"][1] for p in pairs] == [0, 1]
    assert report["invalid"] == {"empty_reply": 2, "identical_replies": 1}


def _independent_hh_reason(row: dict[str, str]) -> tuple[str | None, bool]:
    """(reason the row is invalid or None, whether a speaker has two turns in a row), with plain string searches."""
    human, assistant = "\n\nHuman:", "\n\nAssistant:"
    parts, merged = {}, False
    for side in ("chosen", "rejected"):
        text = row[side]
        if not text.startswith(human):
            return "not_a_transcript", merged
        markers, pos = [], 0  # every speaker marker in order, found with str.find
        while True:
            h, a = text.find(human, pos), text.find(assistant, pos)
            nxt = min(x for x in (h, a, len(text)) if x >= 0)
            if nxt == len(text):
                break
            markers.append("H" if nxt == h else "A")
            pos = nxt + 2
        merged |= any(x == y for x, y in zip(markers, markers[1:]))
        last_human = text.rfind(human)
        reply_start = text.find(assistant, last_human)
        if reply_start < 0:
            parts[side] = (text, None)
        else:
            parts[side] = (text[:reply_start], text[reply_start + len(assistant) :].replace(assistant, ""))
    if parts["chosen"][0].strip() != parts["rejected"][0].strip():
        return "prompts_differ", merged
    if parts["chosen"][1] is None or parts["rejected"][1] is None:
        return "last_turn_not_assistant", merged
    if not parts["chosen"][1].strip() or not parts["rejected"][1].strip():
        return "empty_reply", merged
    if parts["chosen"][1].strip() == parts["rejected"][1].strip():
        return "identical_replies", merged
    return None, merged


def test_real_hh_sample_counts_match_an_independent_count():
    if not HH_SAMPLE.is_file():
        pytest.skip(f"real HH sample not found at {HH_SAMPLE}")
    raw = read_hh_rows()
    expected_invalid: dict[str, int] = {}
    expected_merged = 0
    for row in raw:
        reason, merged = _independent_hh_reason(row)
        if reason:
            expected_invalid[reason] = expected_invalid.get(reason, 0) + 1
        else:
            expected_merged += merged
    assert sum(expected_invalid.values()) > 0 and expected_merged > 0  # the sample really is messy

    rows = load_rows(str(HH_SAMPLE), "train")
    assert rows == raw
    pairs, report = normalize_rows(str(HH_SAMPLE), rows, "auto", skip_invalid=True)
    assert report["format"] == "hh_rlhf"
    assert report["invalid"] == expected_invalid
    assert report["notes"] == {"merged_consecutive_turns": expected_merged}
    assert len(pairs) / len(raw) == (len(raw) - sum(expected_invalid.values())) / len(raw)
    with pytest.raises(UserError, match="hh_rlhf_sample.jsonl.gz: row \\d+: empty_reply"):
        normalize_rows(str(HH_SAMPLE), rows, "auto", skip_invalid=False)


def test_hh_consecutive_turns_merge_into_one_message():
    messages, merged = split_transcript("\n\nHuman: hi\n\nAssistant: one\n\nAssistant: two\n\nHuman: ok", "chosen")
    assert merged
    assert messages == [_msg("user", "hi"), _msg("assistant", "one\n\ntwo"), _msg("user", "ok")]
