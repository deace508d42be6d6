"""LoRA: only adapters train, the log-prob path uses them, the reference runs without them, saves load back."""

from __future__ import annotations

import json

import pytest
import torch

from open_instruct.config import TrainArguments
from open_instruct.model.lora import adapters_disabled
from open_instruct.model.modeling import load_model, load_tokenizer
from open_instruct.objectives.logprobs import chunked_logprobs, full_logprobs
from open_instruct.settings import ModelSettings
from tests.conftest import read_metrics, run_cli, small_run_args

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _args(model_dir, **overrides) -> TrainArguments:
    values = {
        "model_name_or_path": str(model_dir),
        "mixer_list": ["unused", "1"],
        "use_lora": True,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "reference_logprobs_cache_path": "unused",
    }
    values.update(overrides)
    return TrainArguments(**values)


def _batch(tokenizer, n: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, len(tokenizer), (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded row
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lora_model(model_dir):
    settings = ModelSettings.of(_args(model_dir))
    tokenizer = load_tokenizer(settings)
    lines: list[str] = []
    model = load_model(settings, tokenizer, log=lines.append)
    return settings, tokenizer, model, lines


def _randomize_adapters(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_only_adapter_weights_train(tiny_model_dir):
    _, tokenizer, model, lines = _lora_model(tiny_model_dir)
    assert any("LoRA on 14 modules" in line for line in lines), lines
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(tokenizer)
    for _ in range(3):
        loss = -chunked_logprobs(model, **batch, chunk_size=7).sums.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_logprob_path_uses_adapters_and_reference_disables_them(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    _, tokenizer, model, _ = _lora_model(tiny_model_dir)
    _randomize_adapters(model)
    model.eval()
    batch = _batch(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        with_adapters = chunked_logprobs(model, **batch, chunk_size=5).sums
        through_peft_forward = full_logprobs(model, **batch).sums  # PeftModel.forward -> logits
        base_lp = full_logprobs(base, **batch).sums
        with adapters_disabled(model):
            disabled = chunked_logprobs(model, **batch, chunk_size=5).sums
        after = chunked_logprobs(model, **batch, chunk_size=5).sums
    torch.testing.assert_close(with_adapters, through_peft_forward, rtol=1e-5, atol=1e-5)
    assert (with_adapters - base_lp).abs().max() > 1e-2  # the adapters really change the decoder's output
    torch.testing.assert_close(disabled, base_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, with_adapters)  # the context manager re-enables them


def test_saved_adapter_equals_trained_and_merged_loads(tiny_model_dir, tmp_path):
    from accelerate import Accelerator
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from open_instruct.training.checkpointing import save_final_model

    _, tokenizer, model, _ = _lora_model(tiny_model_dir)
    _randomize_adapters(model, seed=2)
    save_final_model(Accelerator(cpu=True), model, tokenizer, tmp_path, merge_lora=True)
    assert not (tmp_path / ".final_model.tmp").exists()

    trained = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    reloaded = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
    assert reloaded.keys() == trained.keys()
    for name, value in trained.items():
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0)

    # Merged weights, independently: W + (alpha / r) * B @ A on a targeted module, untouched elsewhere.
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = (8 / 4) * trained[f"{prefix}.lora_B.default.weight"] @ trained[f"{prefix}.lora_A.default.weight"]
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[key], original[key] + delta, rtol=1e-6, atol=1e-6)
    assert set(merged) == set(original)
    for name, value in original.items():
        if not any(f".{t}." in name for t in TARGETS):
            torch.testing.assert_close(merged[name], value, rtol=0, atol=0)

    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(
            full_logprobs(merged_model, **batch).sums, full_logprobs(loaded, **batch).sums, rtol=1e-4, atol=1e-4
        )


@pytest.mark.slow
def test_lora_cli_run_saves_adapter_and_merged_model(tiny_model_dir, synthetic_data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, _ = synthetic_data
    out = tmp_path / "out"
    args = small_run_args(
        tiny_model_dir,
        train,
        out,
        mixer_list=[str(train), "32"],
        use_lora="true",
        lora_rank="4",
        merge_lora="true",
        learning_rate="1e-2",
    )
    result = run_cli(args, tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA on 14 modules" in result.stdout
    rows = read_metrics(out)
    assert len(rows) == 4 and rows[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # reference = untouched base
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == set(TARGETS)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, out)
    assert any(p.abs().max() > 0 for n, p in loaded.named_parameters() if "lora_B" in n)  # trained (B starts at 0)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert merged.config.vocab_size == len(AutoTokenizer.from_pretrained(out / "merged"))
    original = load_file(tiny_model_dir / "model.safetensors")
    saved = load_file(out / "merged" / "model.safetensors")
    for name, value in original.items():
        targeted = any(f".{t}." in name for t in TARGETS)
        assert torch.equal(saved[name], value) != targeted, name  # only adapted modules moved


def test_merged_save_keeps_tied_embeddings(tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from open_instruct.data.synthetic import build_tokenizer
    from open_instruct.model.lora import LoraSettings, apply_lora, save_lora_model

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = apply_lora(LlamaForCausalLM(config), LoraSettings(rank=4, dropout=0.0))
    _randomize_adapters(model)
    save_lora_model(Accelerator(cpu=True), model, tokenizer, tmp_path, merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
    batch = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(
            full_logprobs(merged, **batch).sums, full_logprobs(model.eval(), **batch).sums, rtol=1e-4, atol=1e-4
        )
