"""Render pairs with the chat template, tokenize, put labels on the final reply only, truncate, filter.

The whole conversation is rendered and tokenized in one piece, and the label boundary is found from character
offsets: the ids are exactly those the chat template gives for the full conversation, so no token can merge or split
differently at the prompt/reply boundary than it would at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from open_instruct.config import UserError

IGNORE_INDEX = -100


@dataclass
class TokenizeStats:
    """What tokenization kept, dropped and cut."""

    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text for these messages."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode_with_boundary(tokenizer: Any, prompt_text: str, full_text: str) -> tuple[list[int], int]:
    """(ids of the full text, number of leading ids that belong to the prompt)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
        boundary = len(prompt_text)
        n_prompt = sum(1 for start, end in enc["offset_mapping"] if start < boundary)
        return enc["input_ids"], n_prompt
    # Slow tokenizers have no offsets: the prompt is the common prefix of the prompt's ids and the whole's ids.
    ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    n_prompt = 0
    while n_prompt < min(len(ids), len(prompt_ids)) and ids[n_prompt] == prompt_ids[n_prompt]:
        n_prompt += 1
    return ids, n_prompt


def tokenize_side(
    tokenizer: Any, prompt: list[dict[str, str]], reply: list[dict[str, str]], add_bos: bool
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + reply, labels IGNORE_INDEX outside the reply."""
    prompt_text = render(tokenizer, prompt, add_generation_prompt=True)
    full_text = render(tokenizer, prompt + reply, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise UserError("the chat template renders the prompt differently when a reply follows; "
                        "pick another with --chat_template_name")
    ids, n_prompt = _encode_with_boundary(tokenizer, prompt_text, full_text)
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids, n_prompt = [bos] + ids, n_prompt + 1
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return ids, labels


def tokenize_pairs(
    tokenizer: Any, pairs: list[dict[str, Any]], max_seq_length: int, add_bos: bool = False
) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """Tokenize normalized pairs; drop those with no reply tokens left, cut replies past ``max_seq_length``."""
    stats = TokenizeStats()
    out = []
    for pair in pairs:
        record: dict[str, Any] = {"index": pair["index"]}
        drop_reason = None
        was_cut = False
        for side in ("chosen", "rejected"):
            ids, labels = tokenize_side(tokenizer, pair["prompt"], pair[side], add_bos)
            n_prompt = sum(1 for label in labels if label == IGNORE_INDEX)
            if n_prompt >= max_seq_length:
                drop_reason = "prompt alone reaches max_seq_length"
                break
            if len(ids) > max_seq_length:
                ids, labels, was_cut = ids[:max_seq_length], labels[:max_seq_length], True
            if all(label == IGNORE_INDEX for label in labels):
                drop_reason = f"no {side} reply tokens"
                break
            record[f"{side}_input_ids"] = ids
            record[f"{side}_labels"] = labels
        if drop_reason:
            stats.drop(drop_reason)
            continue
        stats.truncated += was_cut
        stats.kept += 1
        out.append(record)
    return out, stats
