"""The engine interface: what the rest of the code may ask of a distributed engine, and the plain default.

An engine decides how ``accelerate.Accelerator`` is built (its plugin and process-group backend), and answers the few
questions that depend on how parameters are laid out across ranks: this rank's piece of a parameter, whether a
parameter is partitioned, how to edit partitioned parameters in place, how to get the full state dict, and how a
training checkpoint is written and read. Everything else (model, data, loss, loop) is engine-agnostic.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from open_instruct.errors import UserError
from open_instruct.settings import EngineSettings

# accelerate's folder of an FSDP2 training checkpoint's model shards (a distributed checkpoint: engine/fsdp2.py)
DCP_MODEL = "pytorch_model_fsdp_0"


def effective_mixed_precision(mixed_precision: str | None, env: dict[str, str]) -> str:
    """``--mixed_precision``, else what ``accelerate launch --mixed_precision`` set, else ``no``."""
    return mixed_precision or env.get("ACCELERATE_MIXED_PRECISION") or "no"


def precision_words(mixed_precision: str) -> str:
    """How the engine line names a precision setting."""
    return f"mixed precision {mixed_precision}" if mixed_precision in ("bf16", "fp16") else "fp32"


def unwrap_model(model: Any) -> Any:
    """The Hugging Face model inside DDP / DeepSpeed / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


@dataclass(frozen=True)
class StateLayout:
    """How an engine lays out a model's training state on each rank: what the memory planner (``plan/memory.py``)
    reads, so that nothing outside ``engine/`` re-derives ZeRO or FSDP facts from flags.

    A shard count of 1 means every rank holds the whole thing. ``working_bytes``: bytes per stored weight (2 when the
    engine keeps 16-bit weights, 4 for fp32); ``compute_bytes``: per weight as the matmuls read it (2 under bf16/fp16,
    also when autocast casts fp32 weights). ``master_copy``: the optimizer steps a separate fp32 copy of the weights.
    ``gathered``: what is gathered whole at once under parameter sharding ("module": the largest module, DeepSpeed's
    accounting; "layer": decoder layers, ``gathers`` of them at a time, -1: all). ``bucket_elements``: gradient
    buckets per rank; ``gradient_copy``: a second full copy of the gradients for the all-reduce (DDP); ``kept_gradients``: the
    reduced gradient partition (working precision) is a buffer kept across steps, not freed by ``zero_grad``."""

    engine: str  # how the plan names it: "ZeRO-3", "FSDP2", "DDP", "single process"
    processes: int
    param_shards: int = 1
    grad_shards: int = 1
    optimizer_shards: int = 1
    working_bytes: int = 4
    compute_bytes: int = 4
    master_copy: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    gathered: str = ""
    gathers: int = 0
    bucket_elements: int = 0
    gradient_copy: bool = False
    kept_gradients: bool = False
    live_elements: int = 0  # weights kept gathered at most between uses (ZeRO-3's stage3_max_live_parameters)


def compute_bytes(mixed_precision: str) -> int:
    """Bytes per weight or activation element the forward computes in."""
    return 2 if mixed_precision in ("bf16", "fp16") else 4


