"""Model FLOPs utilisation (MFU): the FLOPs a step's tokens need, over what the device could do in that time.

Convention (PaLM, appendix B): a token costs ``6 N`` FLOPs for forward plus backward through the ``N`` matmul
parameters (every parameter except the input embedding, whose lookup is free; the output head counts even when tied),
plus ``12 * layers * hidden * L`` for attention over its sequence of length ``L`` (scores and weighted sum, forward and
backward, counted without the causal halving). Recomputation (gradient checkpointing) is not counted: it is overhead,
not model FLOPs. Peaks are dense bf16 tensor-core figures from the vendors' data sheets (SXM parts).
"""

from __future__ import annotations

from typing import Any

import torch

from open_instruct.engine import unwrap_model
from open_instruct.plan.gpus import GPUS, gpu_of_cuda_name

PEAK_BF16_FLOPS: dict[str, float] = {gpu.name: gpu.peak_bf16_flops for gpu in GPUS.values()}  # plan/gpus.py


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device from the table, or None (CPU, unknown GPU: MFU is then not logged)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    gpu = gpu_of_cuda_name(torch.cuda.get_device_name(device))
    return gpu.peak_bf16_flops if gpu is not None else None


def matmul_parameters(model: Any) -> int:
    """Parameters that take part in matmuls: all but the input embedding (plus the head's when it is tied)."""
    params = {id(p): full_numel(p) for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total = sum(params.values()) - full_numel(embedding)
    if head is not None and head.weight is embedding:
        total += full_numel(embedding)
    return total


def full_numel(param: torch.Tensor) -> int:
    """A parameter's whole size, also when DeepSpeed ZeRO-3 has partitioned it: a partitioned parameter is an empty
    placeholder whose true size is ``ds_numel`` (the GPU suite's ZeRO-3 row logged an MFU of 0.2% before this)."""
    return int(getattr(param, "ds_numel", param.numel()))


def training_flops(
    matmul_params: int, num_layers: int, hidden_size: int, sequence_lengths: torch.Tensor, causal: bool = False
) -> float:
    """Forward + backward FLOPs of training on sequences of these lengths ``[S]`` (padding excluded).

    ``causal``: count attention's work as a causal kernel does it (the masked half skipped), for predicting time;
    MFU keeps the convention above.
    """
    lengths = sequence_lengths.double()
    attention = (6 if causal else 12) * num_layers * hidden_size * (lengths * lengths).sum()
    return float(6 * matmul_params * lengths.sum() + attention)


def batch_sequence_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real lengths ``[S]`` of the sequences of a padded (``attention_mask``) or packed (``cu_seq_lens``) batch (a
    prompt-sharing row: one segment per pair, counted as causal attention over the whole segment)."""
    if "cu_seq_lens" in batch:
        return batch["cu_seq_lens"].diff()
    return batch["attention_mask"].sum(-1)


def mfu(flops: float, seconds: float, peak: float, world_size: int = 1) -> float:
    """Fraction of the ``world_size`` devices' peak that ``flops`` in ``seconds`` represent."""
    return flops / max(seconds, 1e-9) / (peak * world_size)


class FlopCounter:
    """Counts a model's training FLOPs per batch; built once from the model's shape."""

    def __init__(self, model: Any) -> None:

        inner = unwrap_model(model)
        self.matmul_params = matmul_parameters(inner)
        self.num_layers = inner.config.num_hidden_layers
        self.hidden_size = inner.config.hidden_size

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        return training_flops(self.matmul_params, self.num_layers, self.hidden_size, batch_sequence_lengths(batch))
