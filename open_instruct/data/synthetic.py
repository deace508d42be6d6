"""The embedded default: a tiny Llama-shaped model, its tokenizer, and a learnable synthetic preference task.

The task has two rules a small model can pick up from data but not by memorising pairs (held-out prompts are new):
- ``repeat``: the prompt lists 3-5 words; the chosen reply repeats them in order, the rejected reply swaps one of them
  for a word that is not in the prompt.
- ``count``: the prompt says ``count up from N to M`` or ``count down from N to M``; the chosen reply counts in that
  direction, the rejected reply in the other. Held-out prompts start at numbers that training prompts never start at.
Everything is generated from a seed, so tests and the demo need no download.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path
from typing import Any

WORDS = (
    "apple banana cherry grape lemon mango melon orange peach pear plum berry cat dog horse mouse tiger lion zebra "
    "eagle shark whale river ocean forest desert island valley mountain castle bridge tower garden window door table "
    "chair lamp clock mirror candle basket"
).split()
MAX_NUMBER = 60
NUMBERS = [str(i) for i in range(-10, MAX_NUMBER + 10)]
FILLER = "please repeat these words : count up down from the".split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

# Tulu-style template: BOS once, role markers, EOS after every assistant reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _repeat_pair(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    wrong = list(words)
    wrong[rng.randrange(len(words))] = rng.choice([w for w in WORDS if w not in words])
    return "please repeat these words : " + " ".join(words), " ".join(words), " ".join(wrong)


def _count_pair(rng: random.Random, held_out: bool) -> tuple[str, str, str]:
    # Held-out prompts start at numbers training never starts at (the numbers themselves still occur mid-count).
    starts = [n for n in range(MAX_NUMBER) if (n % 7 == 3) == held_out]
    start, length = rng.choice(starts), rng.randint(3, 6)
    up = " ".join(str(start + i) for i in range(length))
    down = " ".join(str(start - i) for i in range(length))
    if rng.random() < 0.5:
        return f"count up from {start} to {start + length - 1}", up, down
    return f"count down from {start} to {start - length + 1}", down, up


def make_pair(rng: random.Random, held_out: bool = False) -> dict[str, Any]:
    """One synthetic preference pair in the messages format."""
    if rng.random() < 0.5:
        prompt, chosen, rejected = _repeat_pair(rng)
    else:
        prompt, chosen, rejected = _count_pair(rng, held_out)
    user = {"role": "user", "content": prompt}
    return {
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
    }


def make_split(n: int, seed: int, held_out: bool = False, exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """``n`` pairs with distinct repeat prompts, none of them in ``exclude``; count prompts may recur."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    while len(rows) < n:
        row = make_pair(rng, held_out)
        prompt = row["chosen"][0]["content"]
        if prompt in seen:
            continue
        if prompt.startswith("please repeat"):
            seen.add(prompt)
        rows.append(row)
    return rows


def write_task(folder: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (disjoint prompts) into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = make_split(n_train, seed)
    test = make_split(n_test, seed + 1, held_out=True, exclude={r["chosen"][0]["content"] for r in train})
    paths = []
    for name, rows in (("train", train), ("test", test)):
        path = folder / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]


def write_text_corpus(folder: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Raw text for pretraining, ``train.txt`` and ``test.txt`` (one document per line, disjoint prompts): each task
    prompt followed by its correct reply, in the tokenizer's vocabulary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = make_split(n_train, seed + 100)
    test = make_split(n_test, seed + 101, held_out=True, exclude={r["chosen"][0]["content"] for r in train})
    paths = []
    for name, rows in (("train", train), ("test", test)):
        path = folder / f"{name}.txt"
        lines = [f"{r['chosen'][0]['content']} : {r['chosen'][1]['content']}" for r in rows]
        tmp = path.with_suffix(".txt.tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]


def write_tokenizer(folder: str | Path) -> Path:
    """Save the task's tokenizer (no model) as a Hugging Face folder."""
    folder = Path(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def build_tokenizer() -> Any:
    """A word-level fast tokenizer over the task's vocabulary, with a chat template."""
    # deferred: transformers takes about a second to import; writing the task's data needs no tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast  # as above

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS + NUMBERS + FILLER)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_tiny_model(
    folder: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, vocab_size: int | None = None
) -> Path:
    """Save a randomly initialised tiny Llama and the task's tokenizer as a Hugging Face folder."""
    import torch  # deferred, as in build_tokenizer: only writing the model needs them
    from transformers import LlamaConfig, LlamaForCausalLM  # as above

    folder = Path(folder)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    """``python -m open_instruct.data.synthetic OUT_DIR``: write the tiny model (OUT_DIR/model) and task data."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--n_train", type=int, default=10000)
    parser.add_argument("--n_test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    train, test = write_task(out / "data", args.n_train, args.n_test, args.seed)
    model = write_tiny_model(out / "model", seed=args.seed)
    print(f"wrote {model}, {train}, {test}")


if __name__ == "__main__":
    main()