class Engine:
    """Plain data parallel (accelerate's default: one process, DDP on GPUs, gloo ``MULTI_CPU`` on CPUs).

    Subclasses override what differs. The static methods work on what the engine produced (parameters, a prepared
    model, the accelerator), so callers reach them through :func:`open_instruct.engine.engine_of`.
    """

    name = "data_parallel"

    def __init__(self, several_processes: bool = False, mixed_precision: str = "no", processes: int = 0) -> None:
        self.several_processes = several_processes
        self.mixed_precision = mixed_precision
        self.processes = processes  # for the run log (0: not known)

    @classmethod
    def from_settings(cls, engine: EngineSettings, env: dict[str, str]) -> Engine | None:
        """This engine for the run's settings and launcher environment, or None when the run does not ask for it."""
        world_size = int(env.get("WORLD_SIZE", "1"))
        return cls(world_size > 1, effective_mixed_precision(engine.mixed_precision, env), world_size)

    @staticmethod
    def drives(accelerator: Any) -> bool:
        """Whether ``accelerator`` was built by this engine."""
        return True

    def accelerator_kwargs(self) -> dict[str, Any]:
        """Engine-specific ``Accelerator`` keyword arguments (plugins, ``cpu``)."""
        # Plain data parallel on CPU: accelerate's MULTI_CPU mode (gloo); without it each process would train alone.
        return {"cpu": not torch.cuda.is_available() and self.several_processes}

    @property
    def backend(self) -> str | None:
        """The process-group backend to force (None: accelerate's choice)."""
        return None

    def describe(self) -> str:
        """One line for the run log."""
        layout = (
            f"data parallel (DDP), {self.processes or 'several'} processes"
            if self.several_processes
            else "single process"
        )
        return f"engine: {layout}, {precision_words(self.mixed_precision)}, no offload"

    def state_layout(self, hidden_size: int) -> StateLayout:
        """How the run's weights, gradients and optimizer state sit on each rank (``hidden_size`` sizes the buckets
        an engine derives from it). fp32 weights; under bf16/fp16 autocast computes on 16-bit copies."""
        compute = compute_bytes(self.mixed_precision)
        if not self.several_processes:
            return StateLayout("single process", 1, compute_bytes=compute)
        # DDP keeps its own flat copy of the gradients for the all-reduce (gradient_as_bucket_view is off).
        return StateLayout("DDP", max(self.processes, 1), compute_bytes=compute, gradient_copy=True)

    def build_accelerator(
        self,
        gradient_accumulation_steps: int,
        mixed_precision: str | None,
        trackers: Sequence[str],
        timeout_s: int,
        project_dir: str | None = None,
        sync_each_batch: bool = False,
    ) -> Any:
        """accelerate's ``Accelerator`` for this engine; ``trackers`` are accelerate's tracker names (tensorboard
        writes under ``<project_dir>/tensorboard``); ``sync_each_batch`` all-reduces gradients every micro-batch."""
        from accelerate import Accelerator  # heavy: the planner selects engines without building one
        from accelerate.utils import (  # as above
            DataLoaderConfiguration,
            GradientAccumulationPlugin,
            InitProcessGroupKwargs,
            ProjectConfiguration,
        )

        group = {"backend": self.backend} if self.backend else {}
        project = None
        if project_dir is not None:
            project = ProjectConfiguration(project_dir=project_dir, logging_dir=str(Path(project_dir) / "tensorboard"))
        return Accelerator(
            **self.accelerator_kwargs(),
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=gradient_accumulation_steps, sync_each_batch=sync_each_batch
            ),
            mixed_precision=mixed_precision,
            log_with=list(trackers) or None,
            project_config=project,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s), **group)],
        )

    # --- questions about parameters and models the engine has laid out ------------------------------------------
    @staticmethod
    def local_shard(param: torch.Tensor) -> torch.Tensor | None:
        """This rank's piece of ``param`` when the engine partitions it, else None."""
        return None

    @staticmethod
    def hooks_forward(model: Any) -> bool:
        """Whether the engine's hooks sit on the model object itself (no wrapper), so its submodules must not be
        called on their own: the model's forward is the only entry."""
        return False

    @staticmethod
    def gathered(params: list[torch.Tensor]) -> AbstractContextManager:
        """A context in which partitioned ``params`` are whole and in-place edits on rank 0 reach every shard."""
        return nullcontext()

    @staticmethod
    def full_state_dict(accelerator: Any, model: Any) -> dict[str, torch.Tensor]:
        """The full (gathered) state dict of a prepared model; every rank must call it."""
        return accelerator.get_state_dict(model)

    @staticmethod
    def save_state(accelerator: Any, path: str) -> None:
        """Write model, optimizer, scheduler and sampler state into the folder ``path`` (every rank)."""
        accelerator.save_state(path)

    @staticmethod
    def load_state(accelerator: Any, path: str) -> str | None:
        """Restore what :meth:`save_state` wrote (by any number of processes); returns what was converted to do so
        (None: the files load as they are)."""
        if (Path(path) / DCP_MODEL).is_dir():
            raise UserError(
                f"cannot resume {path} without FSDP2: it is a distributed checkpoint; resume it with --fsdp under "
                "torchrun or accelerate launch (any number of processes, 1 included)"
            )
        accelerator.load_state(path)
        return None
