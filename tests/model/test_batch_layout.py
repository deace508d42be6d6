"""The default batch layout (packed where proven equal to padded) and the lean padded path (no padding mask)."""

from __future__ import annotations

import pytest
import torch

from open_instruct.config import TrainArguments
from open_instruct.config.cli import parse_args
from open_instruct.data.collate import PackedPairCollator, PaddedPairCollator
from open_instruct.model.batch_layout import (
    GPU_PROOF,
    choose_batch_layout,
    computes_in_half,
    needs_padding_mask,
    varlen_kernel_fits,
)
from open_instruct.model.packed_kernels import TORCH_VARLEN
from open_instruct.model.packing import VARLEN_SDPA, packed_sequence_logprobs
from open_instruct.objectives.logprobs import sequence_logprobs
from tests.model.test_packing import load, random_records

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def choose(model, device=CPU, packing=None, group=None, separate=False, resumed=None, half=False):
    return choose_batch_layout(model, device, packing, group, separate, resumed, half)


def test_packing_flag_is_a_tri_state():
    base = ["--model_name_or_path", "m", "--reference_logprobs_cache_path", "x"]
    assert parse_args(base).packing is None
    assert parse_args(base + ["--packing"]).packing is True  # open-instruct's bare flag
    assert parse_args(base + ["--packing", "false"]).packing is False
    assert parse_args(base + ["--padding_free", "true"]).packing is True
    assert TrainArguments(reference_logprobs_cache_path="x").group_by_length is None


def test_default_on_cpu_packs_with_per_sequence_attention(tiny_model_dir):
    model = load(tiny_model_dir, "sdpa")
    layout = choose(model)
    assert (layout.packing, layout.group_by_length, layout.attention) == (True, False, VARLEN_SDPA)
    assert model.config._attn_implementation == VARLEN_SDPA  # the model was switched
    assert layout.describe() == (
        "batching: packed rows, attention sdpa_varlen (default on cpu: proven equal to padded batches "
        "(tests/model/test_packing.py))"
    )


def test_explicit_and_fallback_choices(tiny_model_dir):
    model = load(tiny_model_dir, "sdpa")
    off = choose(model, packing=False)
    assert (off.packing, off.group_by_length, off.attention, off.reason) == (False, False, "sdpa", "--packing false")
    assert model.config._attn_implementation == "sdpa"  # untouched
    cuda = choose(model, device=CUDA)  # the CUDA branch looks at the device type only
    assert (cuda.packing, cuda.group_by_length) == (False, True)
    assert "default on CUDA without torch_varlen (needs bf16/fp16" in cuda.reason
    assert "padded rows, grouped by length" in cuda.describe()
    assert not choose(model, device=CUDA, group=False).group_by_length
    separate = choose(model, separate=True)
    assert not separate.packing and "--separate_forward splits padded rows" in separate.reason
    model._supports_attention_backend = False  # e.g. remote code with its own attention
    custom = choose(model)
    assert not custom.packing and "does not route attention through transformers" in custom.reason
    assert choose(model, packing=True).packing  # an explicit --packing is obeyed


def test_cuda_in_half_precision_packs_with_torch_varlen(tiny_model_dir):
    """The CUDA branches look at the device type only, so a CPU model shows them."""
    pytest.importorskip("torch.nn.attention.varlen")
    model = load(tiny_model_dir, "sdpa")
    layout = choose(model, device=CUDA, half=True)
    assert (layout.packing, layout.group_by_length, layout.attention) == (True, False, TORCH_VARLEN)
    assert model.config._attn_implementation == TORCH_VARLEN
    assert layout.describe() == f"batching: packed rows, attention torch_varlen (default on cuda: {GPU_PROOF})"
    explicit = load(tiny_model_dir, "sdpa")  # --packing on CUDA: torch_varlen too, sdpa_varlen only in fp32
    assert choose(explicit, device=CUDA, packing=True, half=True).attention == TORCH_VARLEN
    assert choose(load(tiny_model_dir, "sdpa"), device=CUDA, packing=True).attention == VARLEN_SDPA
    assert choose(load(tiny_model_dir, "sdpa"), packing=True, half=True).attention == VARLEN_SDPA  # CPU
    flash = load(tiny_model_dir, "sdpa")
    flash.config._attn_implementation = "flash_attention_2"  # not measured packed yet: padded by default
    assert not varlen_kernel_fits(flash, CUDA, True)
    assert not choose(flash, device=CUDA, half=True).packing
    assert computes_in_half(model, "bf16") and not computes_in_half(model, "no")
    assert computes_in_half(model.to(torch.bfloat16), None)


def test_resumed_run_keeps_the_checkpoint_layout(tiny_model_dir):
    model = load(tiny_model_dir, "sdpa")
    layout = choose(model, resumed={"packing": False, "group_by_length": False})
    assert (layout.packing, layout.group_by_length) == (False, False)
    assert layout.reason == "default: the layout of the checkpoint being resumed"
    assert choose(model, packing=True, resumed={"packing": False}).packing  # a flag given now still wins


def test_padding_mask_kept_only_where_it_matters(tiny_model_dir):
    assert not needs_padding_mask(load(tiny_model_dir, "sdpa"), load_balancing=False)
    assert needs_padding_mask(load(tiny_model_dir, "sdpa"), load_balancing=True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_without_mask_equals_masked_and_packed(tiny_model_dir, attn):
    """Right-padded rows under causal attention: dropping the mask changes no log-prob or gradient (fp32, 1e-5)."""
    from transformers import AutoConfig

    records = random_records(6, AutoConfig.from_pretrained(tiny_model_dir).vocab_size, seed=5)
    model = load(tiny_model_dir, attn)
    padded = PaddedPairCollator(pad_token_id=0)(records)
    assert (padded["attention_mask"] == 0).any()  # the check needs padding
    results = []
    for mask in (padded["attention_mask"], None):
        lp = sequence_logprobs(model, padded["input_ids"], mask, padded["labels"], impl="chunked")
        lp.sums.sum().backward()
        results.append((lp.sums.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (masked, masked_grads), (unmasked, unmasked_grads) = results
    torch.testing.assert_close(unmasked, masked, atol=1e-5, rtol=1e-5)
    for a, b in zip(unmasked_grads, masked_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    choose(model)  # the default layout on CPU: packed
    packed = packed_sequence_logprobs(model, PackedPairCollator()(records))
    torch.testing.assert_close(packed.sums, masked, atol=1e-5, rtol=1e-5)
