"""The DeepSpeed side of the run: which ZeRO config applies, with every batch-size field checked against our flags.

Where the config comes from, first match wins:
1. ``--deepspeed_config FILE``, with ``--zero_stage`` / ``--offload_*`` (when given) applied on top;
2. ``--zero_stage`` (and ``--offload_optimizer``, ``--offload_param``): built here, same content as configs/ds_configs/;
3. ``accelerate launch --use_deepspeed`` (its config file, or its ``--zero_stage`` / offload settings from the env).

``"auto"`` fields are filled from our flags here rather than by accelerate, because accelerate's own defaults differ
from ours in two ways that change results silently: ``gradient_clipping`` becomes 1.0 (we default to no clipping) and
ZeRO-3's ``stage3_gather_16bit_weights_on_model_save`` becomes false (the final save would fail). An explicit value
that disagrees with a flag is an error: the effective batch size is never something the user did not ask for.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

from open_instruct.disk_space import injected_write_fault, write_failure
from open_instruct.engine.base import Engine, StateLayout, compute_bytes, effective_mixed_precision, precision_words
from open_instruct.engine.zero_universal import load_resharded
from open_instruct.errors import UserError
from open_instruct.settings import EngineSettings

AUTO = "auto"
# DeepSpeed's default is to print every 10 steps; we log ourselves.
_QUIET_STEPS = 2**31 - 1


def build_deepspeed_config(zero_stage: int, offload_optimizer: bool = False, offload_param: bool = False) -> dict:
    """An accelerate-style DeepSpeed config (``"auto"`` where accelerate or our flags fill the value)."""
    if zero_stage not in (0, 1, 2, 3):
        raise UserError(f"--zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_optimizer and zero_stage == 0:
        raise UserError("--offload_optimizer needs ZeRO stage 1, 2 or 3 (got --zero_stage 0)")
    if offload_param and zero_stage != 3:
        raise UserError(f"--offload_param needs ZeRO stage 3 (got --zero_stage {zero_stage})")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 1:
        zero.update({"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": AUTO})
    if zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": AUTO,
                "stage3_param_persistence_threshold": AUTO,
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000,
                "sub_group_size": 1_000_000_000,
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "bf16": {"enabled": AUTO},
        "fp16": {"enabled": AUTO},
        "zero_optimization": zero,
        "gradient_accumulation_steps": AUTO,
        "gradient_clipping": AUTO,
        "train_batch_size": AUTO,
        "train_micro_batch_size_per_gpu": AUTO,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }


def load_deepspeed_config(path: str | Path) -> dict:
    """A DeepSpeed JSON config file, checked to be a mapping with a ``zero_optimization`` section."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"DeepSpeed config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization"), dict):
        raise UserError(f"{path}: a DeepSpeed config needs a 'zero_optimization' section")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise UserError(
                f"{path}: remove the '{key}' section: the recipe builds AdamW and the "
                "--lr_scheduler_type schedule itself"
            )
    return config


def _apply_flags(config: dict, engine: EngineSettings) -> dict:
    """``--zero_stage`` / ``--offload_*`` on top of a config file (the flags win)."""
    config = copy.deepcopy(config)
    zero = config["zero_optimization"]
    if engine.zero_stage is not None:
        built = build_deepspeed_config(engine.zero_stage, engine.offload_optimizer, engine.offload_param)[
            "zero_optimization"
        ]
        zero.update({k: v for k, v in built.items() if k not in zero or k == "stage"})
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if engine.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return config


def _from_launcher_env(env: dict[str, str]) -> dict | None:
    """The config ``accelerate launch --use_deepspeed ...`` asked for, or None when it did not ask for DeepSpeed."""
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file != "none":
        return load_deepspeed_config(config_file)
    return build_deepspeed_config(
        int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")),
        offload_optimizer=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") != "none",
        offload_param=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") != "none",
    )


def _settle(config: dict, key: str, wanted: Any, flag: str, source: str) -> None:
    """Fill an auto/missing ``key`` with ``wanted``; an explicit value that differs is an error."""
    node, _, leaf = key.rpartition(".")
    section = config.get(node, {}) if node else config
    value = section.get(leaf, AUTO)
    if value == AUTO:
        section[leaf] = wanted
    elif value != wanted:
        raise UserError(
            f'{source}: {key} is {value!r} but {flag} asks for {wanted!r}; set it to "auto" or make them agree'
        )


