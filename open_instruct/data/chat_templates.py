"""Our chat templates, selectable with ``--chat_template_name``.

Rules every template keeps (tests check each on a real BPE tokenizer):
- at most one BOS: only ``olmo`` renders one itself; ``--add_bos`` adds it to the others, never twice;
- each assistant reply ends with exactly one EOS, and the conversation's final reply ends right there (no trailing
  newline gets a label);
- the prompt rendered with ``add_generation_prompt`` is a character prefix of the conversation rendered with the
  reply, which the tokenizer relies on to find the label boundary.
"""

# After a turn: EOS, then a newline unless it ends the rendered text (last message, no generation prompt after it).
_NEWLINE = "('' if loop.last and not add_generation_prompt else '\n')"
_REPLY_END = "eos_token + " + _NEWLINE

_ROLE_MARKERS = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + " + _REPLY_END + " }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {
    # Tulu 2/3: role markers on their own line, EOS closes each assistant reply.
    "tulu": _ROLE_MARKERS,
    # OLMo 2 instruct: the Tulu layout behind a BOS.
    "olmo": "{{ bos_token }}" + _ROLE_MARKERS,
    # Zephyr: every turn, not only the assistant's, ends with EOS.
    "zephyr": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + " + _REPLY_END + " }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
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
}
