"""The GPUs a plan can be made for: memory and dense bf16 peak, from the vendors' data sheets (SXM parts).

Memory is what ``nvidia-smi`` reports as the card's total (MiB); a run never gets all of it: the CUDA context, NCCL's
buffers and the allocator's fragmentation take some, hence :data:`RESERVED_BYTES` and :data:`USABLE_FRACTION`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 1 << 30
MIB = 1 << 20
# CUDA context + cuBLAS/NCCL work space on each GPU (about 1 GiB each in practice).
RESERVED_BYTES = 2 * GIB
# The caching allocator cannot use every byte it reserves (fragmentation); 90% is the planning margin.
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class Gpu:
    """One GPU model: its name on the command line, total memory, dense bf16 peak FLOP/s, CUDA name substrings."""

    name: str
    memory_bytes: int
    peak_bf16_flops: float
    cuda_names: tuple[str, ...]

    @property
    def usable_bytes(self) -> int:
        """What a training process can count on."""
        return int((self.memory_bytes - RESERVED_BYTES) * USABLE_FRACTION)


GPUS: dict[str, Gpu] = {
    gpu.name: gpu
    for gpu in (
        Gpu("H100-80GB", 81559 * MIB, 989e12, ("H100 80GB", "H100 SXM", "H100")),
        Gpu("H200", 143771 * MIB, 989e12, ("H200",)),
        Gpu("A100-80GB", 81920 * MIB, 312e12, ("A100-SXM4-80GB", "A100 80GB", "A100-80GB")),
        Gpu("A100-40GB", 40960 * MIB, 312e12, ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100")),
        Gpu("L40S", 46068 * MIB, 362e12, ("L40S",)),
        Gpu("L4", 23034 * MIB, 121e12, ("L4",)),
        Gpu("A10G", 23028 * MIB, 70e12, ("A10G",)),
    )
}


def gpu_named(name: str) -> Gpu:
    """The table's entry for a ``--dry_run_gpu`` value (exact name)."""
    return GPUS[name]


def gpu_of_cuda_name(cuda_name: str) -> Gpu | None:
    """The table's entry whose CUDA device name matches (most specific first), or None."""
    upper = cuda_name.upper()
    matches = [(len(key), gpu) for gpu in GPUS.values() for key in gpu.cuda_names if key.upper() in upper]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def local_gpu() -> Gpu | None:
    """This machine's first GPU when it is in the table (no CUDA context is created beyond the name query)."""

    if not torch.cuda.is_available():
        return None
    return gpu_of_cuda_name(torch.cuda.get_device_name(0))
