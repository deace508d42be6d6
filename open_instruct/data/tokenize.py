"""Render pairs with the chat template, tokenize, put labels on the final reply only, truncate, filter.

The whole conversation is rendered and tokenized in one piece, and the label boundary is found from character
offsets, so the ids are exactly those the chat template gives for the full conversation: no token merges or splits
differently at the prompt/reply boundary than it would for the conversation as a whole. A token that straddles the
boundary (prompt text and reply text in one token) is labelled, so no reply character goes untrained; such pairs are
counted. BOS: added only with ``add_bos`` and only when the rendered text does not start with it. EOS: a reply that
already ends with the EOS text loses it, since every template appends its own; and the sequence ends at the reply's
EOS token: what a template adds after it (ChatML's newline after ``<|im_end|>``, as SmolLM and Qwen render) is the
start of the next turn's layout, not the reply, so it is neither trained on nor kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from open_instruct.errors import UserError

IGNORE_INDEX = -100
# Part of the prepared-data cache key: a cache written by an earlier tokenization is not reused.
# 2: sequences end at the reply's EOS token (text after it dropped).
TOKENIZATION_VERSION = 2
BATCH = 512  # texts per fast-tokenizer call: big enough for its Rust parallelism, small enough for memory

PROMPT_TOO_LONG = "prompt_too_long"
NO_REPLY_TOKENS = "no_reply_tokens"


@dataclass
class TokenizeStats:
    """What tokenization kept, dropped (by reason) and cut."""

    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    boundary_merges: int = 0
    eos_stripped: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def add(self, result: TokenizedPair) -> None:
        """Count one pair's outcome (cuts and merges count for kept pairs only)."""
        self.eos_stripped += result.eos_stripped
        if result.drop_reason is not None:
            self.drop(result.drop_reason)
            return
        self.truncated += result.truncated
        self.boundary_merges += result.boundary_merge
        self.kept += 1


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text for these messages."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_PROBE = "role-probe-7f3a"
# Where a role's message sits in a probe conversation: a system message leads, a tool result follows a reply.
_PROBES = {
    "system": [{"role": "system", "content": _PROBE}, {"role": "user", "content": "q"}],
    "tool": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "tool", "content": _PROBE},
    ],
}


def needs_bos(ids: list[int], bos: int | None, add_bos: bool) -> bool:
    """Whether ``--add_bos`` puts the BOS token in front of ``ids``: asked for, the tokenizer has one, and the chat
    template did not already start with it."""
    return add_bos and bos is not None and (not ids or ids[0] != bos)


def template_roles(tokenizer: Any) -> frozenset[str]:
    """The message roles this tokenizer's chat template renders: ``user`` and ``assistant`` always; ``system`` and
    ``tool`` when a probe message of that role shows up in the rendered text (a template that drops a role, or
    raises on it, would train on conversations that silently lost those turns)."""
    roles = {"user", "assistant"}
    for role, messages in _PROBES.items():
        try:
            rendered = render(tokenizer, messages, add_generation_prompt=True)
        except (
            Exception
        ):  # jinja raises its own TemplateError (and templates call raise_exception) on roles they refuse
            continue
        if _PROBE in rendered:
            roles.add(role)
    return frozenset(roles)


def _strip_eos(reply: list[dict[str, str]], eos: str | None) -> tuple[list[dict[str, str]], bool]:
    content = reply[0]["content"]
    if eos and content.rstrip().endswith(eos):
        return [{**reply[0], "content": content.rstrip()[: -len(eos)]}], True
    return reply, False


def _encode(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]] | None]:
    """Token ids of each text without added special tokens, and character offsets when the tokenizer is fast."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts], None
    ids, offsets = [], []
    for start in range(0, len(texts), BATCH):
        # The Rust tokenizer directly: what the fast tokenizer's __call__ runs, without building dicts per text.
        for encoding in backend.encode_batch(texts[start : start + BATCH], add_special_tokens=False):
            ids.append(encoding.ids)
            offsets.append(encoding.offsets)
    return ids, offsets


def _prompt_length(
    ids: list[int], offsets: list[tuple[int, int]] | None, boundary: int, prompt_ids: list[int] | None
) -> int:
    """How many leading ids lie wholly inside the prompt's ``boundary`` characters."""
    if offsets is not None:
        n = 0
        while n < len(offsets) and offsets[n][1] <= boundary:
            n += 1
        return n
    # Slow tokenizers have no offsets: the prompt is the common prefix of the prompt's ids and the whole's ids.
    n = 0
    while n < min(len(ids), len(prompt_ids)) and ids[n] == prompt_ids[n]:
        n += 1
    return n


def _end_at_eos(ids: list[int], n_prompt: int, eos: int | None) -> list[int]:
    """``ids`` up to and including the last EOS token after the prompt (all of them when the reply has none)."""
    if eos is not None:
        for end in range(len(ids) - 1, n_prompt - 1, -1):
            if ids[end] == eos:
                return ids[: end + 1]
    return ids


