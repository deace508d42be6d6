"""The optimizer of a run: AdamW (torch's, or bitsandbytes' 8-bit / paged variants) or Muon, from the flags.

``--optimizer_type muon`` follows the usual split for Muon: its orthogonalized update suits the 2-D weight matrices
inside the decoder layers; embeddings, the output layer, norms and biases (and any other non-2-D parameter) stay on
AdamW. Both share the learning rate and its schedule (their param groups are the scheduler's).
"""

from __future__ import annotations

from typing import Any

import torch

from open_instruct.errors import UserError
from open_instruct.settings import OptimSettings

# open-instruct passes olmo-core's Muon argument names; torch.optim.Muon calls the momentum coefficient "momentum".
_MUON_NAMES = {"mu": "momentum"}


def check_optimizer_environment(optim: OptimSettings) -> None:
    """Before any work: bitsandbytes optimizers need CUDA and the package; Muon needs a torch that has it."""
    if optim.use_8bit_optimizer or optim.dpo_use_paged_optimizer:
        flag = "--use_8bit_optimizer" if optim.use_8bit_optimizer else "--dpo_use_paged_optimizer"
        if not torch.cuda.is_available():
            raise UserError(f"{flag} needs a CUDA GPU (bitsandbytes optimizers run on CUDA only); drop it on CPU")
        try:
            import bitsandbytes  # noqa: F401  # optional: only these optimizers need it
        except ImportError as err:
            raise UserError(f"{flag} needs bitsandbytes: pip install bitsandbytes") from err
    if optim.optimizer_type == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(
            f"--optimizer_type muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}"
        )


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one; ``param_groups`` are theirs (the same dicts), so a schedule reaches all."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        groups = [group for opt in optimizers.values() for group in opt.param_groups]
        super().__init__(groups, defaults={})

    def step(self, closure: Any = None) -> Any:
        for opt in self.optimizers.values():
            opt.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])


def muon_split(model: Any, params: list[torch.nn.Parameter]) -> tuple[list, list]:
    """(Muon's parameters: 2-D weight matrices other than the embeddings and output layer, AdamW's: the rest)."""
    outer = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            outer.add(id(module.weight))
    matrices = [p for p in params if p.ndim == 2 and id(p) not in outer]
    chosen = {id(p) for p in matrices}
    return matrices, [p for p in params if id(p) not in chosen]


def _construct(kind: Any, params: list, label: str, **options: Any) -> torch.optim.Optimizer:
    try:
        return kind(params, **options)
    except TypeError as err:  # an --optimizer_kwargs name this optimizer does not take
        raise UserError(f"--optimizer_kwargs for {label}: {err}") from err


def build_optimizer(optim: OptimSettings, model: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer for ``params`` (the trainable parameters of ``model``) as the flags ask."""
    kwargs = dict(optim.optimizer_kwargs or {})
    common = {"lr": optim.learning_rate, "weight_decay": optim.weight_decay}
    if optim.optimizer_type == "muon":
        matrices, rest = muon_split(model, params)
        muon_kwargs = {_MUON_NAMES.get(k, k): v for k, v in kwargs.items()}
        optimizers = {"muon": _construct(torch.optim.Muon, matrices, "Muon", **common, **muon_kwargs)}
        if rest:
            optimizers["adamw"] = torch.optim.AdamW(rest, **adamw_kernel(optim, {}), **common)
        return CombinedOptimizer(optimizers)
    if optim.use_8bit_optimizer or optim.dpo_use_paged_optimizer:
        from bitsandbytes.optim import AdamW as BnbAdamW  # optional: only these optimizers need it

        bits = 8 if optim.use_8bit_optimizer else 32
        return _construct(
            BnbAdamW, params, "bitsandbytes AdamW", optim_bits=bits, is_paged=optim.dpo_use_paged_optimizer,
            **common, **kwargs,
        )  # fmt: skip
    return _construct(torch.optim.AdamW, params, "AdamW", **adamw_kernel(optim, kwargs), **common, **kwargs)


def adamw_kernel(optim: OptimSettings, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``fused=True`` (one kernel per parameter, CUDA or CPU) unless the flags or ``--optimizer_kwargs`` say otherwise.

    On CPU the unfused step builds two parameter-sized temporaries for its denominator: for the 131 MB output layer
    of a 128k vocabulary that is +262 MB at the step, and the step takes 3x as long (``scripts/bench/bench_adamw.py``).
    Under CPU offload the engine steps the optimizer on its own host copies, so the unfused one is left to it.
    """
    if {"fused", "foreach"} & kwargs.keys():  # the user's own choice of kernel
        return {}
    offloaded = optim.offload_optimizer or optim.offload_param or optim.fsdp_offload_params
    return {"fused": True} if optim.fused_optimizer and not offloaded else {}
