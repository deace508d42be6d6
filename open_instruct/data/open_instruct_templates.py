"""open-instruct's chat template table, by name, rendering the same text as open-instruct for the same messages.

The templates are built from a few shapes (Tulu role markers, OLMo's ChatML with a default system turn and function
slots, plain concatenations, R1-style preambles) with the per-name differences as parameters. Unlike ours in
:mod:`open_instruct.data.chat_templates`, some of these put a turn's EOS elsewhere than at the end of the reply (or
render none): they exist so open-instruct's recipes train on the same text as there.
"""

from __future__ import annotations

_LAST_EOS = "{% if loop.last and not add_generation_prompt %}{{ eos_token }}{% endif %}"
_EACH = "{% for message in messages %}"
_END = "{% endfor %}"


def _jinja_str(text: str) -> str:
    """A Jinja single-quoted string literal of ``text`` (newlines kept as the characters themselves)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _concat(separator: str, line: str = "message['content']") -> str:
    return _EACH + "{{ " + _jinja_str(separator) + " if not loop.first else '' }}{{ " + line + " }}" + _LAST_EOS + _END


def _tulu(generation: str, strip_thinking: bool = False) -> str:
    """Tulu role markers; the assistant's EOS, then a newline unless it is the last message."""
    content = "{% set content = message['content'] %}"
    if strip_thinking:
        content += "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    return (
        _EACH
        + "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
        + "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
        + "{% elif message['role'] == 'assistant' %}"
        + content
        + "{{ '<|assistant|>\n' + content + eos_token }}{% if not loop.last %}{{ '\n' }}{% endif %}"
        + "{% endif %}"
        + "{% if loop.last and add_generation_prompt %}{{ "
        + _jinja_str(generation)
        + " }}{% endif %}"
        + _END
    )


_NO_FUNCTIONS = " You do not currently have access to any functions. <functions></functions>"


def _olmo(default_system: str, generation: str, strip_intermediate_thinking: bool = False) -> str:
    """OLMo's ChatML: a default system turn when none is given, function slots, the last reply ends with EOS
    (earlier ones with <|im_end|>), environment turns."""
    if strip_intermediate_thinking:
        content = (
            "{% set content = message.get('content', none) %}{% if content is not none %}"
            "{% set content = content | string %}"
            "{% if not loop.last and '</think>' in content and '<think>' in content %}"
            "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
            "{{ content }}{% endif %}"
        )
    else:
        content = "{% if message.get('content', none) is not none %}{{ message['content'] }}{% endif %}"
    return (
        "{% set has_system = messages|selectattr('role', 'equalto', 'system')|list|length > 0 %}"
        "{% if not has_system %}{{ "
        + _jinja_str(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        + " }}{% endif %}"
        + _EACH
        + "{% if message['role'] == 'system' %}{{ '<|im_start|>system\n' + message['content'] }}"
        "{% if message.get('functions', none) is not none %}"
        "{{ ' <functions>' + message['functions'] + '</functions><|im_end|>\n' }}"
        "{% else %}{{ " + _jinja_str(_NO_FUNCTIONS + "<|im_end|>\n") + " }}{% endif %}"
        "{% elif message['role'] == 'user' %}{{ '<|im_start|>user\n' + message['content'] }}"
        "{% if message.get('functions', none) is not none %}"
        "{{ '\n<functions>' + message['functions'] + '</functions>' }}{% endif %}{{ '<|im_end|>\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        + content
        + "{% if message.get('function_calls', none) is not none %}"
        "{{ '<function_calls>' + message['function_calls'] + '</function_calls>' }}{% endif %}"
        "{% if not loop.last %}{{ '<|im_end|>\n' }}{% else %}{{ eos_token }}{% endif %}"
        "{% elif message['role'] == 'environment' %}"
        "{{ '<|im_start|>environment\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ " + _jinja_str("<|im_start|>assistant\n" + generation) + " }}"
        "{% endif %}" + _END
    )


_R1_PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>.\n\n"
)
_TOOL_PREAMBLE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The Assistant "
    "first thinks about the reasoning process in the mind and then provides the User with the answer. \n\n"
    "When given a question, the Assistant must conduct reasoning inside the <think> and </think> tags. During "
    "reasoning, the Assistant may write and execute python code using the <code> </code> tag, in order to solve the "
    "problem or verify the answer. Then the Assistant will get the stdout and stderr in the <output> and </output> "
    "tags. For example, the code could be\n<code>\nx, y = 1, 2\nresult = x + y\nprint(result)\n</code>\nor\n<code>\n"
    "import sympy as sp\nfrom sympy import Symbol\nx = Symbol('x')\ny = Symbol('y')\n"
    "solution = sp.solve(x**2 + y**2 - 1, (x, y))\nprint(solution)\n</code>\nThe Assistant will always `print` the "
    "result of the code execution in order to see it in the <output> tag. The Assistant may use the <code> </code> "
    "tag multiple times. When the Assistant is done reasoning, it should provide the answer inside the <answer> and "
    "</answer> tag.\n\n"
)
_ORZ_USER = (
    "You must put your answer inside <answer> </answer> tags, i.e., <answer> answer here </answer>. And your final "
    "answer will be extracted automatically by the \\boxed{} tag. This is the problem: "
)


