"""The memory model: bytes per GPU of each phase of a run, from the model's shape and the engine's layout alone.

Notation: ``P`` parameters, ``P_t`` trainable ones (LoRA: the adapters), ``L`` the largest module's parameters,
``P_l`` one decoder layer's; ``N_p``, ``N_g``, ``N_o`` the ranks weights, gradients and optimizer state are split
over (``engine.state_layout``); ``w`` bytes per stored weight, ``c`` bytes per computed element (2 under bf16/fp16,
4 in fp32); ``T`` tokens in one forward (padding included; a DPO micro-batch of ``B`` pairs is ``2B`` rows), ``h``
hidden size, ``i`` MLP width, ``kv`` key/value width (kv heads x head dim), ``n`` heads, ``V`` vocabulary, ``k``
tokens per log-prob chunk (``min(chunk, T)``), ``d`` decoder layers.

Model states (present through the whole run):
- parameters ``w P / N_p`` (0 when offloaded); QLoRA's 4-bit base: 0.5625 bytes each (NF4 + its block constants);
- gradients: an engine with an fp32 master copy (DeepSpeed) holds ``w P_t / N_g`` in the working precision and an
  fp32 partition ``4 P_t / N_o`` for the step; otherwise fp32 gradients ``4 P_t / N_g``; DDP adds its flat copy
  ``4 P_t``; with the optimizer offloaded both live on the CPU;
- optimizer: AdamW's two fp32 moments ``8 P_t / N_o``, plus ``4 P_t / N_o`` for the master copy (0 when offloaded);
- gathered weights under parameter sharding: DeepSpeed's accounting ``2 c L`` (the largest module's 16-bit weights
  and gradients), FSDP2 ``gathers x c P_l + 4 P_l`` (layers in flight, one layer's unsharded fp32 gradients);
- in a forward or backward ZeRO-3 keeps up to ``stage3_max_live_parameters`` weights gathered (our configs' reuse
  distance releases none earlier): ``c min(P, live)`` when that exceeds the accounting above;
- gradient buckets ``c x bucket elements`` (DeepSpeed's reduce buckets, two with overlap_comm).
For bf16 DeepSpeed this is DeepSpeed's own estimator (``estimate_zero{2,3}_model_states_mem_needs``: ZeRO-2
``2P + 18P/N``, offloaded ``2P``; ZeRO-3 ``4L + 18P/N``, ``4L + 2P/N``, ``4L``), except that for ZeRO-3 we also
count the 16-bit gradient partition (``2P/N``) that lives beside the fp32 one during the step.

Activations of a forward with gradients, per token and decoder layer (what autograd saves: the two RMSNorm outputs,
attention's query/output/projection inputs, the residual stream, ``8h``; keys and values ``2 kv``; the MLP's gate,
up, activation and product ``4i``; attention's log-sum-exp and the norms' reciprocal roots ``n + 2`` in fp32)::

    S = c (8h + 2kv + 4i) + 4 (n + 2)          (MoE: 4i -> 4 i_e x experts per token, plus the router's logits)

so ``T d S`` in all; with gradient checkpointing only each layer's input ``c h`` stays, plus one layer recomputed
in the backward: ``T (d c h + S)``. The backward's own work space is ``T c (2i + 2h)`` (the gradients flowing
through the layer being differentiated). The log-prob step keeps the final hidden states at the label positions
(``T c h`` and their fp32 gradient ``4 T h``) and computes ``k`` tokens of fp32 logits at a time: about four
``[k, V]`` tensors at once (logits, log-softmax, their gradients) = ``16 k V``.

The training step's peak is the largest of: the start of the backward (model states but the gradients, which only
exist then under gradient accumulation or where the engine keeps its gradient partition, + activations + the larger of the log-prob chunk and the backward work space:
the chunk's backward ends before the decoder's begins; fp32 weights computed in 16-bit add autocast's cached copies
``c P``), its end (model states + work space) and the optimizer step (model states + AdamW's temporaries
``4 P_t / N_o``: its square-root denominators). The reference pass (no
gradients) holds the weights, what the engine allocates at start (DeepSpeed: the optimizer state), one layer's work
``T_r c (2h + 2i)`` and the chunk ``8 k V``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from open_instruct.engine.base import StateLayout
from open_instruct.plan.model_config import ModelShape

QLORA_BYTES_PER_PARAM = 0.5625  # NF4 (4 bits) + one fp32 absmax per 64 weights, double-quantized


@dataclass(frozen=True)
class Workload:
    """What one forward of the run looks like, and how the model is trained."""

    tokens: int  # tokens in one training forward (padding included)
    reference_tokens: int  # tokens in one forward of the reference pass
    chunk: int  # tokens of logits at a time in the log-prob step
    gradient_checkpointing: bool = False
    trainable: int | None = None  # LoRA: adapter parameters (None: all)
    qlora: bool = False
    reference_pass: bool = True
    accumulation: int = 1  # micro-batches per optimizer step


@dataclass
class Phase:
    """Bytes per GPU of one phase, by component (insertion order is the print order)."""

    name: str
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def lora_parameters(shape: ModelShape, rank: int, targets: list[str]) -> int:
    """Adapter parameters of rank ``rank`` on the named projections of every layer (``all-linear``: all seven)."""
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    sizes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    names = sizes if "all-linear" in targets else [t for t in targets if t in sizes]
    return shape.layers * sum(rank * (sizes[n][0] + sizes[n][1]) for n in names)


def layer_activation_bytes(shape: ModelShape, c: int) -> float:
    """``S``: bytes autograd saves per token in one decoder layer."""
    h, kv = shape.hidden, shape.kv_dim
    mlp = (
        4 * shape.expert_intermediate * shape.experts_per_token + shape.experts
        if shape.experts
        else 4 * shape.intermediate
    )
    norms = (shape.q_dim + kv) if shape.qk_norm else 0
    return c * (8 * h + 2 * kv + mlp + norms) + 4 * (shape.heads + 2)


# One forward pass's activations off CUDA (``--max_tokens_per_forward`` unset, open_instruct/training/forward_passes.py):
# 512 MiB is about 400 tokens of SmolLM2-135M in fp32 (1-2 HH pairs with their prompt shared). Measured there, 8 pairs
# (64 real pairs, 3 steps, 2 threads): one pass per micro-batch peaked at 5,540 MB in 54 s, 802-token passes at
# 4,404 MB in 60 s, 400-token passes at 3,946 MB in 57 s: the step time does not move beyond its noise.
DEFAULT_ACTIVATION_BYTES = 1 << 29


def activation_bytes_per_token(shape: ModelShape, c: int) -> float:
    """``d S``: bytes autograd saves per token of one forward with gradients, all decoder layers."""
    return shape.layers * layer_activation_bytes(shape, c)


def default_pass_tokens(shape: ModelShape, c: int) -> int:
    """Tokens per forward pass whose activations come to ``DEFAULT_ACTIVATION_BYTES`` (the CPU default)."""
    return max(1, int(DEFAULT_ACTIVATION_BYTES // activation_bytes_per_token(shape, c)))


def model_states(shape: ModelShape, layout: StateLayout, work: Workload) -> dict[str, float]:
    """Parameters, gradients, optimizer state, gathered weights and buckets per GPU."""
    p = shape.parameters()
    pt = work.trainable if work.trainable is not None else p
    lora = work.trainable is not None
    w, c = layout.working_bytes, layout.compute_bytes
    base_bytes = QLORA_BYTES_PER_PARAM if work.qlora else w
    params = 0.0 if layout.offload_params else base_bytes * p / layout.param_shards
    if lora and not layout.offload_params:
        params += w * pt / layout.param_shards
    if layout.offload_optimizer:
        grads = w * pt / layout.grad_shards if layout.master_copy and layout.grad_shards == 1 else 0.0
        optimizer = 0.0
    elif layout.master_copy:
        grads = w * pt / layout.grad_shards + 4 * pt / layout.optimizer_shards
        optimizer = 12 * pt / layout.optimizer_shards
    else:
        grads = 4 * pt / layout.grad_shards + (4 * pt if layout.gradient_copy else 0)
        optimizer = 8 * pt / layout.optimizer_shards
    gathered = 0.0
    if layout.gathered == "module":
        gathered = 2 * c * shape.largest_module_params()
    elif layout.gathered == "layer":
        layer = shape.layer_params()
        gathered = (c * p if layout.gathers < 0 else layout.gathers * c * layer) + 4 * layer
    return {
        "parameters": params,
        "gradients": grads,
        "optimizer states": optimizer,
        "gathered weights": gathered,
        "communication buffers": c * layout.bucket_elements,
    }


def gathered_in_flight(shape: ModelShape, layout: StateLayout, accounted: float) -> float:
    """Gathered weights during a forward or backward: ZeRO-3 keeps up to its live limit gathered between uses."""
    if layout.offload_params or not layout.live_elements:
        return accounted
    return max(accounted, layout.compute_bytes * min(shape.parameters(), layout.live_elements))


def training_step(shape: ModelShape, layout: StateLayout, work: Workload) -> Phase:
    """The training step's peak per GPU: the largest of the backward's start, its end and the optimizer step."""
    states = model_states(shape, layout, work)
    c, t, h = layout.compute_bytes, work.tokens, shape.hidden
    per_layer = layer_activation_bytes(shape, c)
    if work.gradient_checkpointing:
        activations = t * (shape.layers * c * h + per_layer)
    else:
        activations = t * shape.layers * per_layer
    backward_work = t * c * (2 * shape.intermediate + 2 * h)
    logprobs = t * (c * h + 4 * h) + 16 * min(work.chunk, t) * shape.vocab
    autocast = c * shape.parameters() if c < layout.working_bytes and layout.param_shards == 1 else 0.0
    pt = work.trainable if work.trainable is not None else shape.parameters()
    fixed = {k: v for k, v in states.items() if k != "gradients"}
    fixed["gathered weights"] = gathered_in_flight(shape, layout, states["gathered weights"])
    grads = states["gradients"]
    kept = layout.working_bytes * pt / layout.grad_shards if layout.kept_gradients and grads else 0.0
    # Gradients of earlier micro-batches are there from the start of the backward (accumulation), else they
    # appear as the activations go; the log-prob chunk's backward ends before the decoder's work space is needed.
    candidates = [
        {
            **fixed,
            "gradients": grads if work.accumulation > 1 else kept,
            "activations": activations,
            "log-prob chunk": max(logprobs, backward_work),
            "autocast weight copies": autocast,
        },
        {**fixed, "gradients": grads, "activations": backward_work, "autocast weight copies": autocast},
        {
            **fixed,
            "gradients": grads,
            "optimizer step temporaries": 0.0 if layout.offload_optimizer else 4 * pt / layout.optimizer_shards,
        },
    ]
    peak = max(candidates, key=lambda parts: sum(parts.values()))
    return Phase("training step", {k: v for k, v in peak.items() if v or k in states})


def reference_pass(shape: ModelShape, layout: StateLayout, work: Workload) -> Phase:
    """The no-gradient reference pass: weights, what the engine allocated at start, one layer's work, the chunk."""
    states = model_states(shape, layout, work)
    c, t = layout.compute_bytes, work.reference_tokens
    allocated_at_start = layout.master_copy  # DeepSpeed builds its optimizer state in prepare; torch's AdamW lazily
    parts = {
        "parameters": states["parameters"],
        "gradients": states["gradients"] if allocated_at_start else 0.0,
        "optimizer states": states["optimizer states"] if allocated_at_start else 0.0,
        "gathered weights": gathered_in_flight(shape, layout, states["gathered weights"] / 2),
        "activations": t * c * (2 * shape.hidden + 2 * shape.intermediate),
        "log-prob chunk": 8 * min(work.chunk, t) * shape.vocab,
    }
    return Phase("reference pass", parts)
