"""PyTorch's packed-attention kernels as attention implementations (open_instruct/packed_kernels.py) on CPU.

``flex_packed`` runs anywhere (uncompiled FlexAttention); ``torch_varlen`` needs CUDA and is checked by
tests/model/test_gpu_paths.py. Here: the document ids, and packed log-probs and gradients equal to the padded path's.
"""

from __future__ import annotations

import pytest
import torch

from open_instruct.data.collate import PackedPairCollator, PaddedPairCollator
from open_instruct.model.packed_kernels import FLEX_PACKED, TORCH_VARLEN, document_ids, register_packed_kernels
from open_instruct.model.packing import packed_sequence_logprobs
from open_instruct.objectives.logprobs import sequence_logprobs
from open_instruct.settings import ModelSettings
from tests.model.test_packing import load, random_records


def test_document_ids():
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    assert document_ids(cu, 9).tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]


def test_flex_packed_equals_padded(tiny_model_dir):
    """Values only: FlexAttention has no backward on CPU (gradients: tests/model/test_gpu_paths.py)."""
    from transformers import AutoConfig

    records = random_records(4, AutoConfig.from_pretrained(tiny_model_dir).vocab_size, seed=5)
    model = load(tiny_model_dir, "sdpa")
    padded = PaddedPairCollator(pad_token_id=0)(records)
    with torch.no_grad():
        expected = sequence_logprobs(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
        register_packed_kernels()
        model.set_attn_implementation(FLEX_PACKED)
        packed = packed_sequence_logprobs(model, PackedPairCollator()(records))
    torch.testing.assert_close(packed.sums, expected.sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.counts, expected.counts)


def test_torch_varlen_runs_padded_batches_as_causal_sdpa():
    """``--attn_implementation torch_varlen`` with padded rows (evaluation, ``--packing false``): plain causal SDPA,
    grouped key/value heads repeated."""
    from open_instruct.model.packed_kernels import torch_varlen_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    out, _ = torch_varlen_attention(torch.nn.Module(), q, k, v, None, scaling=0.5)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5
    scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    expected = (scores.softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    assert out.shape == (2, 5, 4, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_packing_keeps_the_packed_kernels():
    from open_instruct.model.packing import VARLEN_SDPA, packed_attention_implementation

    assert packed_attention_implementation(TORCH_VARLEN) == TORCH_VARLEN
    assert packed_attention_implementation(FLEX_PACKED) == FLEX_PACKED
    assert packed_attention_implementation(VARLEN_SDPA) == VARLEN_SDPA
    assert packed_attention_implementation("sdpa") == VARLEN_SDPA


def test_torch_varlen_flag_checks(monkeypatch):
    """Refused before any work: without CUDA, and in fp32 (the kernel takes bf16/fp16 only)."""
    from open_instruct.config.cli import parse_args
    from open_instruct.errors import UserError
    from open_instruct.model import modeling

    monkeypatch.setattr(modeling, "_cuda_capability", lambda: None)
    with pytest.raises(UserError, match="torch_varlen needs a CUDA GPU"):
        modeling.resolve_attn_implementation(TORCH_VARLEN)
    pytest.importorskip("torch.nn.attention.varlen")
    monkeypatch.setattr(modeling, "_cuda_capability", lambda: (9, 0))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert modeling.resolve_attn_implementation(TORCH_VARLEN) == (TORCH_VARLEN, "requested")
    base = ["--model_name_or_path", "m", "--attn_implementation", TORCH_VARLEN]
    with pytest.raises(UserError, match="bf16/fp16 only: add --mixed_precision bf16 \\(got no\\)"):
        modeling.check_model_options(ModelSettings.of(parse_args(base)))
    modeling.check_model_options(ModelSettings.of(parse_args([*base, "--mixed_precision", "bf16"])))
