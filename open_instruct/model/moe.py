"""Mixture-of-experts router load balancing: collect router logits from the decoder and compute the auxiliary loss.

The log-prob code calls the decoder submodule directly (never the ``...ForCausalLM`` forward that computes ``aux_loss``),
so :func:`capture_router_logits` hooks that decoder: a pre-hook asks it for ``output_router_logits=True`` and a forward
hook keeps the returned router logits together with the attention mask of the same call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from open_instruct.engine import unwrap_model
from open_instruct.errors import UserError


def expert_counts(config: Any) -> tuple[int, int] | None:
    """(number of experts, experts per token) of a MoE config (Mixtral, OLMoE, Qwen-MoE, ...), else None."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not experts or not top_k:
        return None
    return int(experts), int(top_k)


def require_moe(config: Any, name: str) -> tuple[int, int]:
    """:func:`expert_counts`, or a clear error when ``--load_balancing_loss`` is asked of a dense model."""
    counts = expert_counts(config)
    if counts is None:
        raise UserError(
            f"--load_balancing_loss needs a mixture-of-experts model; {name} "
            f"({getattr(config, 'model_type', '?')}) has no num_experts / num_experts_per_tok in its config"
        )
    return counts


def switch_load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over all layers' tokens (our own; used when transformers has no helper).

    ``router_logits``: per layer ``[N*L, E]``; ``attention_mask`` ``[N, L]`` (padding excluded). With ``f_e`` the
    fraction of top-k assignments that go to expert ``e`` and ``P_e`` its mean router probability, both over every
    non-padding token of every layer: ``loss = E * sum_e f_e * P_e`` (1 times ``top_k`` when perfectly balanced).
    """
    logits = torch.cat([layer.float() for layer in router_logits], dim=0)  # [layers*N*L, E]
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # [T, k]
    assigned = torch.zeros_like(probs).scatter_(1, chosen, 1.0)  # [T, E], k ones per row
    if attention_mask is None:
        weights = torch.ones(probs.shape[0], device=probs.device)
    else:
        weights = attention_mask.reshape(-1).to(probs.device, torch.float32).repeat(len(router_logits))
    total = weights.sum().clamp(min=1)
    fraction = (assigned * weights[:, None]).sum(0) / total  # [E]
    mean_prob = (probs * weights[:, None]).sum(0) / total  # [E]
    return num_experts * (fraction * mean_prob).sum()


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The load-balancing loss with transformers' own helper when present, else :func:`switch_load_balancing_loss`."""
    try:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # heavy, maybe absent
    except ImportError:
        return switch_load_balancing_loss(router_logits, num_experts, top_k, attention_mask)
    return load_balancing_loss_func(tuple(router_logits), num_experts, top_k, attention_mask)


@dataclass
class RouterCapture:
    """Router logits of each decoder call inside :func:`capture_router_logits`, with the call's attention mask."""

    num_experts: int = 0
    top_k: int = 0
    calls: list[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]] = field(default_factory=list)

    def aux_loss(self) -> torch.Tensor | None:
        """Mean load-balancing loss over the captured calls (None when nothing was captured)."""
        if not self.calls:
            return None
        losses = [load_balancing_loss(logits, self.num_experts, self.top_k, mask) for logits, mask in self.calls]
        return torch.stack([torch.as_tensor(x) for x in losses]).mean()


@contextmanager
def capture_router_logits(model: Any, enabled: bool = True) -> Iterator[RouterCapture]:
    """While active, every call of ``model``'s decoder returns and records its router logits."""
    capture = RouterCapture()
    if not enabled:
        yield capture
        return
    inner = unwrap_model(model)
    capture.num_experts, capture.top_k = require_moe(inner.config, type(inner).__name__)
    decoder = getattr(inner, inner.base_model_prefix)
    masks: list[torch.Tensor | None] = []

    def ask(module: Any, inputs: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask")
        masks.append(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)
        return inputs, {**kwargs, "output_router_logits": True}

    def keep(module: Any, inputs: tuple, output: Any) -> None:
        logits = getattr(output, "router_logits", None)
        if logits:
            capture.calls.append((tuple(logits), masks[-1] if masks else None))

    handles = [decoder.register_forward_pre_hook(ask, with_kwargs=True), decoder.register_forward_hook(keep)]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()
