"""The printed plan, and the cheapest flag changes that make a run fit its GPU (each re-planned through the engine)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from open_instruct.errors import UserError
from open_instruct.plan import build
from open_instruct.plan.gpus import GIB, RESERVED_BYTES, USABLE_FRACTION

COLUMNS = (
    ("parameters", "params"),
    ("gradients", "grads"),
    ("optimizer states", "optim"),
    ("gathered weights", "gathered"),
    ("communication buffers", "buffers"),
    ("activations", "activ."),
    ("log-prob chunk", "logprob"),
    ("autocast weight copies", "autocast"),
    ("optimizer step temporaries", "step tmp"),
)


def gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def memory_table(plan: build.Plan) -> list[str]:
    """One row per phase, GiB per GPU by component."""
    used = [(key, title) for key, title in COLUMNS if any(phase.parts.get(key, 0) for phase in plan.phases)]
    header = f"  {'phase (GiB/GPU)':<16}" + "".join(f"{title:>10}" for _, title in used) + f"{'total':>10}"
    lines = [header]
    for phase in plan.phases:
        cells = "".join(f"{gib(phase.parts.get(key, 0)):>10}" for key, _ in used)
        lines.append(f"  {phase.name:<16}{cells}{gib(phase.total):>10}")
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _recipe_line(plan: build.Plan, unit: str) -> str:
    r = plan.recipe
    line = (
        f"recipe: global batch {r['global_batch']} {unit} ({r['per_device']} per device x {r['accumulation']} "
        f"accumulation x {r['processes']} processes), {r['epochs']} epoch(s)"
    )
    if r["steps"] is None:
        return line + "; optimizer steps unknown (dataset size unknown: pass --dry_run_num_pairs N)"
    over = f" over {r['examples']:,} {unit}" if r["examples"] else ""
    return line + f"{over}: {r['steps']:,} optimizer steps, {r['warmup_steps']:,} warmup"


def format_plan(plan: build.Plan, suggestions: list[tuple[str, float, bool]]) -> str:
    unit = "pairs" if plan.stage == "dpo" else "conversations"
    shape, cluster, work = plan.shape, plan.cluster, plan.workload
    gpu = cluster.gpu.name if cluster.gpu else "GPU (none named: --dry_run_gpu)"
    lines = [
        f"plan ({plan.stage}): {cluster.processes} x {gpu} on {cluster.nodes} node(s); {plan.engine_line}",
        f"model: {plan.model} ({plan.config_source}): {shape.parameters() / 1e9:.2f}B parameters, "
        f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}"
        + (f", LoRA {work.trainable / 1e6:.1f}M trainable" if work.trainable is not None else ""),
        _recipe_line(plan, unit),
        f"memory per GPU at the worst case the flags allow ({work.tokens:,} tokens per training forward, "
        f"{work.reference_tokens:,} per reference forward, log-prob chunk {work.chunk} tokens, gradient "
        f"checkpointing {'on' if work.gradient_checkpointing else 'off'}; {'; '.join(plan.notes)}):",
        *memory_table(plan),
    ]
    if cluster.gpu is not None:
        verdict = "fits" if plan.fits() else "DOES NOT FIT"
        lines.append(
            f"  needs {gib(plan.peak)} GiB of {gib(cluster.gpu.usable_bytes)} GiB usable on {cluster.gpu.name} "
            f"({gib(cluster.gpu.memory_bytes)} GiB less {gib(RESERVED_BYTES)} for CUDA/NCCL, "
            f"{USABLE_FRACTION:.0%} of the rest): {verdict}"
        )
    else:
        lines.append(f"  needs {gib(plan.peak)} GiB per GPU")
    if suggestions:
        lines.append(
            "  cheapest changes that make it fit (each alone, new peak per GPU):"
            if any(fits for _, _, fits in suggestions)
            else "  no single change makes it fit; closest:"
        )
        lines += [
            f"    {change:<58} {gib(peak):>7} GiB{'  fits' if fits else ''}" for change, peak, fits in suggestions
        ]
    if plan.time is not None:
        t = plan.time
        total = f", total {_duration(t.total_seconds)}" if t.total_seconds is not None else ""
        lines.append(
            f"time at MFU {t.mfu:.0%} ({t.mfu_source}): {t.step_seconds:.1f} s per optimizer step "
            f"({t.step_flops / 1e15:.1f} PFLOP), reference pass {_duration(t.reference_seconds)}{total} "
            "(every sequence at --max_seq_length: an upper bound)"
        )
    if plan.checks:
        lines.append("checked: " + "; ".join(plan.checks))
    return "\n".join(lines)


# Flag changes tried when a run does not fit, cheapest first (compute or communication they cost).
def _candidates(plan: build.Plan) -> list[tuple[str, dict[str, Any]]]:
    layout, out = plan.layout, []
    if not plan.workload.gradient_checkpointing:
        out.append(("--gradient_checkpointing (~1/3 more compute)", {"gradient_checkpointing": True}))
    if plan.workload.chunk > 16:
        chunk = max(16, plan.workload.chunk // 4)
        out.append((f"--logprob_chunk_size {chunk}", {"logprob_chunk_size": chunk}))
    fsdp = layout.engine.startswith(("FSDP", "HSDP"))
    if not fsdp and layout.param_shards == 1 and layout.processes > 1:
        out.append(("--zero_stage 3 (weights sharded)", {"zero_stage": 3}))
    if not fsdp and not layout.offload_optimizer:
        stage = 3 if layout.param_shards > 1 else 2
        out.append((f"--zero_stage {stage} --offload_optimizer", {"zero_stage": stage, "offload_optimizer": True}))
    if not layout.offload_params:
        change = (
            {"fsdp_offload_params": True}
            if fsdp
            else {"zero_stage": 3, "offload_optimizer": True, "offload_param": True}
        )
        out.append(("--fsdp_offload_params" if fsdp else "--zero_stage 3 --offload_optimizer --offload_param", change))
    per_device = plan.recipe["per_device"]
    if per_device > 1:
        half = per_device // 2
        accumulation = plan.recipe["accumulation"] * per_device // half
        out.append(
            (
                f"--per_device_train_batch_size {half} --gradient_accumulation_steps {accumulation}",
                {"per_device_train_batch_size": half, "gradient_accumulation_steps": accumulation},
            )
        )
    if plan.workload.trainable is None:  # not LoRA nor QLoRA already
        out.append(("--use_lora (trains adapters only)", {"use_lora": True}))
    nodes = plan.cluster.nodes
    out.append(
        (
            f"{2 * nodes} nodes (--dry_run_num_nodes {2 * nodes})",
            {"dry_run_num_nodes": 2 * nodes, "dry_run_num_processes": 2 * plan.cluster.processes},
        )
    )
    return out


def suggestions(plan: build.Plan, peak_of: Callable[[dict[str, Any]], float]) -> list[tuple[str, float, bool]]:
    """(change, new peak by ``peak_of(flag changes)``, fits) for each candidate when the plan does not fit; fitting
    ones first, cheapest first."""
    if plan.fits() is not False:
        return []
    usable = plan.cluster.gpu.usable_bytes
    found = []
    for words, changes in _candidates(plan):
        try:
            peak = peak_of(changes)
        except UserError:  # a change the run's other flags refuse (an engine mix, a batch that stops dividing)
            continue
        if peak < plan.peak:
            found.append((words, peak, peak <= usable))
    return [s for s in found if s[2]] or sorted(found, key=lambda s: s[1])[:3]
