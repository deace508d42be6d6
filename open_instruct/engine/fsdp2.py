"""PyTorch FSDP2 (``fully_shard``) through accelerate's ``FullyShardedDataParallelPlugin(fsdp_version=2)``.

Asked for by ``--fsdp``, ``--fsdp_shard_degree`` / ``--fsdp_num_replicas`` / ``--fsdp_offload_params``, or the launcher
(``accelerate launch --use_fsdp`` or an accelerate config with ``distributed_type: FSDP``; both set
``ACCELERATE_USE_FSDP``). Every decoder layer is its own FSDP unit (accelerate's transformer-based wrap on the model's
``_no_split_modules``), with embeddings and the output layer in their own units and the root last. ``shards x
replicas`` is the device mesh: ``replicas > 1`` is HSDP (parameters sharded inside a group of ``shards`` ranks,
gradients all-reduced across the ``replicas`` groups). Training checkpoints are distributed checkpoints
(``torch.distributed.checkpoint``: one file per rank, no gather); the final save gathers the full state dict.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from open_instruct.engine.base import (
    DCP_MODEL,
    Engine,
    StateLayout,
    compute_bytes,
    effective_mixed_precision,
    precision_words,
)
from open_instruct.errors import UserError
from open_instruct.settings import EngineSettings

# Launcher wrap policies (FSDP_AUTO_WRAP_POLICY) we honour: per decoder layer. Anything else is refused, not ignored.
_PER_LAYER_POLICIES = ("", "TRANSFORMER_BASED_WRAP")
# FSDP1 sharding strategies (FSDP_SHARDING_STRATEGY) FSDP2 expresses, as its reshard_after_forward.
_FSDP1_STRATEGIES = {"FULL_SHARD": True, "1": True, "SHARD_GRAD_OP": False, "2": False}


def _true(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def _launcher_asks(env: dict[str, str]) -> bool:
    return _true(env.get("ACCELERATE_USE_FSDP"))


def wants_fsdp(engine: EngineSettings, env: dict[str, str]) -> bool:
    """Whether the flags or the launcher ask for FSDP."""
    return bool(_fsdp_sources(engine, env))


def _deepspeed_sources(engine: EngineSettings, env: dict[str, str]) -> list[str]:
    found = [f"--{name}" for name in ("zero_stage", "deepspeed_config") if getattr(engine, name) is not None]
    found += [f"--{name}" for name in ("offload_optimizer", "offload_param") if getattr(engine, name)]
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        found.append("accelerate launch --use_deepspeed")
    return found


def _fsdp_sources(engine: EngineSettings, env: dict[str, str]) -> list[str]:
    found = [f"--{n}" for n in ("fsdp", "fsdp_offload_params") if getattr(engine, n)]
    found += [f"--{n}" for n in ("fsdp_shard_degree", "fsdp_num_replicas") if getattr(engine, n) is not None]
    if _launcher_asks(env):
        found.append("accelerate launch --use_fsdp")
    return found


def mesh_shape(shard_degree: int | None, num_replicas: int | None, world_size: int) -> tuple[int, int]:
    """(shards, replicas) with ``shards x replicas == world_size``; a missing one is derived, both missing: pure FSDP."""
    for name, value in (("--fsdp_shard_degree", shard_degree), ("--fsdp_num_replicas", num_replicas)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if shard_degree is None and num_replicas is None:
        return world_size, 1
    if shard_degree is not None and num_replicas is not None:
        if shard_degree * num_replicas != world_size:
            raise UserError(
                f"--fsdp_shard_degree {shard_degree} x --fsdp_num_replicas {num_replicas} = "
                f"{shard_degree * num_replicas} processes, but the run has {world_size}"
            )
        return shard_degree, num_replicas
    given, name = (
        (shard_degree, "--fsdp_shard_degree") if shard_degree is not None else (num_replicas, "--fsdp_num_replicas")
    )
    if world_size % given:
        raise UserError(f"{name} {given} does not divide the {world_size} processes of the run")
    other = world_size // given
    return (given, other) if shard_degree is not None else (other, given)


def _reshard_after_forward(env: dict[str, str]) -> bool:
    """The launcher's choice: FSDP2's FSDP_RESHARD_AFTER_FORWARD, or an FSDP1 sharding strategy that maps onto it."""
    if env.get("FSDP_VERSION", "2") == "1":
        strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        if strategy not in _FSDP1_STRATEGIES:
            raise UserError(
                f"accelerate launch: FSDP sharding strategy {strategy} has no FSDP2 equivalent here; "
                "for hybrid sharding use --fsdp_shard_degree / --fsdp_num_replicas, for no sharding drop --use_fsdp"
            )
        return _FSDP1_STRATEGIES[strategy]
    value = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if value not in ("true", "false"):
        raise UserError(f"accelerate launch: FSDP2 needs fsdp_reshard_after_forward true or false, got {value!r}")
    return value == "true"


@dataclass(frozen=True)
class Fsdp2Layout:
    """What the run shards and how."""

    shards: int
    replicas: int
    mixed_precision: str  # no | bf16 | fp16
    offload_params: bool
    activation_checkpointing: bool  # accelerate's per-layer checkpoint wrapper (the launcher's setting)
    gradient_checkpointing: bool  # the model's own (--gradient_checkpointing)
    reshard_after_forward: bool
    launcher_version: str | None  # FSDP_VERSION the launcher asked for, when it did
    launched: bool = True  # started by a distributed launcher (torchrun, accelerate launch): a process group exists


class Fsdp2Engine(Engine):
    """FSDP2 per decoder layer over a ``shards x replicas`` mesh, mixed precision and CPU offload as asked for."""

    name = "fsdp2"

    def __init__(self, layout: Fsdp2Layout) -> None:
        processes = layout.shards * layout.replicas
        super().__init__(processes > 1, layout.mixed_precision, processes)
        self.layout = layout

    @classmethod
    def from_settings(cls, engine: EngineSettings, env: dict[str, str]) -> Fsdp2Engine | None:
        if not wants_fsdp(engine, env):
            return None
        deepspeed = _deepspeed_sources(engine, env)
        if deepspeed:
            raise UserError(
                f"{' and '.join(_fsdp_sources(engine, env))} asks for FSDP2 but {' and '.join(deepspeed)} asks for "
                "DeepSpeed; pick one engine"
            )
        policy = env.get("FSDP_AUTO_WRAP_POLICY", "").upper() if _launcher_asks(env) else ""
        if policy not in _PER_LAYER_POLICIES:
            raise UserError(
                f"accelerate launch: FSDP auto wrap policy {policy} is not supported; this recipe shards per decoder "
                "layer (TRANSFORMER_BASED_WRAP)"
            )
        world_size = int(env.get("WORLD_SIZE", "1"))
        shards, replicas = mesh_shape(engine.fsdp_shard_degree, engine.fsdp_num_replicas, world_size)
        launcher = _launcher_asks(env)
        layout = Fsdp2Layout(
            shards=shards,
            replicas=replicas,
            mixed_precision=effective_mixed_precision(engine.mixed_precision, env),
            offload_params=bool(engine.fsdp_offload_params or launcher and _true(env.get("FSDP_OFFLOAD_PARAMS"))),
            activation_checkpointing=launcher
            and _true(env.get("FSDP_ACTIVATION_CHECKPOINTING"))
            and not engine.gradient_checkpointing,
            gradient_checkpointing=engine.checkpoints_every_layer,
            reshard_after_forward=_reshard_after_forward(env) if launcher else True,
            launcher_version=env.get("FSDP_VERSION", "1") if launcher else None,
            launched="LOCAL_RANK" in env or world_size > 1,
        )
        return cls(layout)

    @property
    def sharded(self) -> bool:
        """FSDP2 needs a process group: one process started without a launcher trains unsharded."""
        return self.layout.launched

    @staticmethod
    def drives(accelerator: Any) -> bool:
        return bool(getattr(accelerator, "is_fsdp2", False))

    @staticmethod
    def load_state(accelerator: Any, path: str) -> str | None:
        """As the base engine's: a distributed checkpoint reshards itself on load, to any number of processes. One
        written unsharded (one process without a launcher) is refused: its files are not a distributed checkpoint."""
        if not (Path(path) / DCP_MODEL).is_dir():
            raise UserError(
                f"cannot resume {path} under FSDP2: it was written unsharded (one process without a launcher, no "
                f"{DCP_MODEL}/ folder); resume it the same way, or start a new --output_dir"
            )
        accelerator.load_state(path)
        return None

    def plugin(self) -> Any:
        """accelerate's FSDP plugin for this layout."""
        # accelerate is heavy and the planner builds no accelerator; torch's FSDP only matters to FSDP2 runs
        from accelerate.utils import FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy  # as above

        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        param_dtype = dtypes.get(self.layout.mixed_precision)
        # Low-precision compute, fp32 gradient reduction (what open-instruct's FSDP2 DPO uses); fp32 master weights.
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        return FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            reshard_after_forward=self.layout.reshard_after_forward,
            mixed_precision_policy=policy,
            cpu_offload=CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
            if self.layout.offload_params
            else OffloadPolicy(),
            activation_checkpointing=self.layout.activation_checkpointing,
            state_dict_type="SHARDED_STATE_DICT",  # training checkpoints: distributed checkpoint, one file per rank
        )

    def accelerator_kwargs(self) -> dict[str, Any]:
        if not self.sharded:
            return super().accelerator_kwargs()
        # On CPU accelerate only forms a process group in its MULTI_CPU mode (gloo); FSDP is switched on after.
        return {"fsdp_plugin": self.plugin(), "cpu": not torch.cuda.is_available()}

    def build_accelerator(self, *args: Any, **kwargs: Any) -> Any:
        accelerator = super().build_accelerator(*args, **kwargs)
        if not self.sharded:
            return accelerator
        # accelerate marks the process as FSDP in the environment (ACCELERATE_USE_FSDP); a later run in this process
        # (the Python API's next stage) then reads it as the launcher's, so name the version it is.
        os.environ.setdefault("FSDP_VERSION", "2")
        # accelerate is slow to import: --help, validation and the planner never need it
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType  # as above

        state = accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU:
            # accelerate applies an FSDP plugin only on accelerator devices; FSDP2 itself runs on CPU tensors (gloo).
            # Both shared states: each new AcceleratorState() copies the process state's fields over its own. The
            # process state outlives the run: restore_process_state() switches it back for the next run.
            _SWITCHED_FROM.append(DistributedType.MULTI_CPU)
            PartialState().distributed_type = DistributedType.FSDP
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = self.plugin()
        if self.layout.replicas > 1:
            _attach_hsdp_mesh(accelerator, self.layout.shards, self.layout.replicas)
        return accelerator

    def describe(self) -> str:
        layout = self.layout
        if not self.sharded:
            return (
                f"engine: single process (FSDP2 asked for, but without a launcher there is no process group), "
                f"{precision_words(layout.mixed_precision)}, no offload"
            )
        mesh = f"{layout.shards} shard{'s' * (layout.shards != 1)} x {layout.replicas} replica" + (
            "s" * (layout.replicas != 1)
        )
        parts = [f"engine: fsdp2, {mesh}" + (" (HSDP)" if layout.replicas > 1 and layout.shards > 1 else "")]
        parts.append("per decoder layer" + ("" if layout.reshard_after_forward else ", no reshard after forward"))
        if layout.mixed_precision in ("bf16", "fp16"):
            parts.append(f"mixed precision {layout.mixed_precision} params / fp32 reduce")
        else:
            parts.append("fp32 params / fp32 reduce")
        parts.append("params+gradients+optimizer offloaded to CPU" if layout.offload_params else "no offload")
        if layout.activation_checkpointing or layout.gradient_checkpointing:
            parts.append("activation checkpointing")
        parts.append("distributed checkpoints")
        if layout.launcher_version == "1":
            parts.append("(the launcher's FSDP version 1 runs as FSDP2, the one FSDP this recipe has)")
        return ", ".join(parts)

    def state_layout(self, hidden_size: int) -> StateLayout:
        """Weights, gradients and optimizer state sharded over ``shards`` ranks (replicated across replicas), kept in
        fp32 (the sharded weights are the master); each decoder layer gathered in the compute precision for its
        forward and backward, the next one prefetched; offload: all sharded state on CPU."""
        if not self.sharded:
            return super().state_layout(hidden_size)
        layout = self.layout
        return StateLayout(
            engine="FSDP2" if layout.replicas == 1 else f"HSDP ({layout.shards} shards x {layout.replicas} replicas)",
            processes=layout.shards * layout.replicas,
            param_shards=layout.shards,
            grad_shards=layout.shards,
            optimizer_shards=layout.shards,
            working_bytes=4,
            compute_bytes=compute_bytes(layout.mixed_precision),
            offload_optimizer=layout.offload_params,
            offload_params=layout.offload_params,
            gathered="layer",
            gathers=2 if layout.reshard_after_forward else -1,  # -1: no reshard, every layer stays whole
        )

    # --- parameters as FSDP2 lays them out: DTensors sharded on dim 0 ----------------------------------------------
    @staticmethod
    def local_shard(param: Any) -> Any:
        from torch.distributed.tensor import DTensor  # loaded with the first FSDP2 question, not at import

        return param.to_local() if isinstance(param, DTensor) else None

    @staticmethod
    def hooks_forward(model: Any) -> bool:
        from torch.distributed.fsdp import FSDPModule  # as DTensor above

        return isinstance(model, FSDPModule)  # fully_shard changes the model's class in place: no wrapper

    @staticmethod
    def gathered(params: list) -> AbstractContextManager:
        raise RuntimeError(
            "in-place edits of FSDP2-sharded parameters are not supported: edit the model before accelerator.prepare"
        )

    @staticmethod
    def full_state_dict(accelerator: Any, model: Any) -> dict[str, torch.Tensor]:
        """Whole tensors on CPU in the main process (empty elsewhere), gathered one parameter at a time."""
        from torch.distributed.tensor import DTensor  # loaded with the first FSDP2 question, not at import

        # Not accelerate's get_state_dict: torch's full-state-dict option hands back the DTensors unchanged on CPU.
        full = {}
        for name, value in model.state_dict().items():
            whole = value.full_tensor() if isinstance(value, DTensor) else value  # a collective: every rank
            if accelerator.is_main_process:
                full[name.replace("._checkpoint_wrapped_module", "")] = whole.detach().to("cpu", copy=True)
        return full


