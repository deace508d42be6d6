"""Our chat templates, selectable with ``--chat_template_name``.

Each renders a BOS at most once (only ``olmo`` renders one itself; ``--add_bos`` adds it to the others) and one EOS
after each assistant reply, and its prompt rendered with ``add_generation_prompt`` is a prefix of the conversation
rendered with the reply, which the tokenizer relies on to find the label boundary.
"""

_ROLE_MARKERS = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
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
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    # ChatML (Qwen, OpenHermes): <|im_start|>role ... <|im_end|>; EOS is the tokenizer's, appended to replies.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
