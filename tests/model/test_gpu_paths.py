"""GPU-only checks (``pytest -m gpu``; skipped without CUDA). Run by ``scripts/bench/gpu_suite.sh`` part ``tests``.

- Liger (its RMSNorm, RoPE and SwiGLU patched in, fused linear cross-entropy for log-probs) against the chunked path
  on the unpatched model: log-probs and every gradient, fp32 and bf16 (autocast).
- Packed against padded log-probs and gradients with each packed attention kernel available here: ``sdpa_varlen``
  (the product's default), flash-attention 2/3 varlen when installed, and PyTorch's own ``torch_varlen``
  (``torch.nn.attention.varlen``) and ``flex_packed`` (FlexAttention, document mask) from open_instruct/packed_kernels.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from open_instruct.data.collate import PackedPairCollator, PaddedPairCollator
from open_instruct.model.packed_kernels import FLEX_PACKED, TORCH_VARLEN, register_packed_kernels
from open_instruct.model.packing import packed_sequence_logprobs, prepare_model_for_packing
from open_instruct.objectives.logprobs import sequence_logprobs
from tests.data_helpers import random_pair_records
from tests.model_helpers import rel, tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
VOCAB = 4096
# Relative error ||a - b|| / ||b|| accepted: fp32 (no TF32) lands near 1e-6; bf16 operands between 1e-3 and 1e-2.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def llama(attn: str = "sdpa"):
    sizes = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 4}
    model = tiny_llama(attn, vocab_size=VOCAB, max_position_embeddings=512, **sizes)
    return model.cuda().eval()


def records(n: int = 6, seed: int = 0) -> list[dict]:
    return random_pair_records(n, seed, VOCAB, (3, 20), (5, 120), low=1)


def to_cuda(batch: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def values_and_grads(model, fn, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        lp = fn(model)
    assert lp.sums.dtype == torch.float32
    lp.sums.sum().backward()
    return lp.sums.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_liger_matches_chunked(dtype):
    from open_instruct.model.liger import apply_liger_kernels, liger_available

    assert liger_available("cuda"), "liger-kernel is not installed here"
    plain = llama()
    patched = copy.deepcopy(plain)
    apply_liger_kernels(patched)
    batch = to_cuda(PaddedPairCollator(0)(records()))
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref, ref_grads = values_and_grads(plain, lambda m: sequence_logprobs(m, *args, impl="chunked"), dtype)
    got, grads = values_and_grads(patched, lambda m: sequence_logprobs(m, *args, impl="liger"), dtype)
    assert rel(got, ref) < TOLERANCE[dtype]
    worst = max(ref_grads, key=lambda n: rel(grads[n], ref_grads[n]))
    assert rel(grads[worst], ref_grads[worst]) < TOLERANCE[dtype], worst


def packed_kernels() -> list[str]:
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    kernels = ["sdpa", FLEX_PACKED]  # sdpa becomes sdpa_varlen for packing
    try:
        import torch.nn.attention.varlen  # noqa: F401

        kernels.append(TORCH_VARLEN)
    except ImportError:
        pass
    if is_flash_attn_2_available():
        kernels.append("flash_attention_2")
    if is_flash_attn_3_available():
        kernels.append("flash_attention_3")
    return kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attn", packed_kernels())
def test_packed_matches_padded(attn, dtype):
    if (attn.startswith("flash") or attn == TORCH_VARLEN) and dtype == torch.float32:
        pytest.skip("flash-attention kernels have no fp32 version")
    rows = records()
    padded_model = llama("sdpa")
    packed_model = copy.deepcopy(padded_model)
    if attn in (TORCH_VARLEN, FLEX_PACKED):
        register_packed_kernels()
        packed_model.set_attn_implementation(attn)
    else:
        packed_model.config._attn_implementation = attn
        attn = prepare_model_for_packing(packed_model)
    assert packed_model.config._attn_implementation == attn
    padded = to_cuda(PaddedPairCollator(0)(rows))
    packed = to_cuda(PackedPairCollator()(rows))
    ref, ref_grads = values_and_grads(
        padded_model,
        lambda m: sequence_logprobs(m, padded["input_ids"], padded["attention_mask"], padded["labels"]),
        dtype,
    )
    got, grads = values_and_grads(packed_model, lambda m: packed_sequence_logprobs(m, packed), dtype)
    assert rel(got, ref) < TOLERANCE[dtype]
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < TOLERANCE[dtype]
