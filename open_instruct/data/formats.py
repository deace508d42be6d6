"""Any known row shape -> the normal form ``{"prompt": [msg...], "chosen": [msg], "rejected": [msg]}``.

A message is ``{"role": str, "content": str}``. The prompt holds every shared turn; chosen and rejected hold the final
assistant reply (one message each), which is the only part that gets labels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Message = dict[str, str]
Pair = dict[str, list[Message]]


class RowError(ValueError):
    """A row that cannot be turned into a preference pair; the message names the field and the reason."""


def _check_messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{field}' must be a non-empty list of {{role, content}} messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError(f"field '{field}' message {i} must have 'role' and 'content'")
        if not isinstance(message["content"], str):
            raise RowError(f"field '{field}' message {i} content must be a string")
    return [{"role": str(m["role"]), "content": m["content"]} for m in value]


def _finish(prompt: list[Message], chosen: Message, rejected: Message) -> Pair:
    for side, message in (("chosen", chosen), ("rejected", rejected)):
        if message["role"] != "assistant":
            raise RowError(f"the last '{side}' message must be from the assistant, got role '{message['role']}'")
        if not message["content"].strip():
            raise RowError(f"the '{side}' reply is empty")
    return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}


def from_messages(row: dict[str, Any]) -> Pair:
    """Tulu 3 / UltraFeedback: ``chosen`` and ``rejected`` message lists sharing every message but the last."""
    chosen = _check_messages(row.get("chosen"), "chosen")
    rejected = _check_messages(row.get("rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("'chosen' and 'rejected' must share every message but the last")
    return _finish(chosen[:-1], chosen[-1], rejected[-1])


def from_prompt_chosen_rejected(row: dict[str, Any]) -> Pair:
    """TRL standard (strings) and conversational (``prompt`` messages, one-message ``chosen``/``rejected``)."""
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("field 'prompt' is empty")
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = _check_messages(prompt, "prompt")
    replies = []
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, str):
            replies.append({"role": "assistant", "content": value})
        else:
            messages = _check_messages(value, name)
            if len(messages) != 1:
                raise RowError(f"field '{name}' must hold exactly one reply message, got {len(messages)}")
            replies.append(messages[0])
    return _finish(prompt_messages, replies[0], replies[1])


# name -> (parser, columns that identify the format). Detection picks the first whose columns are all present.
FORMATS: dict[str, tuple[Callable[[dict[str, Any]], Pair], tuple[str, ...]]] = {
    "prompt_chosen_rejected": (from_prompt_chosen_rejected, ("prompt", "chosen", "rejected")),
    "messages": (from_messages, ("chosen", "rejected")),
}


def detect_format(columns: list[str], first_row: dict[str, Any] | None = None) -> str:
    """The format name for a dataset with these columns; raises RowError when none fits."""
    present = set(columns)
    if {"prompt", "chosen", "rejected"} <= present and first_row is not None:
        # Tulu/UltraFeedback rows carry a `prompt` string too, but their chosen side is the whole conversation.
        chosen = first_row.get("chosen")
        if isinstance(chosen, list) and len(chosen) > 1:
            return "messages"
    for name, (_, required) in FORMATS.items():
        if set(required) <= present:
            return name
    expected = " | ".join("{" + ", ".join(req) + "}" for _, req in FORMATS.values())
    raise RowError(f"unrecognised columns {sorted(present)}; expected one of {expected}")


def normalize(row: dict[str, Any], format_name: str) -> Pair:
    """One raw row in the named format -> the normal form (raises RowError)."""
    parser, required = FORMATS[format_name]
    missing = [name for name in required if name not in row]
    if missing:
        raise RowError(f"missing field(s) {', '.join(missing)}; found {', '.join(sorted(row)) or 'none'}; "
                       f"expected {', '.join(required)}")
    return parser(row)
