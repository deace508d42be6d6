"""PyTorch's packed-attention kernels as attention implementations (open_instruct/packed_kernels.py) on CPU.

``flex_packed`` runs anywhere (uncompiled FlexAttention); ``torch_varlen`` needs CUDA and is checked by
tests/test_gpu_paths.py. Here: the document ids, and packed log-probs and gradients equal to the padded path's.
"""

from __future__ import annotations

import pytest
import torch
from test_packing import load, random_records

from open_instruct.data.collate import PackedPairCollator, PaddedPairCollator
from open_instruct.model.packed_kernels import FLEX_PACKED, document_ids, register_packed_kernels
from open_instruct.model.packing import packed_sequence_logprobs
from open_instruct.objectives.logprobs import sequence_logprobs


def test_document_ids():
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    assert document_ids(cu, 9).tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]


def test_flex_packed_equals_padded(tiny_model_dir):
    """Values only: FlexAttention has no backward on CPU (gradients: tests/test_gpu_paths.py)."""
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


def test_torch_varlen_needs_a_packed_batch():
    from open_instruct.model.packed_kernels import torch_varlen_attention

    pytest.importorskip("torch.nn.attention.varlen")
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="needs a packed batch"):
        torch_varlen_attention(torch.nn.Module(), q, q, q, None)
