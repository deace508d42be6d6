"""Chat data for supervised fine-tuning: load and mix conversations, tokenize with labels on every assistant turn.

A row is ``{"messages": [{role, content}, ...]}``; a preference row (any format of :mod:`open_instruct.data.formats`)
also works and contributes its chosen conversation, so one preference set can feed both stages.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from open_instruct.data.formats import CHAT_ROLES, RowError, check_role, detect_format, normalize
from open_instruct.data.mixer import MixEntry, parse_mixer_list, sample_indices, target_rows
from open_instruct.data.sources import load_rows
from open_instruct.data.tokenize import IGNORE_INDEX, needs_bos, render, template_roles
from open_instruct.errors import UserError
from open_instruct.settings import DataSettings

Message = dict[str, str]


def _messages(value: Any, roles: frozenset[str]) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowError("bad_messages", "field 'messages' must be a non-empty list of {role, content} messages")
    for i, message in enumerate(value, start=1):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise RowError("bad_messages", f"field 'messages' message {i} must have a string 'role' and 'content'")
        check_role(message["role"], roles, f"field 'messages' message {i}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def conversation(row: dict[str, Any], roles: frozenset[str] = CHAT_ROLES) -> list[Message]:
    """The conversation of one row: its ``messages``, or a preference row's prompt plus chosen reply; a role outside
    ``roles`` (those the chat template renders) is refused."""
    if "messages" in row:
        messages = _messages(row["messages"], roles)
    else:
        try:
            pair = normalize(row, detect_format(list(row), row), roles=roles)
        except RowError as err:
            raise RowError(err.reason, f"expected a 'messages' list or a preference row: {err}") from None
        messages = pair["prompt"] + pair["chosen"]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RowError("no_assistant_turn", "the conversation has no non-empty assistant turn to learn from")
    return messages


def build_conversation_mix(
    entries: list[MixEntry], seed: int, skip_invalid: bool, roles: frozenset[str] = CHAT_ROLES
) -> tuple[list, dict[str, Any]]:
    """Load, validate and mix the datasets into conversations; returns (conversations, statistics)."""
    rng = random.Random(seed)
    mixed: list[list[Message]] = []
    stats: dict[str, Any] = {"datasets": []}
    for entry in entries:
        rows = load_rows(entry.name, entry.split)
        valid, dropped = [], {}
        for i, row in enumerate(rows):
            try:
                valid.append(conversation(row, roles))
            except RowError as err:
                if not skip_invalid:
                    raise UserError(
                        f"{entry.name}: row {i + 1}: {err} (--skip_invalid_rows drops such rows)"
                    ) from None
                dropped[str(err)] = dropped.get(str(err), 0) + 1
        chosen = sample_indices(len(valid), target_rows(entry.amount, len(valid)), rng)
        mixed.extend(valid[i] for i in chosen)
        stats["datasets"].append(
            {
                "name": entry.name,
                "rows": len(rows),
                "valid": len(valid),
                "taken": len(chosen),
                "dropped_invalid": dropped,
            }
        )
    return mixed, stats


def _prefix_counter(tokenizer: Any, text: str) -> tuple[list[int], Any]:
    """(ids of ``text``, f(char position) -> number of ids that start before it)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in enc["offset_mapping"]]
        return enc["input_ids"], lambda pos: sum(1 for s in starts if s < pos)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def count(pos: int) -> int:  # slow tokenizers have no offsets: the common prefix of the ids
        prefix = tokenizer(text[:pos], add_special_tokens=False)["input_ids"]
        n = 0
        while n < min(len(ids), len(prefix)) and ids[n] == prefix[n]:
            n += 1
        return n

    return ids, count


def tokenize_conversation(tokenizer: Any, messages: list[Message], add_bos: bool = False) -> tuple[list, list]:
    """(input_ids, labels) of a whole conversation, labels IGNORE_INDEX outside the assistant turns."""
    full = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(start) or not full.startswith(end):
            raise UserError(
                "the chat template renders a conversation's start differently when more turns follow; "
                "pick another with --chat_template_name"
            )
        spans.append((len(start), len(end)))
    ids, count = _prefix_counter(tokenizer, full)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        for t in range(count(start), count(end)):
            labels[t] = ids[t]
    bos = tokenizer.bos_token_id
    if needs_bos(ids, bos, add_bos):
        ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
    return ids, labels


def prepare_sft_data(data: DataSettings, tokenizer: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Mix ``data.mixer_list``, validate, tokenize, truncate to ``max_seq_length``; returns (records with ``index``,
    statistics)."""
    entries = parse_mixer_list(data.mixer_list, data.mixer_list_splits)
    roles = template_roles(tokenizer)
    conversations, stats = build_conversation_mix(entries, data.seed, data.skip_invalid_rows, roles)
    if data.max_train_samples is not None:
        conversations = conversations[: data.max_train_samples]
    records, truncated, dropped = [], 0, 0
    limit = data.max_seq_length
    for messages in conversations:
        ids, labels = tokenize_conversation(tokenizer, messages, data.add_bos)
        if len(ids) > limit:
            ids, labels, truncated = ids[:limit], labels[:limit], truncated + 1
        if all(label == IGNORE_INDEX for label in labels[1:]):  # the first token is never predicted
            dropped += 1
            continue
        records.append({"index": len(records), "input_ids": ids, "labels": labels})
    if not records:
        raise UserError(
            f"no trainable conversations left out of {len(conversations)} (dropped {dropped}: "
            "no assistant tokens within --max_seq_length)"
        )
    stats.update(
        conversations=len(conversations),
        kept=len(records),
        dropped=dropped,
        truncated=truncated,
        label_tokens=sum(sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX) for r in records),
    )
    return records, stats


class SFTCollator:
    """Right-pads conversations: ``input_ids``/``attention_mask``/``labels`` ``[B, L]`` and ``index`` ``[B]``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in records)

        def pad(key: str, value: int) -> torch.Tensor:
            out = torch.full((len(records), length), value, dtype=torch.long)
            for i, r in enumerate(records):
                out[i, : len(r[key])] = torch.tensor(r[key], dtype=torch.long)
            return out

        attention = torch.zeros((len(records), length), dtype=torch.long)
        for i, r in enumerate(records):
            attention[i, : len(r["input_ids"])] = 1
        return {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": attention,
            "labels": pad("labels", IGNORE_INDEX),
            "index": torch.tensor([r["index"] for r in records], dtype=torch.long),
        }
