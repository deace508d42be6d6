"""A run's plan from its flags: the cluster, the engine's layout, the resolved recipe, memory per phase, time."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from open_instruct.engine import select_engine
from open_instruct.engine.base import StateLayout
from open_instruct.errors import UserError
from open_instruct.objectives.logprobs import auto_chunk_size
from open_instruct.objectives.losses import whole_batch_loss
from open_instruct.plan import memory, timing
from open_instruct.plan.gpus import GPUS, Gpu, local_gpu
from open_instruct.plan.model_config import ModelShape
from open_instruct.settings import (
    BatchSettings,
    EngineSettings,
    ModelSettings,
    OptimSettings,
    PlanSettings,
    ReferenceSettings,
)
from open_instruct.training.schedule import optimizer_steps


@dataclass(frozen=True)
class Cluster:
    """The machines a plan is for."""

    processes: int
    nodes: int
    gpu: Gpu | None  # None: no GPU named and none here (memory is still predicted)


@dataclass
class Plan:
    stage: str
    model: str
    config_source: str
    shape: ModelShape
    cluster: Cluster
    layout: StateLayout
    engine_line: str
    workload: memory.Workload
    phases: list[memory.Phase]
    recipe: dict[str, Any]
    time: timing.TimePlan | None
    notes: list[str] = field(default_factory=list)  # how the plan reads the flags
    checks: list[str] = field(default_factory=list)  # what the dry run checked

    @property
    def peak(self) -> float:
        return max(phase.total for phase in self.phases)

    def fits(self) -> bool | None:
        return None if self.cluster.gpu is None else self.peak <= self.cluster.gpu.usable_bytes


def cluster_of(plan: PlanSettings, env: dict[str, str]) -> Cluster:
    """The cluster asked for: ``--dry_run_num_processes`` / ``--dry_run_num_nodes``, else the launcher's environment
    (WORLD_SIZE, accelerate's machine count), else one process; the GPU: ``--dry_run_gpu``, else this machine's."""
    nodes = plan.dry_run_num_nodes or int(env.get("NUM_NODES") or env.get("ACCELERATE_NUM_MACHINES") or 1)
    processes = plan.dry_run_num_processes or int(env.get("WORLD_SIZE", "0"))
    if not processes:
        per_node = int(env.get("LOCAL_WORLD_SIZE", "0")) or _local_gpu_count()
        processes = nodes * max(per_node, 1)
    if processes % nodes:
        raise UserError(f"--dry_run_num_processes {processes} is not a multiple of --dry_run_num_nodes {nodes}")
    gpu = GPUS[plan.dry_run_gpu] if plan.dry_run_gpu else local_gpu()
    return Cluster(processes, nodes, gpu)


def _local_gpu_count() -> int:

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def planned_engine(engine: EngineSettings, cluster: Cluster, env: dict[str, str]) -> Any:
    """The engine the run would select on that cluster (its flags and config files checked on the way)."""
    planned_env = {**env, "WORLD_SIZE": str(cluster.processes)}
    if cluster.processes > 1:
        planned_env.setdefault("LOCAL_RANK", "0")
    return select_engine(engine, planned_env)


def workload_of(
    stage: str,
    shape: ModelShape,
    packing: bool,
    model: ModelSettings,
    batch: BatchSettings,
    reference: ReferenceSettings,
    max_seq_length: int,
    pass_tokens: int | None = None,
) -> memory.Workload:
    """Tokens per forward at the worst case the flags allow (every sequence at --max_seq_length, no prompt shared).
    ``pass_tokens``: the budget of one forward pass within a micro-batch (training/forward_passes.py), if any."""
    rows_per_example = 2 if stage == "dpo" else 1
    tokens = rows_per_example * batch.per_device_train_batch_size * max_seq_length
    if batch.max_tokens_per_batch:
        tokens = batch.max_tokens_per_batch if packing else max(batch.max_tokens_per_batch, max_seq_length)
    passes = 1
    if pass_tokens is not None:  # groups of whole pairs of about equal size
        pair = rows_per_example * max_seq_length
        pairs = max(1, tokens // pair)
        passes = min(pairs, math.ceil(tokens / pass_tokens))
        tokens = math.ceil(pairs / passes) * pair
    reference_rows = rows_per_example * (reference.reference_batch_size or 2 * batch.per_device_train_batch_size)
    trainable = None
    if model.use_lora or model.use_qlora:
        trainable = memory.lora_parameters(shape, model.lora_rank, model.lora_target_modules)
    return memory.Workload(
        tokens=tokens,
        reference_tokens=reference_rows * max_seq_length,
        chunk=batch.logprob_chunk_size or auto_chunk_size(shape.vocab),
        gradient_checkpointing=model.checkpoints_every_layer,
        trainable=trainable,
        qlora=model.use_qlora,
        reference_pass=stage == "dpo" and reference.needs_reference,
        accumulation=batch.gradient_accumulation_steps * passes,
    )


def phases_of(shape: ModelShape, layout: StateLayout, work: memory.Workload) -> list[memory.Phase]:
    phases = [memory.reference_pass(shape, layout, work)] if work.reference_pass else []
    return phases + [memory.training_step(shape, layout, work)]


def recipe_of(optim: OptimSettings, cluster: Cluster, num_examples: int | None) -> dict[str, Any]:
    """Global batch, optimizer steps, warmup steps, epochs (steps unknown without a dataset size)."""
    global_batch = optim.per_device_train_batch_size * optim.gradient_accumulation_steps * cluster.processes
    out: dict[str, Any] = {
        "per_device": optim.per_device_train_batch_size,
        "accumulation": optim.gradient_accumulation_steps,
        "processes": cluster.processes,
        "global_batch": global_batch,
        "epochs": optim.num_epochs,
        "examples": num_examples,
        "steps": None,
        "warmup_steps": None,
    }
    if num_examples is not None or optim.max_train_steps:
        batches = math.ceil((num_examples or 0) / optim.per_device_train_batch_size)
        _, total = optimizer_steps(
            batches, cluster.processes, optim.gradient_accumulation_steps, optim.num_epochs, optim.max_train_steps
        )
        warmup = optim.warmup_steps if optim.warmup_steps is not None else math.ceil(optim.warmup_ratio * total)
        out.update(steps=total, warmup_steps=warmup)
    return out


def build_plan(
    stage: str,
    shape: ModelShape,
    config_source: str,
    num_examples: int | None,
    *,
    model: ModelSettings,
    batch: BatchSettings,
    reference: ReferenceSettings,
    engine: EngineSettings,
    optim: OptimSettings,
    plan: PlanSettings,
    max_seq_length: int,
) -> Plan:
    """The plan of this run on the cluster its flags ask for."""
    env = dict(os.environ)
    cluster = cluster_of(plan, env)
    selected = planned_engine(engine, cluster, env)
    layout = selected.state_layout(shape.hidden)
    packing = bool(batch.packing) if batch.packing is not None else not _cuda_planned(cluster)
    budget = pass_budget(shape, layout, batch, cluster) if stage == "dpo" else None
    work = workload_of(stage, shape, packing, model, batch, reference, max_seq_length, budget)
    recipe = recipe_of(optim, cluster, num_examples)
    notes = [
        f"batches {'packed (padding-free)' if packing else 'padded'}" + (" (default)" if batch.packing is None else "")
    ]
    if budget is not None:
        given = " (default)" if batch.max_tokens_per_forward is None else ""
        notes.append(f"forward passes of at most {budget} tokens{given}")
    time = None
    if cluster.gpu is not None:
        mfu = plan.dry_run_mfu or timing.MEASURED_MFU.get(cluster.gpu.name, timing.DEFAULT_MFU)
        source = (
            "--dry_run_mfu"
            if plan.dry_run_mfu
            else ("measured" if cluster.gpu.name in timing.MEASURED_MFU else "assumed, not yet measured on this GPU")
        )
        rows = 2 if stage == "dpo" else 1
        time = timing.time_plan(
            shape,
            rows * recipe["global_batch"],
            max_seq_length,
            work.gradient_checkpointing,
            cluster.processes,
            cluster.gpu.peak_bf16_flops,
            mfu,
            source,
            recipe["steps"],
            rows * (num_examples or 0) if work.reference_pass else 0,
        )
    return Plan(
        stage,
        model.model_name_or_path or "",
        config_source,
        shape,
        cluster,
        layout,
        selected.describe(),
        work,
        phases_of(shape, layout, work),
        recipe,
        time,
        notes,
    )


def pass_budget(shape: ModelShape, layout: StateLayout, batch: BatchSettings, cluster: Cluster) -> int | None:
    """Tokens per forward pass, as the run resolves ``--max_tokens_per_forward`` (training/forward_passes.py)."""
    if batch.max_tokens_per_forward is not None or whole_batch_loss(batch.loss_type, batch.load_balancing_loss):
        return batch.max_tokens_per_forward
    return None if _cuda_planned(cluster) else memory.default_pass_tokens(shape, layout.compute_bytes)


def _cuda_planned(cluster: Cluster) -> bool:
    """The batch layout's default depends on the device: padded on CUDA (see --packing)."""
    return cluster.gpu is not None


def variant(plan: Plan, layout: StateLayout | None = None, **work_changes: Any) -> float:
    """The peak of the plan with another layout or workload (for the suggestions)."""
    work = dataclasses.replace(plan.workload, **work_changes)
    return max(phase.total for phase in phases_of(plan.shape, layout or plan.layout, work))