def _paragraphs(preamble: str, line: str, generation: str, raw: bool = False) -> str:
    """A fixed preamble, then each message on its own paragraph (no EOS), then the generation prompt."""
    gen = generation if raw else "{{ " + _jinja_str(generation) + " }}"
    return (
        preamble
        + _EACH
        + "{{ '\n\n' if not loop.first else '' }}{{ "
        + line
        + " + '\n' }}{% if loop.last and add_generation_prompt %}"
        + gen
        + "{% endif %}"
        + _END
    )


_ROLE_LINE = "message['role'].capitalize() + ': ' + message['content']"
_ORZ_LINE = "message['role'].capitalize() + ': ' + " + _jinja_str(_ORZ_USER) + " + message['content']"
_OLMO_FUNCTIONS_SYSTEM = (
    "You are OLMo, a helpful function-calling AI assistant built by Ai2. Your date cutoff is November 2024, and your "
    "model weights are available at https://huggingface.co/allenai." + _NO_FUNCTIONS
)
_OLMO_THINKER_SYSTEM = "You are a helpful AI assistant."

OPEN_INSTRUCT_TEMPLATES: dict[str, str] = {
    "simple_concat_with_space": _concat(" "),
    "simple_concat_with_new_line": _concat("\n"),
    "simple_chat": _concat("\n\n", "message['role'].capitalize() + ': ' + message['content']"),
    "assistant_message_only": _EACH
    + "{% if message['role'] == 'assistant' %}{{ message['content'] }}{% endif %}"
    + _END,
    "zephyr": _EACH
    + "{% if message['role'] in ('user', 'system', 'assistant') %}"
    + "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endif %}"
    + "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    + _END,
    "olmo": _olmo(_OLMO_FUNCTIONS_SYSTEM, ""),
    "tulu": _tulu("<|assistant|>\n"),
    "tulu_thinker": _tulu("<|assistant|>\n<think>"),
    "tulu_thinker_r1_style": _R1_PREAMBLE + _tulu("<|assistant|>\n<think>", strip_thinking=True),
    "olmo_old": _olmo(_OLMO_FUNCTIONS_SYSTEM, ""),
    "olmo_thinker": _olmo(_OLMO_THINKER_SYSTEM, "<think>"),
    "olmo_thinker_no_think_7b": _olmo(
        "You are Olmo, a helpful AI assistant built by Ai2. Your date cutoff is December 2024, and your model weights "
        "are available at https://huggingface.co/allenai.",
        "",
    ),
    "olmo_thinker_remove_intermediate_thinking": _olmo(_OLMO_THINKER_SYSTEM, "<think>", True),
    "olmo_thinker_no_think_sft_tokenization": _olmo(_OLMO_THINKER_SYSTEM, ""),
    "olmo_thinker_rlzero": _paragraphs(
        "Solve the following problem step by step. The last line of your response should be the answer to the "
        "problem in form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n",
        "message['content']",
        '\nRemember to put your answer on its own line after "Answer:"',
    ),
    "olmo_thinker_code_rlzero": _paragraphs(
        "Solve the following code problem step by step. The last part of your response should be the solution to "
        "the problem in form ```\npython\nCODE\n``` where CODE is the solution for the problem.\n\n",
        "message['content']",
        "\nRemember to put your solution inside the ```\npython\nCODE\n``` tags",
        raw=True,
    ),
    "r1_simple_chat": _paragraphs(_R1_PREAMBLE, _ROLE_LINE, "Assistant:"),
    "r1_simple_chat_postpend_think": _paragraphs(_R1_PREAMBLE, _ROLE_LINE, "Assistant: <think>"),
    "r1_simple_chat_postpend_think_orz_style": _paragraphs(_R1_PREAMBLE, _ORZ_LINE, "Assistant: <think>"),
    "r1_simple_chat_postpend_think_tool_vllm": _paragraphs(_TOOL_PREAMBLE, _ORZ_LINE, "Assistant: <think>"),
    "qwen_instruct_user_boxed_math": _EACH
    + "{% if message['role'] == 'user' %}"
    + "{{ '<|im_start|>user\n' + message['content'] + "
    + _jinja_str("\n\nPlease reason step by step, and put your final answer within \\boxed{}<|im_end|>\n")
    + " }}"
    + "{% elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + message['content'] + '<|im_end|>\n' }}"
    + "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    + _END,
}