def tokenize_side(
    tokenizer: Any, prompt: list[dict[str, str]], reply: list[dict[str, str]], add_bos: bool
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one prompt + reply, labels IGNORE_INDEX outside the reply; no length limit."""
    pair = {"index": 0, "prompt": prompt, "chosen": reply, "rejected": reply}
    records, _ = tokenize_pairs(tokenizer, [pair], max_seq_length=1 << 62, add_bos=add_bos)
    if not records:
        raise UserError("the reply renders to no tokens")
    return records[0]["chosen_input_ids"], records[0]["chosen_labels"]


@dataclass
class TokenizedPair:
    """One pair's outcome: its ids and labels (``record``, None when dropped) and what happened on the way."""

    record: dict[str, list[int]] | None
    drop_reason: str | None = None
    truncated: bool = False
    boundary_merge: bool = False
    eos_stripped: int = 0


def _thinking_boundary(tokenizer: Any, prompt: list[dict[str, str]], prompt_text: str, full_text: str) -> str:
    """The prompt's text when the generation prompt is not a prefix of the reply: thinking templates (open-instruct's
    ``olmo_thinker``, ``tulu_thinker``) open the reply with ``<think>``, which a reply without it does not repeat.
    The history must still be a prefix; the reply then starts where the two renderings part."""
    history = render(tokenizer, prompt, add_generation_prompt=False)
    if not full_text.startswith(history):
        raise UserError(
            "the chat template renders the prompt differently when a reply follows, so the "
            "reply cannot be labelled alone; pick another with --chat_template_name"
        )
    common = len(history)
    while common < min(len(prompt_text), len(full_text)) and prompt_text[common] == full_text[common]:
        common += 1
    return full_text[:common]


def _render_all(tokenizer: Any, pairs: list[dict[str, Any]]) -> tuple[list[str], list[str], list[int]]:
    """(prompt texts, full texts: chosen and rejected of each pair in turn, EOS strips per pair)."""
    eos = tokenizer.eos_token
    prompts, fulls, stripped_counts = [], [], []
    for pair in pairs:
        prompt_text = render(tokenizer, pair["prompt"], add_generation_prompt=True)
        prompts.append(prompt_text)
        stripped_count = 0
        for side in ("chosen", "rejected"):
            reply, stripped = _strip_eos(pair[side], eos)
            stripped_count += stripped
            full_text = render(tokenizer, pair["prompt"] + reply, add_generation_prompt=False)
            if not full_text.startswith(prompt_text):
                prompt_text = _thinking_boundary(tokenizer, pair["prompt"], prompt_text, full_text)
            fulls.append(full_text)
        prompts[-1] = prompt_text
        stripped_counts.append(stripped_count)
    return prompts, fulls, stripped_counts


def tokenize_each(
    tokenizer: Any,
    pairs: list[dict[str, Any]],
    max_seq_length: int,
    add_bos: bool = False,
    max_response_length: int | None = None,
) -> list[TokenizedPair]:
    """One :class:`TokenizedPair` per normalized pair, in order (the unit both preparation paths share)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompts, fulls, stripped_counts = _render_all(tokenizer, pairs)
    full_ids, full_offsets = _encode(tokenizer, fulls)
    prompt_ids = None if full_offsets is not None else _encode(tokenizer, prompts)[0]
    results = []
    for p in range(len(pairs)):
        record: dict[str, list[int]] = {}
        drop_reason, was_cut, merged = None, False, False
        for s, side in enumerate(("chosen", "rejected")):
            ids = full_ids[2 * p + s]
            offsets = full_offsets[2 * p + s] if full_offsets is not None else None
            n_prompt = _prompt_length(ids, offsets, len(prompts[p]), prompt_ids[p] if prompt_ids else None)
            merged |= offsets is not None and n_prompt < len(offsets) and offsets[n_prompt][0] < len(prompts[p])
            if needs_bos(ids, bos, add_bos):
                ids, n_prompt = [bos] + ids, n_prompt + 1
            ids = _end_at_eos(ids, n_prompt, eos)
            if n_prompt >= max_seq_length:
                drop_reason = PROMPT_TOO_LONG
                break
            if max_response_length is not None and len(ids) - n_prompt > max_response_length:
                ids, was_cut = ids[: n_prompt + max_response_length], True
            if len(ids) > max_seq_length:
                ids, was_cut = ids[:max_seq_length], True
            if n_prompt >= len(ids):
                drop_reason = NO_REPLY_TOKENS
                break
            record[f"{side}_input_ids"] = list(ids)
            record[f"{side}_labels"] = [IGNORE_INDEX] * n_prompt + list(ids[n_prompt:])
        kept = drop_reason is None
        results.append(TokenizedPair(record if kept else None, drop_reason, was_cut, merged, stripped_counts[p]))
    return results


def tokenize_pairs(
    tokenizer: Any,
    pairs: list[dict[str, Any]],
    max_seq_length: int,
    add_bos: bool = False,
    max_response_length: int | None = None,
) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """Tokenize normalized pairs into ``{index, chosen_input_ids, chosen_labels, rejected_input_ids,
    rejected_labels}``; a pair whose prompt alone fills ``max_seq_length`` is dropped, longer replies are cut at the
    end (at ``max_response_length`` reply tokens too, when given). ``index`` is renumbered 0..kept-1 in order (the
    reference cache is a table by index)."""
    stats = TokenizeStats()
    out = []
    for result in tokenize_each(tokenizer, pairs, max_seq_length, add_bos, max_response_length):
        stats.add(result)
        if result.record is not None:
            out.append({"index": len(out), **result.record})
    return out, stats
