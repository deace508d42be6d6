"""Our Liger log-prob path run by Triton's interpreter on CPU; prints one JSON object of measured errors.

Run by tests/model/test_liger.py in a subprocess: ``TRITON_INTERPRET=1`` must be set before Triton is first
imported, so it cannot be switched on inside the test process (which has imported Triton already, through the model
code). Every comparison is fp32 and relative: ||a - b|| / ||b|| per tensor, the largest over all tensors.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1 (Triton's interpreter must be chosen before Triton is imported)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # model_helpers

import torch  # noqa: E402

from open_instruct.data.tokenize import IGNORE_INDEX  # noqa: E402
from open_instruct.model.liger import liger_available  # noqa: E402
from open_instruct.objectives.logprobs import chunked_logprobs, sequence_logprobs  # noqa: E402
from tests.model_helpers import padded_rows, rel, tiny_llama  # noqa: E402


def batch() -> dict[str, torch.Tensor]:
    """Four right-padded rows ``[4, 12]``, labels after a 3-token prompt; row 3 has no label."""
    rows = padded_rows()
    rows["labels"][3] = IGNORE_INDEX
    return rows


def values_and_grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token log-probs ``[T]`` and every parameter's gradient of a weighted sum of them."""
    model.zero_grad(set_to_none=True)
    lp = fn(model)
    weights = torch.linspace(0.5, 1.5, lp.token_logps.shape[0])  # distinct per-token upstream gradients
    (lp.token_logps * weights).sum().backward()
    return lp.token_logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, reference_fn, liger_fn) -> dict[str, float]:
    ref_values, ref_grads = values_and_grads(model, reference_fn)
    values, grads = values_and_grads(model, liger_fn)
    assert set(grads) == set(ref_grads), sorted(set(ref_grads) ^ set(grads))
    return {"logprobs": rel(values, ref_values), "grads": max(rel(grads[n], ref_grads[n]) for n in ref_grads)}


def padded(impl: str):
    b = batch()
    return lambda m: sequence_logprobs(m, b["input_ids"], b["attention_mask"], b["labels"], impl=impl)


def under_bf16(fn):
    """``fn`` under bf16 autocast, as a ``--mixed_precision bf16`` run calls it (Liger gets bf16 operands)."""

    def run(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(model)

    return run


def kernel_checks() -> dict[str, str]:
    """Each Liger kernel that ``apply_liger_kernels`` installs, on small tensors: 'ok <rel error>' or the error."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(2)
    x, w = torch.randn(4, 32), torch.randn(32)
    a, b = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    angle = torch.randn(1, 6, 4)
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    cases = {
        "rms_norm": (
            lambda: LigerRMSNormFunction.apply(x, w, 1e-6),
            lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
        ),
        "swiglu": (lambda: LigerSiLUMulFunction.apply(a, b), lambda: torch.nn.functional.silu(a) * b),
        "rope": (
            lambda: torch.cat(liger_rotary_pos_emb(q, k, cos, sin), 1),
            lambda: torch.cat(apply_rotary_pos_emb(q, k, cos, sin), 1),
        ),
    }
    out = {}
    for name, (kernel, reference) in cases.items():
        try:
            out[name] = f"ok {rel(kernel(), reference()):.3g}"
        except Exception as err:  # noqa: BLE001 - recorded for the test to judge
            out[name] = f"{type(err).__name__}: {err}"[:300]
    return out


def main() -> None:
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    result: dict[str, object] = {"liger_available_cpu": liger_available("cpu")}
    model = tiny_llama().eval()
    result["flce_padded"] = compare(model, padded("chunked"), padded("liger"))
    b = batch()
    result["flce_chunk_of_3"] = compare(model, lambda m: chunked_logprobs(m, **b, chunk_size=3), padded("liger"))
    result["flce_bf16_autocast"] = compare(model, under_bf16(padded("chunked")), under_bf16(padded("liger")))
    result["kernels"] = kernel_checks()
    # RoPE is the model kernel the interpreter runs: patch it in and compare the whole Liger path once more with the
    # pure PyTorch model (computed first, before the patch replaces the rotary function module-wide).
    reference = values_and_grads(model, padded("chunked"))
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=False, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=False
    )
    from transformers.models.llama import modeling_llama

    patched, calls = modeling_llama.apply_rotary_pos_emb, []
    result["rope_patched"] = patched.__module__

    def counting(*args, **kwargs):
        calls.append(1)
        return patched(*args, **kwargs)

    modeling_llama.apply_rotary_pos_emb = counting
    values, grads = values_and_grads(model, padded("liger"))
    result["rope_calls"] = len(calls)
    result["rope_and_flce"] = {
        "logprobs": rel(values, reference[0]),
        "grads": max(rel(grads[n], reference[1][n]) for n in reference[1]),
    }
    with torch.no_grad():  # no-grad passes must not call the fused kernel: poison it and run one
        import liger_kernel.transformers.functional as functional

        functional.liger_fused_linear_cross_entropy = None
        result["no_grad_liger_matches_chunked"] = rel(padded("liger")(model).sums, padded("chunked")(model).sums)
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
