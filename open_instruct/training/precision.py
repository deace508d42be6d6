"""Compute precision of every model pass: the decoder runs in the run's precision, log-probs are taken in fp32.

Where each precision comes from:
- ``--mixed_precision bf16`` without DeepSpeed (one process, DDP): the weights stay fp32 and every log-prob pass
  (training, reference, evaluation) runs under ``torch.autocast(bf16)``. accelerate wraps only the model's own
  ``forward`` in autocast; our chunked and Liger paths call the decoder and the output layer directly, so the autocast
  must be opened around the whole log-prob computation, here.
- DeepSpeed ZeRO-2/3 with bf16: DeepSpeed keeps bf16 weights (fp32 master copy in the optimizer), so activations are
  bf16 without autocast; accelerate's ``autocast()`` is a no-op there.
- FSDP2 with bf16: fp32 sharded weights gathered as bf16 for compute (its ``MixedPrecisionPolicy``), gradients
  reduced in fp32; the autocast above runs too (a no-op on the already-bf16 weights).
- ``--mixed_precision fp16`` without DeepSpeed (one process, DDP, FSDP2): as bf16 but ``torch.autocast(float16)``,
  opened by ``engine.loss_scaling.autocast`` (accelerate's own fp16 is off: it does nothing on CPU), with the loss
  scaled by the loop's ``LossScaler``. DeepSpeed with fp16: float16 weights and its own dynamic loss scaler.
- A model loaded in bf16 (``--model_dtype``/``torch_dtype``): bf16 weights, bf16 activations.
In every case the chunk's logits are upcast to fp32 before log-softmax (``objectives.logprobs._token_logps``), so the
log-probs, the reference cache and the losses are fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from open_instruct.engine import unwrap_model
from open_instruct.engine.loss_scaling import autocast

LogprobFn = Callable[[Any, dict[str, torch.Tensor]], Any]


def in_run_precision(accelerator: Any, logprob_fn: LogprobFn, report: Callable[[str], Any] | None = None) -> LogprobFn:
    """``logprob_fn`` run under the accelerator's autocast (the run's mixed precision; a no-op without one).

    With ``report``, the first call also records the dtypes the decoder's matmuls produced and reports them with the
    log-probs' dtype in one line (what the run computes in, as measured, not as configured).
    """
    pending = [report] if report is not None else []

    def run(model: Any, batch: dict[str, torch.Tensor]) -> Any:
        with autocast(accelerator):
            if not pending:
                return logprob_fn(model, batch)
            with record_activation_dtypes(model) as seen:
                out = logprob_fn(model, batch)
            pending.pop()(precision_line(seen, out.sums.dtype))
            return out

    return run


def precision_line(activation_dtypes: set[torch.dtype], logprob_dtype: torch.dtype) -> str:
    """``precision: decoder matmuls bfloat16, log-probs float32``."""
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in activation_dtypes)) or "none seen"
    return f"precision: decoder matmuls {names}, log-probs {str(logprob_dtype).removeprefix('torch.')}"


@contextlib.contextmanager
def record_activation_dtypes(model: Any) -> Iterator[set[torch.dtype]]:
    """Collect the output dtypes of every ``nn.Linear`` inside the decoder while the block runs (for checks and tests)."""

    inner = unwrap_model(model)
    decoder = getattr(inner, inner.base_model_prefix)
    seen: set[torch.dtype] = set()
    handles = [
        module.register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))
        for module in decoder.modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
