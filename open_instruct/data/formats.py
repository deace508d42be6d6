"""Any known row shape -> the normal form ``{"prompt": [msg...], "chosen": [msg], "rejected": [msg]}``.

A message is ``{"role": str, "content": str}``; its role is ``system``, ``user`` or ``assistant``, and ``tool`` only
where the chat template renders tool messages (the caller passes the roles its template renders:
:func:`open_instruct.data.tokenize.template_roles`). Any other role is refused, never dropped silently. The prompt holds every shared turn; chosen and rejected hold the final
assistant reply (one message each), which is the only part that gets labels.

Formats (``--dataset_format``; ``auto`` detects one per dataset from its columns and first row):

- ``messages``: Tulu 3 / UltraFeedback, ``chosen`` and ``rejected`` message lists sharing every message but the last.
- ``prompt_chosen_rejected``: TRL standard (three strings) or conversational (``prompt`` a message list, ``chosen`` and
  ``rejected`` one-message lists).
- ``hh_rlhf``: Anthropic HH-RLHF raw transcripts, ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` strings.
- ``shp``: Stanford SHP, ``history``, ``human_ref_A``, ``human_ref_B``, ``labels`` (1: A is preferred).

A row that cannot become a pair raises :class:`RowError` with a short ``reason`` (counted per dataset) and a detail.
Repairs that keep a row (merging consecutive turns of one speaker in a transcript) are counted in ``notes``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

Message = dict[str, str]
Pair = dict[str, list[Message]]

# Reasons a row is rejected (the keys of the per-dataset counts).
MISSING_FIELD = "missing_field"
BAD_MESSAGES = "bad_messages"
PROMPTS_DIFFER = "prompts_differ"
LAST_NOT_ASSISTANT = "last_turn_not_assistant"
EMPTY_PROMPT = "empty_prompt"
EMPTY_REPLY = "empty_reply"
IDENTICAL_REPLIES = "identical_replies"
BAD_LABEL = "bad_label"
NOT_A_TRANSCRIPT = "not_a_transcript"
BAD_ROLE = "bad_role"

CHAT_ROLES = frozenset({"system", "user", "assistant"})  # what every format accepts
ALL_ROLES = CHAT_ROLES | {"tool"}  # the most a chat template may render

# Notes: repairs applied to rows that are kept.
MERGED_TURNS = "merged_consecutive_turns"


class RowError(ValueError):
    """A row that cannot be turned into a preference pair: ``reason`` is a short key, the message says more."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def check_role(role: Any, roles: frozenset[str], where: str) -> None:
    """Refuse a message role outside ``roles`` (``where`` names the field and message)."""
    if isinstance(role, str) and role in roles:
        return
    if role == "tool":
        raise RowError(BAD_ROLE, f"{where}: role 'tool': the chat template does not render tool messages")
    shown = repr(role) if isinstance(role, str) else f"of type {type(role).__name__}"
    raise RowError(BAD_ROLE, f"{where}: role {shown} is not one of {', '.join(sorted(roles))}")


def _check_messages(value: Any, field: str, roles: frozenset[str] = CHAT_ROLES) -> list[Message]:
    if value is None:
        raise RowError(MISSING_FIELD, f"field '{field}' is missing")
    if not isinstance(value, list) or not value:
        shown = "an empty list" if isinstance(value, list) else type(value).__name__
        raise RowError(
            BAD_MESSAGES, f"field '{field}' must be a non-empty list of {{role, content}} messages, got {shown}"
        )
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError(BAD_MESSAGES, f"field '{field}' message {i} must have 'role' and 'content'")
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            raise RowError(BAD_MESSAGES, f"field '{field}' message {i} content must be a string, got {kind}")
        check_role(message["role"], roles, f"field '{field}' message {i}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _string(row: dict[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        raise RowError(MISSING_FIELD, f"field '{field}' is missing")
    if not isinstance(value, str):
        raise RowError(BAD_MESSAGES, f"field '{field}' must be a string, got {type(value).__name__}")
    return value


def _finish(prompt: list[Message], chosen: Message, rejected: Message) -> Pair:
    """Checks every format shares: a non-empty prompt, two non-empty assistant replies that differ."""
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise RowError(EMPTY_PROMPT, "the prompt is empty")
    for side, message in (("chosen", chosen), ("rejected", rejected)):
        if message["role"] != "assistant":
            raise RowError(
                LAST_NOT_ASSISTANT,
                f"the last '{side}' message must be from the assistant, got role '{message['role']}'",
            )
        if not message["content"].strip():
            raise RowError(EMPTY_REPLY, f"the '{side}' reply is empty")
    if chosen["content"].strip() == rejected["content"].strip():
        raise RowError(IDENTICAL_REPLIES, "'chosen' and 'rejected' replies are the same text (nothing to prefer)")
    return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}


def from_messages(row: dict[str, Any], notes: Counter | None = None, roles: frozenset[str] = CHAT_ROLES) -> Pair:
    """Tulu 3 / UltraFeedback: ``chosen`` and ``rejected`` message lists sharing every message but the last."""
    chosen = _check_messages(row.get("chosen"), "chosen", roles)
    rejected = _check_messages(row.get("rejected"), "rejected", roles)
    if chosen[:-1] != rejected[:-1]:
        raise RowError(PROMPTS_DIFFER, "'chosen' and 'rejected' must share every message but the last")
    return _finish(chosen[:-1], chosen[-1], rejected[-1])


