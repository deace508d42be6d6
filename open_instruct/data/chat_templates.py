"""The chat templates ``--chat_template_name`` selects: open-instruct's table (:mod:`.open_instruct_templates`) and ours.

Rules the templates in ``LABEL_RULE_TEMPLATES`` keep (tests check each on a real BPE tokenizer):
- at most one BOS: none renders one itself; ``--add_bos`` adds it, never twice;
- each assistant reply ends with exactly one EOS, and the conversation's final reply ends right there (no trailing
  newline gets a label);
- the prompt rendered with ``add_generation_prompt`` is a character prefix of the conversation rendered with the
  reply, which the tokenizer relies on to find the label boundary.
"""

from open_instruct.data.open_instruct_templates import OPEN_INSTRUCT_TEMPLATES

HH_RLHF = "hh_rlhf"
# What a tokenizer without a chat template gets (with a note naming it): the transcript of the preference data the
# DPO paper used, so a base tokenizer (GPT-2) trains on HH-RLHF's own layout.
DEFAULT_TEMPLATE = HH_RLHF

# After a turn: EOS, then a newline unless it ends the rendered text (last message, no generation prompt after it).
_NEWLINE = "('' if loop.last and not add_generation_prompt else '\n')"

_OURS: dict[str, str] = {
    # ChatML (Qwen, OpenHermes): <|im_start|>role ... <|im_end|>. A reply also ends with the tokenizer's EOS unless
    # that EOS is <|im_end|> itself (Qwen instruct), so the model learns to stop either way and never sees it twice.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
        "{% if message['role'] == 'assistant' and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}"
        "{{ " + _NEWLINE + " }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Anthropic HH-RLHF's raw transcript, the text the DPO paper (Rafailov et al. 2023) trained on:
    # "\n\nHuman: ...\n\nAssistant: ...". The generation prompt stops at the colon so that the reply's leading space
    # joins its first word, as in the transcript (byte-level BPE: " Sure" is one token). A system message leads as
    # plain text; a reply ends with EOS, so the model learns to stop.
    HH_RLHF: (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ '\n\nAssistant: ' + message['content'] + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
    ),
}

# Every name --chat_template_name takes: open-instruct's table (same names, same text), then ours.
CHAT_TEMPLATES: dict[str, str] = {**OPEN_INSTRUCT_TEMPLATES, **_OURS}

# The templates that keep the three rules above (tests check each); open-instruct's others render what open-instruct
# renders, e.g. zephyr's newline after the final EOS, or no EOS at all in the R1 and RL-zero prompts.
LABEL_RULE_TEMPLATES: tuple[str, ...] = ("tulu", "olmo", "chatml", HH_RLHF)

# Names that keep the tokenizer's own template. open-instruct falls back to the tokenizer's template for any name
# missing from its table, and its Olmo 3 scripts rely on that with "olmo123"; here that fallback is this explicit
# list (any other unknown name is an error).
TOKENIZER_TEMPLATE_NAMES: tuple[str, ...] = ("olmo123",)
