"""open-instruct's chat template names render the text open-instruct renders (expected strings written out here from
its template table), olmo123 keeps the tokenizer's own template, and thinking templates label the reply."""

from __future__ import annotations

import pytest

from open_instruct.config import CHAT_TEMPLATES as CHOICES
from open_instruct.data.chat_templates import CHAT_TEMPLATES
from open_instruct.data.tokenize import IGNORE_INDEX, tokenize_pairs
from tests.data_helpers import HH_SAMPLE, read_hh_rows, train_bpe_tokenizer

# open-instruct's CHAT_TEMPLATES (open_instruct/dataset_transformation.py, main of 2026-08), and the unregistered name
# its Olmo 3 scripts pass to keep the tokenizer's own template.
OPEN_INSTRUCT_NAMES = [
    "simple_concat_with_space", "simple_concat_with_new_line", "simple_chat", "assistant_message_only", "zephyr",
    "olmo", "tulu", "tulu_thinker", "tulu_thinker_r1_style", "olmo_old", "olmo_thinker", "olmo_thinker_no_think_7b",
    "olmo_thinker_remove_intermediate_thinking", "olmo_thinker_no_think_sft_tokenization", "olmo_thinker_rlzero",
    "olmo_thinker_code_rlzero", "r1_simple_chat", "r1_simple_chat_postpend_think",
    "r1_simple_chat_postpend_think_orz_style", "r1_simple_chat_postpend_think_tool_vllm",
    "qwen_instruct_user_boxed_math",
]  # fmt: skip


def _m(role, content):
    return {"role": role, "content": content}


SYSTEM_MULTI = [_m("system", "Be brief."), _m("user", "Hi"), _m("assistant", "Hello!"), _m("user", "2+2?")]
NO_SYSTEM = [_m("user", "Hi"), _m("assistant", "Hello!"), _m("user", "2+2?")]
THINKING = [_m("user", "2+2?"), _m("assistant", "<think>2 and 2</think>4")]
OLMO_SYSTEM = (
    "<|im_start|>system\nYou are OLMo, a helpful function-calling AI assistant built by Ai2. Your date cutoff is "
    "November 2024, and your model weights are available at https://huggingface.co/allenai. You do not currently "
    "have access to any functions. <functions></functions><|im_end|>\n"
)
R1 = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>.\n\n"
)

# (template, messages, add_generation_prompt, expected text); the EOS token is "</s>".
CASES = [
    ("tulu", SYSTEM_MULTI + [_m("assistant", "4")], False,
     "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?\n<|assistant|>\n4</s>"),
    ("tulu", SYSTEM_MULTI, True,
     "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?\n<|assistant|>\n"),
    ("olmo", NO_SYSTEM + [_m("assistant", "4")], False,
     OLMO_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
     "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4</s>"),
    ("olmo", SYSTEM_MULTI, True,
     "<|im_start|>system\nBe brief. You do not currently have access to any functions. <functions></functions>"
     "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
     "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"),
    ("olmo_thinker", THINKING, False,
     "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
     "<|im_start|>assistant\n<think>2 and 2</think>4</s>"),
    ("olmo_thinker", THINKING[:1], True,
     "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
     "<|im_start|>assistant\n<think>"),
    ("olmo_thinker_remove_intermediate_thinking",
     [_m("user", "A"), _m("assistant", "<think>x</think>\n\nB"), _m("user", "C"), _m("assistant", "<think>y</think>D")],
     False,
     "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\nA<|im_end|>\n"
     "<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nC<|im_end|>\n<|im_start|>assistant\n<think>y</think>D</s>"),
    ("tulu_thinker_r1_style", THINKING, False, R1 + "<|user|>\n2+2?\n<|assistant|>\n4</s>"),
    ("tulu_thinker", THINKING[:1], True, "<|user|>\n2+2?\n<|assistant|>\n<think>"),
    ("zephyr", [_m("system", "S"), _m("user", "Hi"), _m("assistant", "Yo")], False,
     "<|system|>\nS</s>\n<|user|>\nHi</s>\n<|assistant|>\nYo</s>\n"),
    ("simple_chat", [_m("user", "Hi"), _m("assistant", "Yo")], False, "User: Hi\n\nAssistant: Yo</s>"),
    ("simple_concat_with_space", [_m("user", "Hi"), _m("assistant", "Yo")], False, "Hi Yo</s>"),
    ("assistant_message_only", [_m("user", "Hi"), _m("assistant", "Yo")], False, "Yo"),
    ("r1_simple_chat_postpend_think", THINKING[:1], True, R1 + "User: 2+2?\nAssistant: <think>"),
    ("qwen_instruct_user_boxed_math", THINKING[:1], True,
     "<|im_start|>user\n2+2?\n\nPlease reason step by step, and put your final answer within \\boxed{}<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ("olmo_thinker_rlzero", [_m("user", "Q")], True,
     "Solve the following problem step by step. The last line of your response should be the answer to the problem "
     'in form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nQ\n\nRemember to put '
     'your answer on its own line after "Answer:"'),
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_every_open_instruct_name_is_a_choice():
    assert set(OPEN_INSTRUCT_NAMES) <= set(CHAT_TEMPLATES)
    assert set(OPEN_INSTRUCT_NAMES) | {"olmo123"} <= set(CHOICES)


@pytest.mark.parametrize(("name", "messages", "generation", "expected"), CASES)
def test_renders_what_open_instruct_renders(tokenizer, name, messages, generation, expected):
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    assert text == expected


def test_olmo123_keeps_the_tokenizers_own_template(tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    from open_instruct.config import TrainArguments
    from open_instruct.model.modeling import load_tokenizer
    from open_instruct.settings import ModelSettings

    own = AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    args = TrainArguments(
        model_name_or_path=str(tiny_model_dir), mixer_list=["d.jsonl", "1"], chat_template_name="olmo123"
    )
    assert load_tokenizer(ModelSettings.of(args)).chat_template == own
    assert "the tokenizer's own chat template" in capsys.readouterr().out


@pytest.fixture(scope="module")
def bpe():
    texts = [r[side] for r in read_hh_rows(HH_SAMPLE)[:200] for side in ("chosen", "rejected")]
    return train_bpe_tokenizer(texts, vocab_size=1500)


def test_thinking_template_labels_the_whole_reply_with_or_without_think(bpe):
    bpe.chat_template = CHAT_TEMPLATES["olmo_thinker"]
    pair = {
        "index": 0,
        "prompt": [_m("user", "How do I boil an egg?")],
        "chosen": [_m("assistant", "<think>water</think>Simmer it.")],
        "rejected": [_m("assistant", "You cannot.")],
    }
    records, stats = tokenize_pairs(bpe, [pair], max_seq_length=4096)
    assert stats.kept == 1
    for side, reply in (("chosen", "<think>water</think>Simmer it."), ("rejected", "You cannot.")):
        ids, labels = records[0][f"{side}_input_ids"], records[0][f"{side}_labels"]
        n_prompt = labels.count(IGNORE_INDEX)
        # Both sides part from the prompt right after the assistant header: the reply (and its EOS) is labelled.
        assert bpe.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
        assert bpe.decode(ids[n_prompt:]) == reply + bpe.eos_token
