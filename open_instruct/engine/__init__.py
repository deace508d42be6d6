"""The distributed engines behind one small interface (:class:`~open_instruct.engine.base.Engine`).

``select_engine(engine)`` picks the engine a run's settings (:class:`~open_instruct.settings.EngineSettings`) ask
for; ``engine_of(accelerator)`` finds the engine that built an accelerator, for code that only holds the accelerator
(checkpoints, final save). Adding an engine: one module here with an ``Engine`` subclass, and one entry in
``ENGINES``.
"""

from __future__ import annotations

import os
from typing import Any

from open_instruct.engine.base import Engine, unwrap_model
from open_instruct.engine.deepspeed import DeepSpeedEngine
from open_instruct.engine.fsdp2 import Fsdp2Engine
from open_instruct.engine.zero3_head import zero3_partitioned
from open_instruct.errors import UserError
from open_instruct.settings import EngineSettings

# Engines tried in order by select_engine (the first that claims the run wins); plain data parallel otherwise.
# FSDP2 first: it refuses a run that also asks for DeepSpeed, which DeepSpeed alone would quietly take.
ENGINES: tuple[type[Engine], ...] = (Fsdp2Engine, DeepSpeedEngine)

__all__ = [
    "ENGINES",
    "Engine",
    "accelerator_options",
    "engine_of",
    "gather_indexed",
    "gather_rows",
    "gathered",
    "head_made_whole",
    "hooks_forward",
    "is_partitioned",
    "local_shard",
    "select_engine",
    "unwrap_model",
]


def check_launcher_flags(gradient_accumulation_steps: int, max_grad_norm: float, env: dict[str, str]) -> None:
    """``accelerate launch --gradient_accumulation_steps / --gradient_clipping`` would silently replace our flags."""
    launcher_gas = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launcher_gas is not None and int(launcher_gas) != gradient_accumulation_steps:
        raise UserError(
            f"accelerate launch --gradient_accumulation_steps {launcher_gas} disagrees with the recipe's "
            f"--gradient_accumulation_steps {gradient_accumulation_steps}; set it in one place"
        )
    launcher_clip = env.get("ACCELERATE_GRADIENT_CLIPPING")
    if launcher_clip not in (None, "auto") and float(launcher_clip) != max(max_grad_norm, 0.0):
        raise UserError(
            f"accelerate launch --gradient_clipping {launcher_clip} disagrees with the recipe's "
            f"--max_grad_norm {max_grad_norm}; set it in one place"
        )


def select_engine(engine: EngineSettings, env: dict[str, str] | None = None) -> Engine:
    """The engine this run asks for (flags, config files, the ``accelerate launch`` environment)."""
    env = dict(os.environ) if env is None else env
    check_launcher_flags(engine.gradient_accumulation_steps, engine.max_grad_norm, env)
    for engine_type in ENGINES:
        selected = engine_type.from_settings(engine, env)
        if selected is not None:
            return selected
    return Engine.from_settings(engine, env)


def engine_of(accelerator: Any) -> type[Engine]:
    """The engine type that built ``accelerator``."""
    return next((e for e in ENGINES if e.drives(accelerator)), Engine)


def local_shard(param: Any) -> Any:
    """This rank's piece of ``param`` (the whole tensor when no engine partitions it)."""
    for engine_type in ENGINES:
        shard = engine_type.local_shard(param)
        if shard is not None:
            return shard
    return param


def hooks_forward(model: Any) -> bool:
    """Whether an engine hooks ``model``'s own forward (FSDP2's root module): call the model, never its decoder alone."""
    return any(engine_type.hooks_forward(model) for engine_type in ENGINES)


def head_made_whole(model: Any) -> str:
    """Which engine makes ``model``'s output layer whole inside the layer's own forward (for the run log)."""
    if zero3_partitioned(unwrap_model(model).get_output_embeddings()):
        return "ZeRO-3 gathers it there"
    if hooks_forward(model):
        return "FSDP2 unshards it there"
    return "its weight is whole on every rank"


def is_partitioned(param: Any) -> bool:
    """Whether an engine split ``param`` across ranks (so only a module call sees the whole weight)."""
    return any(engine_type.local_shard(param) is not None for engine_type in ENGINES)


def whole_numel(param: Any) -> int:
    """Elements of ``param`` as a whole, also where an engine keeps only a shard of it on this rank."""
    return int(getattr(param, "ds_numel", 0) or param.numel())  # ZeRO-3 keeps the whole size there; DTensor: numel


def gathered(params: list) -> Any:
    """A context in which partitioned ``params`` are whole and rank 0's in-place edits reach every shard."""
    for engine_type in ENGINES:
        if any(engine_type.local_shard(p) is not None for p in params):
            return engine_type.gathered(params)
    return Engine.gathered(params)


def gather_rows(accelerator: Any, table: Any, index: Any, values: Any) -> int:
    """Write every rank's ``values`` ``[B, K]`` into ``table`` ``[N, K]`` at their dataset ``index`` ``[B]``, on every
    rank; returns how many rows arrived (the padding accelerate adds to even out the last batch lands on a row that
    is already there, so it is counted once in the table)."""
    merged_index, merged = gather_indexed(accelerator, index, values)
    table[merged_index] = merged
    return merged_index.numel()


def gather_indexed(accelerator: Any, index: Any, values: Any) -> tuple[Any, Any]:
    """Every rank's dataset ``index`` ``[B]`` and ``values`` ``[B, K]`` (float32), concatenated in rank order on CPU,
    on every rank."""
    return accelerator.gather(index).cpu(), accelerator.gather(values.float().contiguous()).cpu()


def accelerator_options(engine: EngineSettings, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``Accelerator`` options of the selected engine: its DeepSpeed plugin (or None), ``cpu`` and the backend."""
    selected = select_engine(engine, env)
    kwargs = selected.accelerator_kwargs()
    return {
        "deepspeed_plugin": kwargs.get("deepspeed_plugin"),
        "cpu": kwargs.get("cpu", False),
        "backend": selected.backend,
    }
