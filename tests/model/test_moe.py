"""MoE load balancing: router logits through the chunked log-prob path, the loss, its gradient, and a CLI run."""

from __future__ import annotations

import pytest
import torch

from open_instruct.errors import UserError
from open_instruct.model.moe import capture_router_logits, load_balancing_loss, switch_load_balancing_loss
from open_instruct.objectives.combination import combined_loss
from open_instruct.objectives.logprobs import chunked_logprobs
from open_instruct.objectives.losses import LossSettings
from open_instruct.training.preference import PreferenceSettings, preference_step
from tests.conftest import read_metrics, run_cli, small_run_args


def _moe_model(kind: str, vocab_size: int, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM

    common = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "pad_token_id": 0,
    }
    torch.manual_seed(seed)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(num_local_experts=4, tie_word_embeddings=False, **common))
    return OlmoeForCausalLM(OlmoeConfig(num_experts=4, **common))


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory):
    """A tiny Mixtral-shaped model with the synthetic task's tokenizer."""
    from open_instruct.data.synthetic import build_tokenizer

    tokenizer = build_tokenizer()
    folder = tmp_path_factory.mktemp("moe") / "model"
    model = _moe_model("mixtral", len(tokenizer))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _batch(vocab: int, n: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(n // 2)}


def test_own_loss_matches_transformers_helper():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(3)
    logits = tuple(torch.randn(2 * 9, 6, generator=g) * 2 for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, -2:] = 0
    for m in (None, mask):
        ours = switch_load_balancing_loss(logits, 6, 2, m)
        torch.testing.assert_close(ours, load_balancing_loss_func(logits, 6, 2, m), rtol=1e-5, atol=1e-6)
    # Perfect balance (each expert gets a quarter of the tokens and of the probability mass) gives top_k = 1;
    # sending every token to one expert gives num_experts = 4.
    balanced = (20.0 * torch.nn.functional.one_hot(torch.arange(8) % 4, 4).float(),)
    collapsed = (20.0 * torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), 4).float(),)
    assert float(switch_load_balancing_loss(balanced, 4, 1)) == pytest.approx(1.0, abs=1e-6)
    assert float(switch_load_balancing_loss(collapsed, 4, 1)) == pytest.approx(4.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["mixtral", "olmoe"])
def test_router_logits_through_chunked_path_match_full_model_aux_loss(kind):
    model = _moe_model(kind, vocab_size=50)
    batch = _batch(50)
    with capture_router_logits(model) as router:
        lp = chunked_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size=4)
    assert len(router.calls) == 1 and len(router.calls[0][0]) == 2  # one decoder call, two layers
    expected = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
    ).aux_loss
    torch.testing.assert_close(router.aux_loss(), expected, rtol=1e-5, atol=1e-6)
    assert lp.sums.shape == (4,)
    # Hooks are gone afterwards: a plain decoder call no longer returns router logits.
    decoder = getattr(model, model.base_model_prefix)
    assert not decoder(input_ids=batch["input_ids"]).router_logits


def test_aux_loss_is_logged_and_changes_the_gradient():
    model = _moe_model("mixtral", vocab_size=50)
    batch = _batch(50)
    loss_fn, normalized = combined_loss(["dpo_norm"]), True

    def logprob_fn(m, b):
        return chunked_logprobs(m, b["input_ids"], b["attention_mask"], b["labels"], chunk_size=8)

    def gate_grads(weight):
        model.zero_grad()
        settings = PreferenceSettings(normalized, LossSettings(5.0, 0.0, 0.3), load_balancing_weight=weight)
        loss, metrics = preference_step(model, batch, logprob_fn, loss_fn, None, settings)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if ".gate." in n])
        return loss.detach(), metrics, grads

    loss_off, metrics_off, grads_off = gate_grads(None)
    loss_on, metrics_on, grads_on = gate_grads(0.5)
    assert "aux_loss" not in metrics_off
    aux = float(metrics_on["aux_loss"]) / 2  # metrics are per-pair sums; the batch holds 2 pairs
    assert aux > 0
    assert float(loss_on - loss_off) == pytest.approx(0.5 * aux, rel=1e-5)
    assert not torch.allclose(grads_on, grads_off)


def test_dense_model_is_rejected(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from open_instruct.config import TrainArguments
    from open_instruct.model.modeling import load_model, load_tokenizer
    from open_instruct.settings import ModelSettings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match="mixture-of-experts"):
        with capture_router_logits(model):
            pass
    settings = ModelSettings.of(
        TrainArguments(
            model_name_or_path=str(tiny_model_dir), load_balancing_loss=True, reference_logprobs_cache_path="unused"
        )
    )
    with pytest.raises(UserError, match="--load_balancing_loss needs a mixture-of-experts model"):
        load_model(settings, load_tokenizer(settings), log=lambda line: None)


def test_fallback_used_without_transformers_helper(monkeypatch):
    import transformers.models.mixtral.modeling_mixtral as mixtral

    logits = (torch.randn(8, 4),)
    expected = switch_load_balancing_loss(logits, 4, 2)
    monkeypatch.delattr(mixtral, "load_balancing_loss_func")
    torch.testing.assert_close(load_balancing_loss(logits, 4, 2), expected)


@pytest.mark.slow
def test_moe_cli_run_logs_aux_loss(moe_model_dir, synthetic_data, tmp_path):
    train, _ = synthetic_data
    out = tmp_path / "out"
    args = small_run_args(
        moe_model_dir,
        train,
        out,
        mixer_list=[str(train), "16"],
        load_balancing_loss="true",
        load_balancing_weight="0.01",
    )
    result = run_cli(args, tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MoE with 4 experts, top-2" in result.stdout
    rows = read_metrics(out)
    assert rows and all(row["aux_loss"] > 0 for row in rows)