def resolve_deepspeed_config(engine: EngineSettings, env: dict[str, str] | None = None) -> dict | None:
    """The DeepSpeed config of this run with batch, accumulation, clipping and ZeRO-3 save settled, or None."""
    env = dict(os.environ) if env is None else env
    if engine.deepspeed_config:
        source, config = engine.deepspeed_config, _apply_flags(load_deepspeed_config(engine.deepspeed_config), engine)
    elif engine.zero_stage is not None:
        source = "--zero_stage"
        config = build_deepspeed_config(engine.zero_stage, engine.offload_optimizer, engine.offload_param)
    else:
        if engine.offload_optimizer or engine.offload_param:
            raise UserError("--offload_optimizer / --offload_param need --zero_stage or --deepspeed_config")
        config = _from_launcher_env(env)
        if config is None:
            return None
        source = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "accelerate launch --use_deepspeed")
    config = copy.deepcopy(config)
    stage = config["zero_optimization"].get("stage", 0)
    hpz = engine.zero_hpz_partition_size
    if hpz is not None and stage == 3:
        # ZeRO++ hpZ: a secondary copy of the weights partitioned within groups of this many ranks (a node).
        config["zero_optimization"]["zero_hpz_partition_size"] = hpz
    elif hpz is not None and int(env.get("RANK", "0")) == 0:
        print(f"note: --zero_hpz_partition_size applies to ZeRO-3 only; {source} has stage {stage} (not used)")
    if config["zero_optimization"].get("offload_param", {}).get("device", "none") != "none" and stage != 3:
        raise UserError(f"{source}: offload_param needs ZeRO stage 3, the config has stage {stage}")
    _settle(
        config,
        "train_micro_batch_size_per_gpu",
        engine.per_device_train_batch_size,
        "--per_device_train_batch_size",
        source,
    )
    _settle(
        config,
        "gradient_accumulation_steps",
        engine.gradient_accumulation_steps,
        "--gradient_accumulation_steps",
        source,
    )
    world_size = int(env.get("WORLD_SIZE", "0"))
    if world_size:
        _settle(
            config,
            "train_batch_size",
            engine.per_device_train_batch_size * engine.gradient_accumulation_steps * world_size,
            f"per-device batch x accumulation x {world_size} processes",
            source,
        )
    # DeepSpeed clips inside its optimizer step (accelerator.clip_grad_norm_ is a no-op under it); 0 means off.
    _settle(
        config,
        "gradient_clipping",
        engine.max_grad_norm if engine.max_grad_norm > 0 else 0.0,
        "--max_grad_norm",
        source,
    )
    if stage == 3:
        zero = config["zero_optimization"]
        if zero.get("stage3_gather_16bit_weights_on_model_save", AUTO) in (AUTO, True):
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        else:
            raise UserError(
                f"{source}: ZeRO-3 needs zero_optimization.stage3_gather_16bit_weights_on_model_save "
                "true, else the final save holds only this rank's shard"
            )
    config.setdefault("steps_per_print", _QUIET_STEPS)
    return config


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stages 0-3, optional CPU offload) through accelerate's ``DeepSpeedPlugin``."""

    name = "deepspeed"

    def __init__(self, config: dict, mixed_precision: str = "no", processes: int = 0) -> None:
        super().__init__(True, mixed_precision, processes)
        self.config = config

    @classmethod
    def from_settings(cls, engine: EngineSettings, env: dict[str, str]) -> DeepSpeedEngine | None:
        """The engine when a ZeRO config applies (flags, a config file or ``accelerate launch``), else None."""
        config = resolve_deepspeed_config(engine, env)
        if config is None:
            return None
        return cls(config, effective_mixed_precision(engine.mixed_precision, env), int(env.get("WORLD_SIZE", "0")))

    @staticmethod
    def drives(accelerator: Any) -> bool:
        return getattr(accelerator.state, "deepspeed_plugin", None) is not None

    def build_accelerator(self, *args: Any, **kwargs: Any) -> Any:
        """As the base engine's; run without a launcher, first a one-process group (DeepSpeed needs one)."""
        if single_process_group_env(os.environ):
            self.processes = 1
        if not torch.cuda.is_available():
            skip_shm_comm_build()
        return super().build_accelerator(*args, **kwargs)

    def accelerator_kwargs(self) -> dict[str, Any]:
        from accelerate.utils import DeepSpeedPlugin  # heavy: the planner selects engines without building one

        # ZeRO-3: load the model already partitioned (transformers sees the config through accelerate's weakref).
        zero3 = self.config["zero_optimization"].get("stage") == 3
        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=self.config, zero3_init_flag=zero3), "cpu": False}

    @property
    def backend(self) -> str | None:
        # DeepSpeed on CPU: accelerate only counts the processes when it is told the backend.
        return None if torch.cuda.is_available() else "gloo"

    def describe(self) -> str:
        zero = self.config["zero_optimization"]
        offload = [
            k.removeprefix("offload_")
            for k in ("offload_optimizer", "offload_param")
            if zero.get(k, {}).get("device", "none") != "none"
        ]
        processes = (
            f"{self.processes} process{'es' if self.processes > 1 else ''}"
            if self.processes
            else "launcher's processes"
        )
        return (
            f"engine: deepspeed zero-{zero.get('stage', 0)}, {processes}, {precision_words(self.mixed_precision)}, "
            + (f"{'+'.join(offload)} offloaded to CPU" if offload else "no offload")
        )

    def state_layout(self, hidden_size: int) -> StateLayout:
        """ZeRO stage s splits the optimizer state (s >= 1), the gradients (s >= 2) and the weights (s = 3) over the
        processes; DeepSpeed holds the weights in the run's precision and steps an fp32 master copy of them."""
        zero = self.config["zero_optimization"]
        stage = int(zero.get("stage", 0))
        processes = max(self.processes, 1)
        # accelerate fills an "auto" bucket from the hidden size (hidden^2 elements); ZeRO-1/2 keep two with overlap.
        bucket = zero.get("reduce_bucket_size", "auto")
        bucket = hidden_size * hidden_size if bucket == "auto" else int(bucket)
        buckets = 2 if zero.get("overlap_comm", False) and stage in (1, 2) else 1
        working = compute_bytes(self.mixed_precision)
        return StateLayout(
            engine=f"ZeRO-{stage}",
            processes=processes,
            param_shards=processes if stage == 3 else 1,
            grad_shards=processes if stage >= 2 else 1,
            optimizer_shards=processes if stage >= 1 else 1,
            working_bytes=working,
            compute_bytes=working,
            master_copy=True,
            offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") != "none",
            offload_params=zero.get("offload_param", {}).get("device", "none") != "none",
            gathered="module" if stage == 3 else "",
            gathers=1 if stage == 3 else 0,
            bucket_elements=bucket * buckets if stage >= 1 else 0,
            # With stage3_max_reuse_distance this large, a gathered weight stays until the live limit forces it out.
            live_elements=int(zero.get("stage3_max_live_parameters", 1_000_000_000)) if stage == 3 else 0,
            kept_gradients=stage >= 2,  # ZeRO-2's grads_in_partition, ZeRO-3's flat gradient partition
        )

    @staticmethod
    def save_state(accelerator: Any, path: str) -> None:
        """accelerate's save, with a file write that fails on this rank held back until DeepSpeed's save returns.

        DeepSpeed's ``save_checkpoint`` writes each rank's optimizer shard between two barriers; a rank whose write
        raised there would skip the last barrier and enter the caller's next collective while the others still wait
        in it (mismatched collectives: a hang until the timeout). Here the failing rank skips that file, passes every
        barrier, and raises the write error once the save is over, where every rank agrees on it."""
        failures: list[OSError] = []
        writers = [m.checkpoint_engine for m in accelerator._models if hasattr(m, "checkpoint_engine")]

        def held_back(save: Any) -> Any:
            def write(state_dict: Any, path: str) -> None:
                try:
                    injected_write_fault(path)
                    save(state_dict, path)
                except Exception as err:  # a full disk also arrives as torch's RuntimeError
                    if write_failure(err) is None:
                        raise
                    failures.append(write_failure(err))

            return write

        for writer in writers:
            writer.save = held_back(writer.save)
        try:
            accelerator.save_state(path)
        finally:
            for writer in writers:
                del writer.save  # the class's method again
        if failures:
            raise failures[0]

    @staticmethod
    def local_shard(param: Any) -> Any:
        return getattr(param, "ds_tensor", None)  # ZeRO-3: this rank's shard

    @staticmethod
    def load_state(accelerator: Any, path: str) -> str | None:
        """As the base engine's; a checkpoint of another number of ranks goes through a universal checkpoint."""
        return load_resharded(accelerator, path)

    @staticmethod
    def gathered(params: list) -> Any:
        if not any(getattr(p, "ds_id", None) is not None for p in params):
            return Engine.gathered(params)
        import deepspeed  # optional: installed for ZeRO runs only

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def single_process_group_env(env: Any) -> bool:
    """Without a launcher (no WORLD_SIZE), set the variables torchrun would for one process on this machine, so
    ``python -m open_instruct.dpo_tune_cache --zero_stage 2`` runs ZeRO on one process instead of failing for want
    of a process group. Returns whether it did."""
    if "WORLD_SIZE" in env or "RANK" in env:
        return False
    with socket.socket() as s:  # a free port on loopback for the one-member group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    )
    return True


def skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed's process group compiles a shared-memory all-reduce (deepspeed_shm_comm: a minute of C++ on
    a machine's first ZeRO run, behind a lock every other launch waits on) that only its inference kernels call;
    training reduces through torch.distributed, so the group is built without it."""
    # Not `import deepspeed.comm.torch as ...`: deepspeed.comm's namespace holds the torch package under that name.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def zero_stage_of(accelerator: Any) -> int | None:
    """The ZeRO stage the accelerator runs with, or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.deepspeed_config["zero_optimization"].get("stage", 0))


def main(argv: list[str] | None = None) -> None:
    """``python -m open_instruct.engine.deepspeed OUT_DIR``: write the shipped DeepSpeed configs (configs/ds_configs)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir")
    out = Path(parser.parse_args(argv).out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, config in SHIPPED_CONFIGS.items():
        (out / name).write_text(json.dumps(build_deepspeed_config(**config), indent=2) + "\n")
        print(out / name)


# File name in configs/ds_configs -> build_deepspeed_config arguments (a test keeps files and code identical).
SHIPPED_CONFIGS: dict[str, dict[str, Any]] = {
    "stage2_no_offloading_accelerate.conf": {"zero_stage": 2},
    "stage3_no_offloading_accelerate.conf": {"zero_stage": 3},
    "stage3_offloading_accelerate.conf": {"zero_stage": 3, "offload_optimizer": True, "offload_param": True},
}

if __name__ == "__main__":
    main()