def from_prompt_chosen_rejected(
    row: dict[str, Any], notes: Counter | None = None, roles: frozenset[str] = CHAT_ROLES
) -> Pair:
    """TRL standard (strings) and conversational (``prompt`` messages, one-message ``chosen``/``rejected``)."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = _check_messages(prompt, "prompt", roles)
    replies = []
    for name in ("chosen", "rejected"):
        value = row.get(name)
        if isinstance(value, str):
            replies.append({"role": "assistant", "content": value})
            continue
        messages = _check_messages(value, name, roles)
        if len(messages) != 1:
            raise RowError(BAD_MESSAGES, f"field '{name}' must hold exactly one reply message, got {len(messages)}")
        replies.append(messages[0])
    return _finish(prompt_messages, replies[0], replies[1])


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def split_transcript(text: str, field: str) -> tuple[list[Message], bool]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> (messages, whether consecutive turns of one speaker merged)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError(NOT_A_TRANSCRIPT, f"field '{field}' is not a '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript")
    messages: list[Message] = []
    merged = False
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            # The speaker went on in a second turn: one turn of the conversation, joined by a blank line.
            messages[-1]["content"] = (messages[-1]["content"] + "\n\n" + content).strip()
            merged = True
        else:
            messages.append({"role": role, "content": content})
    return messages, merged


def from_hh_rlhf(row: dict[str, Any], notes: Counter | None = None, roles: frozenset[str] = CHAT_ROLES) -> Pair:
    """Anthropic HH-RLHF: two transcripts; the turns before the last become the prompt."""
    chosen, merged_chosen = split_transcript(_string(row, "chosen"), "chosen")
    rejected, merged_rejected = split_transcript(_string(row, "rejected"), "rejected")
    if (merged_chosen or merged_rejected) and notes is not None:
        notes[MERGED_TURNS] += 1
    if chosen[:-1] != rejected[:-1]:
        raise RowError(PROMPTS_DIFFER, "the 'chosen' and 'rejected' transcripts differ before the last reply")
    return _finish(chosen[:-1], chosen[-1], rejected[-1])


def from_shp(row: dict[str, Any], notes: Counter | None = None, roles: frozenset[str] = CHAT_ROLES) -> Pair:
    """Stanford SHP: the post (``history``) is the prompt; ``labels`` 1 prefers ``human_ref_A``, 0 ``human_ref_B``."""
    history = _string(row, "history")
    ref_a, ref_b = _string(row, "human_ref_A"), _string(row, "human_ref_B")
    label = row.get("labels")
    if label is None:
        raise RowError(MISSING_FIELD, "field 'labels' is missing")
    if isinstance(label, bool) or label not in (0, 1):
        raise RowError(BAD_LABEL, f"field 'labels' must be 0 or 1, got {label!r}")
    chosen, rejected = (ref_a, ref_b) if label == 1 else (ref_b, ref_a)
    return _finish(
        [{"role": "user", "content": history}],
        {"role": "assistant", "content": chosen},
        {"role": "assistant", "content": rejected},
    )


Parser = Callable[[dict[str, Any], Counter | None, frozenset[str]], Pair]

# name -> (parser, columns the format needs).
FORMATS: dict[str, tuple[Parser, tuple[str, ...]]] = {
    "messages": (from_messages, ("chosen", "rejected")),
    "prompt_chosen_rejected": (from_prompt_chosen_rejected, ("prompt", "chosen", "rejected")),
    "hh_rlhf": (from_hh_rlhf, ("chosen", "rejected")),
    "shp": (from_shp, ("history", "human_ref_A", "human_ref_B", "labels")),
}


def detect_format(columns: list[str], first_row: dict[str, Any] | None = None) -> str:
    """The format name for a dataset with these columns (and this first row); raises RowError when none fits."""
    present = set(columns)
    first_row = first_row or {}
    chosen = first_row.get("chosen")
    if {"history", "human_ref_A", "human_ref_B", "labels"} <= present:
        return "shp"
    if {"prompt", "chosen", "rejected"} <= present:
        # Tulu/UltraFeedback rows carry a `prompt` string too, but their chosen side is the whole conversation.
        if isinstance(chosen, list) and len(chosen) > 1:
            return "messages"
        return "prompt_chosen_rejected"
    if {"chosen", "rejected"} <= present:
        return "hh_rlhf" if isinstance(chosen, str) else "messages"
    expected = " | ".join("{" + ", ".join(req) + "}" for _, req in FORMATS.values())
    raise RowError(MISSING_FIELD, f"unrecognised columns {sorted(present)}; expected one of {expected}")


def missing_columns(columns: list[str], format_name: str) -> list[str]:
    """The columns a format needs that a dataset lacks."""
    return [c for c in FORMATS[format_name][1] if c not in set(columns)]


def normalize(
    row: dict[str, Any], format_name: str, notes: Counter | None = None, roles: frozenset[str] = CHAT_ROLES
) -> Pair:
    """One raw row in the named format -> the normal form (raises RowError); repairs are counted in ``notes``;
    a message role outside ``roles`` is refused."""
    parser, required = FORMATS[format_name]
    missing = [name for name in required if name not in row]
    if missing:
        raise RowError(
            MISSING_FIELD,
            f"missing field(s) {', '.join(missing)}; found {', '.join(sorted(row)) or 'none'}; "
            f"expected {', '.join(required)}",
        )
    return parser(row, notes, roles)
