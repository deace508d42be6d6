"""The combination matrix's options: every axis and its values live here, and how each value becomes flags.

A new engine (e.g. FSDP2) is one entry in ``ENGINES``; a new value of another axis is one entry in its table.
"""

from __future__ import annotations

# engine -> (processes, flags). The 1-process fp32 run every cell is compared with uses "single".
ENGINES: dict[str, tuple[int, list[str]]] = {
    "single": (1, []),
    "ddp": (2, []),
    "zero2": (2, ["--zero_stage", "2"]),
    "zero3": (2, ["--zero_stage", "3"]),
    "zero3_offload": (2, ["--zero_stage", "3", "--offload_optimizer", "true", "--offload_param", "true"]),
    "fsdp2": (2, ["--fsdp", "true"]),  # PyTorch FSDP2 (fully_shard), 2 shards x 1 replica
    "fsdp2_offload": (2, ["--fsdp", "true", "--fsdp_offload_params", "true"]),
}
# Left out of the pairwise set that `make test` runs, the 3-wise set has them: ZeRO-3 offload compiles DeepSpeed's CPU
# Adam; FSDP2 offload on a CPU machine moves nothing, the same run as fsdp2 (its own code path: CPUOffloadPolicy).
SLOW_ENGINES = ("zero3_offload", "fsdp2_offload")

WEIGHTS = {
    "full": [],
    "lora": ["--use_lora", "true", "--lora_rank", "4", "--lora_dropout", "0.0", "--merge_lora", "true"],
}
# Pairs per micro-batch come from PER_DEVICE, or from the token budget (padded: rows x longest sequence).
BATCHING = {"padded": [], "packed": ["--packing", "true"], "token_budget": ["--max_tokens_per_batch", "160"]}
# Log-prob implementation the step uses; "liger" is Liger's fused kernel under Triton's interpreter (CPU).
LOGPROBS = ("chunked", "full", "liger")
PRECISION = {"fp32": [], "bf16": ["--mixed_precision", "bf16"]}
GRAD_CKPT = {"off": [], "on": ["--gradient_checkpointing", "true"]}
ACCUMULATION = ("1", "2")
EVAL = {"off": [], "on": ["--eval_mixer_list", "{test}", "8"]}
# A length-normalized loss with a reference, a summed one, a reference-free one.
LOSSES = {"dpo_norm": ["--beta", "5"], "dpo": ["--beta", "0.1"], "simpo": []}

AXES: dict[str, list[str]] = {
    "engine": list(ENGINES),
    "weights": list(WEIGHTS),
    "batching": list(BATCHING),
    "logprobs": list(LOGPROBS),
    "precision": list(PRECISION),
    "grad_ckpt": list(GRAD_CKPT),
    "accumulation": list(ACCUMULATION),
    "eval": list(EVAL),
    "loss": list(LOSSES),
}

# The tiny run every cell makes: 16 pairs of the synthetic task, 2 pairs per device, 64 tokens at most.
PAIRS, PER_DEVICE = 16, 2
COMMON = [
    "--max_seq_length", "64", "--per_device_train_batch_size", str(PER_DEVICE), "--learning_rate", "1e-3",
    "--warmup_ratio", "0.0", "--num_epochs", "1", "--logging_steps", "1", "--seed", "1", "--reference_batch_size", "4",
    "--num_sample_prompts", "0",  # the matrix compares training; sample answers have their own tests
]  # fmt: skip

# Per precision: largest |loss difference| at any step, and ||w - w_ref|| / ||w_ref - w_initial|| of the final weights.
TOLERANCE = {"fp32": {"loss": 1e-4, "weights": 1e-3}, "bf16": {"loss": 3e-2, "weights": 0.25}}


def axes(exclude_slow: bool) -> dict[str, list[str]]:
    """The axes of a matrix run (without the slow engines for the pairwise set in `make test`)."""
    if not exclude_slow:
        return dict(AXES)
    return {**AXES, "engine": [e for e in AXES["engine"] if e not in SLOW_ENGINES]}


def processes(cell: dict[str, str]) -> int:
    return ENGINES[cell["engine"]][0]


def flags(cell: dict[str, str], model: str, train: str, test: str, out: str) -> list[str]:
    """The command-line flags of ``cell`` (the log-prob implementation is chosen by the worker)."""
    accumulation = cell["accumulation"]
    return [
        "--model_name_or_path", model, "--mixer_list", train, str(PAIRS), "--output_dir", out, *COMMON,
        "--gradient_accumulation_steps", accumulation, "--loss_type", cell["loss"], *LOSSES[cell["loss"]],
        *ENGINES[cell["engine"]][1], *WEIGHTS[cell["weights"]], *BATCHING[cell["batching"]],
        *PRECISION[cell["precision"]], *GRAD_CKPT[cell["grad_ckpt"]],
        *(f.format(test=test) for f in EVAL[cell["eval"]]),
    ]  # fmt: skip


def reference_of(cell: dict[str, str]) -> dict[str, str]:
    """The one-process fp32 run with the same global batch: every rank's micro-batches accumulated on one process
    (packed batches hold the same pairs as padded ones, so the padded run is the reference of both)."""
    return {
        "engine": "single",
        "weights": cell["weights"],
        "batching": "token_budget" if cell["batching"] == "token_budget" else "padded",
        "logprobs": "chunked",
        "precision": "fp32",
        "grad_ckpt": "off",
        "accumulation": str(int(cell["accumulation"]) * processes(cell)),
        "eval": "off",
        "loss": cell["loss"],
    }


def name(cell: dict[str, str]) -> str:
    return "-".join(cell[axis] for axis in AXES)


# Combinations the recipe refuses with an `error:` line (exit code 2); docs/engines.md lists them. A refusal whose message
# is not here fails its cell.
REFUSALS: tuple[str, ...] = ()
