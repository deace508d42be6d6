"""Model loading options: attention choice, extra arguments, remote code, QLoRA without CUDA, pad-token growth."""

from __future__ import annotations

import json
import math

import pytest
import torch

from open_instruct.config import TrainArguments, validate
from open_instruct.errors import UserError
from open_instruct.model.modeling import (
    grow_embeddings,
    load_model,
    load_tokenizer,
    logprob_model_options,
    parse_additional_model_arguments,
    resolve_attn_implementation,
)
from open_instruct.settings import ModelSettings
from tests.conftest import run_cli, small_run_args

NO_CUDA = not torch.cuda.is_available()


def _args(model_dir, **overrides) -> TrainArguments:
    values = {
        "model_name_or_path": str(model_dir),
        "mixer_list": ["unused", "1"],
        "reference_logprobs_cache_path": "x",
    }
    values.update(overrides)
    return TrainArguments(**values)


def _model(model_dir, **overrides) -> ModelSettings:
    return ModelSettings.of(_args(model_dir, **overrides))


def _load(model_dir, **overrides):
    settings = _model(model_dir, **overrides)
    lines: list[str] = []
    model = load_model(settings, load_tokenizer(settings), log=lines.append)
    return model, lines


@pytest.fixture(scope="module")
def no_pad_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer has no pad token (and no '<pad>' in its vocabulary); vocab = tokenizer size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from open_instruct.data import synthetic

    tokens = list(
        dict.fromkeys(
            t for t in synthetic.SPECIAL + synthetic.WORDS + synthetic.NUMBERS + synthetic.FILLER if t != "<pad>"
        )
    )
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = synthetic.CHAT_TEMPLATE
    assert tokenizer.pad_token is None and len(tokenizer) % 8 != 7  # adding one token must force a round-up
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("nopad") / "model"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_attention_default_and_requests_are_logged(tiny_model_dir):
    model, lines = _load(tiny_model_dir)
    expected, why = resolve_attn_implementation(None)
    assert f"model: attention implementation {expected} ({why})" in lines
    if NO_CUDA:
        assert (expected, why) == ("sdpa", "default: no CUDA device")
    assert model.config._attn_implementation == expected
    model, lines = _load(tiny_model_dir, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert "model: attention implementation eager (requested)" in lines


def test_bad_attention_requests_fail_clearly():
    with pytest.raises(UserError, match="must be one of"):
        resolve_attn_implementation("flash")
    if NO_CUDA:
        with pytest.raises(UserError, match="flash_attention_2 needs a CUDA GPU"):
            resolve_attn_implementation("flash_attention_2")


def test_additional_model_arguments(tiny_model_dir):
    model, _ = _load(tiny_model_dir, additional_model_arguments='{"rms_norm_eps": 0.001}')
    assert model.config.rms_norm_eps == 0.001
    with pytest.raises(UserError, match="not valid JSON"):
        parse_additional_model_arguments('{"rms_norm_eps": }')
    with pytest.raises(UserError, match="must be a JSON object, got list"):
        parse_additional_model_arguments("[1, 2]")


def test_trust_remote_code_gates_custom_model_code(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "custom_llama.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
        "class CustomLlamaConfig(LlamaConfig):\n    model_type = 'custom_llama'\n\n"
        "class CustomLlamaForCausalLM(LlamaForCausalLM):\n    config_class = CustomLlamaConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="custom_llama",
        architectures=["CustomLlamaForCausalLM"],
        auto_map={
            "AutoConfig": "custom_llama.CustomLlamaConfig",
            "AutoModelForCausalLM": "custom_llama.CustomLlamaForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="could not load model .* contains custom code"):
        _load(folder)
    model, _ = _load(folder, trust_remote_code=True, tokenizer_name_or_path=str(tiny_model_dir))
    assert type(model).__name__ == "CustomLlamaForCausalLM"


def test_logprob_model_options_follow_revisions_and_quantization(tiny_model_dir):
    model, _ = _load(tiny_model_dir)
    base = logprob_model_options(_model(tiny_model_dir), model)
    rows = model.get_input_embeddings().num_embeddings
    # part of the reference-cache key: the same keys and values as ever, so older caches still load
    assert base == {
        "model_revision": None,
        "tokenizer_revision": None,
        "additional_model_arguments": {},
        "quantization": None,
        "vocab_rows": rows,
    }
    for change in (
        {"model_revision": "abc123"},
        {"tokenizer_revision": "v2"},
        {"use_qlora": True},
        {"additional_model_arguments": '{"rope_theta": 1000.0}'},
        {"config_name": "olmo3_7B"},
    ):
        assert logprob_model_options(_model(tiny_model_dir, **change), model) != base, change
    assert logprob_model_options(_model(tiny_model_dir), model) == base
    yarn = logprob_model_options(_model(tiny_model_dir, rope_scaling_factor=2.0), model)["rope_scaling"]
    assert yarn == {
        "rope_type": "yarn",
        "factor": 2.0,
        "beta_fast": 32,
        "beta_slow": 1,
        "original_max_position_embeddings": 8192,
    }


def test_model_flag_validation():
    def problems(**values):
        with pytest.raises(UserError) as err:
            validate(
                TrainArguments(
                    model_name_or_path="m", mixer_list=["d", "1"], reference_logprobs_cache_path="x", **values
                )
            )
        return str(err.value)

    assert "--merge_lora needs --use_lora" in problems(merge_lora=True)
    assert "--merge_lora with --use_qlora is not supported" in problems(use_qlora=True, merge_lora=True)
    assert "--lora_rank must be >= 1" in problems(use_lora=True, lora_rank=0)
    assert "--load_balancing_weight must be >= 0" in problems(load_balancing_loss=True, load_balancing_weight=-1)
    validate(
        TrainArguments(
            model_name_or_path="m",
            mixer_list=["d", "1"],
            reference_logprobs_cache_path="x",
            use_lora=True,
            merge_lora=True,
            load_balancing_loss=True,
        )
    )


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
def test_qlora_without_cuda_fails_before_any_work(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = small_run_args(tiny_model_dir, tmp_path / "missing.jsonl", out, use_qlora="true")
    result = run_cli(args, tmp_path / "cache")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --use_qlora needs a CUDA GPU (bitsandbytes 4-bit NF4); none found on this machine"
    )
    assert not out.exists() or not any(out.iterdir())  # not even the data was read (its file does not exist)


def test_new_embedding_rows_are_the_mean_of_the_old(no_pad_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(no_pad_model_dir, dtype=torch.float32)
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    rows = old_emb.shape[0]
    assert grow_embeddings(model, rows + 1) == (rows, math.ceil((rows + 1) / 8) * 8)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == model.config.vocab_size == math.ceil((rows + 1) / 8) * 8
    torch.testing.assert_close(emb[:rows], old_emb, rtol=0, atol=0)
    torch.testing.assert_close(emb[rows:], old_emb.mean(0).expand(emb.shape[0] - rows, -1))
    torch.testing.assert_close(head[rows:], old_head.mean(0).expand(head.shape[0] - rows, -1))
    assert grow_embeddings(model, rows) == (emb.shape[0], emb.shape[0])  # already big enough: untouched


@pytest.mark.slow
def test_tokenizer_without_pad_token_trains_and_saves_consistent_sizes(no_pad_model_dir, synthetic_data, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, _ = synthetic_data
    out = tmp_path / "out"
    result = run_cli(small_run_args(no_pad_model_dir, train, out, mixer_list=[str(train), "16"]), tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = AutoTokenizer.from_pretrained(no_pad_model_dir).__len__()
    grown = math.ceil((rows + 1) / 8) * 8
    assert f"embeddings grown from {rows} to {grown} rows" in result.stdout
    assert "model: attention implementation sdpa (default: no CUDA device)" in result.stdout or not NO_CUDA

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    weights = load_file(out / "model.safetensors")
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == rows and len(tokenizer) == rows + 1
    assert model.config.vocab_size == grown == weights["model.embed_tokens.weight"].shape[0]
    assert weights["lm_head.weight"].shape[0] == grown
    assert model.config.pad_token_id == tokenizer.pad_token_id
