"""The fused Liger head (objectives/fused_head.py) under Triton's interpreter, on a head whose weight is whole only
inside its own forward, as ZeRO-3 leaves it; prints one JSON object of measured errors and counts.

Run by tests/objectives/test_fused_head.py in a subprocess (``TRITON_INTERPRET=1`` must be set before Liger's kernels
are first imported). Errors are fp32 and relative (||a - b|| / ||b||), the largest over all tensors.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1 (Triton's interpreter must be chosen before Liger's kernels are imported)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from open_instruct.data.tokenize import IGNORE_INDEX  # noqa: E402
from open_instruct.objectives.logprobs import chunked_logprobs, sequence_logprobs  # noqa: E402
from tests.model_helpers import padded_rows, rel, tiny_llama  # noqa: E402


def partition_like_zero3(head: torch.nn.Linear) -> dict[str, int]:
    """Keep ``head``'s weight whole only during the module's forward and backward (a ``[0]`` tensor between them), as
    ZeRO-3's hooks do; returns the count of forward gathers, which the caller reads."""
    whole, seen = head.weight.data, {"gathers": 0}

    def gather(_module, _args):
        seen["gathers"] += 1
        head.weight.data = whole

    def release(_module, _args, _out):
        head.weight.data = torch.empty(0)

    head.register_forward_pre_hook(gather)
    head.register_forward_hook(release)
    head.register_full_backward_pre_hook(lambda _module, _grad: setattr(head.weight, "data", whole))
    release(None, None, None)
    seen["whole"] = whole
    return seen


def values_and_grads(model, fn, unpartition=lambda: None):
    """Per-token log-probs ``[T]``, per-sequence sums ``[N]`` and every parameter's gradient of a weighted sum."""
    model.zero_grad(set_to_none=True)
    lp = fn(model)
    weights = torch.linspace(0.5, 1.5, lp.token_logps.shape[0])  # distinct per-token upstream gradients
    (lp.token_logps * weights).sum().backward()
    unpartition()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.token_logps.detach(), lp.sums.detach(), grads


def compare(reference, got) -> dict[str, float]:
    assert set(got[2]) == set(reference[2]), sorted(set(got[2]) ^ set(reference[2]))
    return {
        "logprobs": rel(got[0], reference[0]),
        "sums": rel(got[1], reference[1]),
        "grads": max(rel(got[2][n], reference[2][n]) for n in reference[2]),
    }


def main() -> None:
    b = padded_rows()
    b["labels"][3] = IGNORE_INDEX  # a row without labels
    model = tiny_llama().eval()
    reference = values_and_grads(model, lambda m: chunked_logprobs(m, **b, chunk_size=3))
    head = model.get_output_embeddings()
    seen = partition_like_zero3(head)

    def whole_again():
        head.weight.data = seen["whole"]

    def liger(m):
        return sequence_logprobs(m, b["input_ids"], b["attention_mask"], b["labels"], impl="liger")

    result = {"partitioned": compare(reference, values_and_grads(model, liger, whole_again))}
    result["gathers_per_pass"] = seen["gathers"]
    result["forward_restored"] = "forward" not in head.__dict__
    whole_again()
    no_labels = {**b, "labels": torch.full_like(b["labels"], IGNORE_INDEX)}
    model.zero_grad(set_to_none=True)
    empty = sequence_logprobs(
        model, **{k: no_labels[k] for k in ("input_ids", "attention_mask", "labels")}, impl="liger"
    )
    empty.sums.sum().backward()  # no label token: the backward still runs through the decoder
    result["no_labels"] = {"sums": empty.sums.tolist(), "grads": sum(p.grad is not None for p in model.parameters())}
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