# The distributed type an FSDP2 run on CPU switched the process state from (at most one entry).
_SWITCHED_FROM: list[Any] = []


def restore_process_state() -> None:
    """Undo the CPU switch to FSDP of ``Fsdp2Engine.build_accelerator`` in accelerate's process state, which lives
    as long as the process: a later run in it (the Python API's next stage, a matrix cell) starts from the launcher's
    own type and switches again if it is FSDP2 too."""
    from accelerate.state import PartialState  # heavy, as in plugin()

    if _SWITCHED_FROM and PartialState._shared_state:
        PartialState._shared_state["distributed_type"] = _SWITCHED_FROM.pop()
    _SWITCHED_FROM.clear()


def _attach_hsdp_mesh(accelerator: Any, shards: int, replicas: int) -> None:
    """A ``(replicas, shards)`` device mesh that accelerate's FSDP2 preparation shards over (HSDP)."""
    from accelerate.parallelism_config import ParallelismConfig  # heavy, as in plugin()

    class _Hsdp(ParallelismConfig):
        # accelerate drops a shard dimension of size 1; pure replication (1 shard x N replicas) keeps it, so
        # fully_shard gets its 2-D (replicate, shard) mesh.
        @property
        def dp_shard_enabled(self) -> bool:
            return True

    config = _Hsdp(dp_replicate_size=replicas, dp_shard_size=shards)
    accelerator.state.parallelism_config = config
    accelerator.state.device_mesh = config.get_device_mesh(accelerator.device.type)
