"""fp16 made real: float16 autocast and dynamic loss scaling wherever the run's engine does not do it itself.

accelerate turns ``--mixed_precision fp16`` on only off-CPU (on CPU it silently trains in fp32) and, on GPUs, steps
through ``torch.amp.GradScaler``, which needs every optimizer step to have produced a gradient and, under FSDP2,
sees only this rank's gradient shard. :func:`enable_fp16` takes fp16 over from accelerate for every engine but
DeepSpeed (which converts the model to float16 and runs its own dynamic loss scaler from its config's ``"fp16"``
section): the log-prob passes run under ``torch.autocast(float16)`` (:func:`autocast`) and the loop scales the loss
with a :class:`LossScaler`, GradScaler's algorithm with the found-inf flag agreed across ranks, so every rank skips
the same steps.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from open_instruct.errors import UserError

# Per accelerator that enable_fp16 took over: its scaler (accelerate keeps one Accelerator per run and stage).
_SCALERS: weakref.WeakKeyDictionary[Any, LossScaler] = weakref.WeakKeyDictionary()


class LossScaler:
    """Dynamic loss scaling with ``torch.amp.GradScaler``'s semantics: the loss is multiplied by ``scale`` before
    backward; before clipping the gradients are divided by it and checked; a step with an inf/nan gradient on any
    rank is skipped and the scale multiplied by ``backoff_factor``; after ``growth_interval`` clean steps in a row it
    is multiplied by ``growth_factor``. A step where no parameter got a gradient (every micro-batch skipped as
    non-finite) counts as clean: there is nothing to overflow."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        device: Any = "cpu",
    ) -> None:
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.device = torch.device(device)
        self.clean_steps = 0  # clean steps since the scale last changed
        self.overflow_steps = 0  # optimizer steps skipped for an overflow, over the whole run

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current scale (what is back-propagated)."""
        return loss * self.scale

    def unscale_(self, params: Iterable[torch.Tensor]) -> bool:
        """Divide every gradient of ``params`` by the scale in place; returns whether any rank found an inf/nan (an
        all-reduce when a process group exists: every rank must call it at the same step)."""
        found = torch.zeros(1, device=self.device)
        inv_scale = torch.full((1,), 1.0 / self.scale, device=self.device)
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for param in params:
            grad = param.grad
            if grad is None:
                continue
            grad = grad.to_local() if hasattr(grad, "to_local") else grad  # FSDP2: this rank's shard (a view)
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
        with torch.no_grad():
            for (device, _), grads in groups.items():
                found_here = torch.zeros(1, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_here, inv_scale.to(device))
                found += found_here.to(self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
        return bool(found.item() > 0)

    def update(self, found_inf: bool) -> None:
        """Back off after an overflow, grow after ``growth_interval`` clean steps."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.overflow_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def metrics(self) -> dict[str, float]:
        """``loss_scale`` (now) and ``overflow_steps`` (skipped so far) for the metrics row."""
        return {"loss_scale": self.scale, "overflow_steps": self.overflow_steps}

    def state_dict(self) -> dict[str, float | int]:
        """Plain numbers (equal on every rank): the checkpoint's ``trainer_state.json`` holds them."""
        return {
            "scale": self.scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "clean_steps": self.clean_steps,
            "overflow_steps": self.overflow_steps,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Continue from :meth:`state_dict`."""
        self.scale = float(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.clean_steps = int(state["clean_steps"])
        self.overflow_steps = int(state["overflow_steps"])


def runs_own_fp16(accelerator: Any) -> bool:
    """Whether the engine scales fp16 losses itself (DeepSpeed: its config's ``"fp16"`` section)."""
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def enable_fp16(accelerator: Any) -> LossScaler | None:
    """Under ``--mixed_precision fp16`` without DeepSpeed: switch accelerate's own fp16 handling off (its GradScaler,
    its autocast of the model's forward) and return the :class:`LossScaler` the loop steps with; None otherwise.
    Call right after the accelerator is built: before the reference pass (which runs under :func:`autocast`) and
    before ``accelerator.prepare`` (which hands accelerate's scaler to the optimizer)."""
    if accelerator.mixed_precision != "fp16" or runs_own_fp16(accelerator):
        return None
    accelerator.native_amp = False
    accelerator.scaler = None
    scaler = LossScaler(device=accelerator.device)
    _SCALERS[accelerator] = scaler
    return scaler


def check_fp16_weights(model_options: dict[str, Any], deepspeed: bool) -> None:
    """Under fp16, refuse float16 master weights (``model_options``: the model's loading options) without DeepSpeed:
    their gradients would be float16 too, and unscaling them loses what the scaling kept (``torch.amp.GradScaler``
    refuses them as well). DeepSpeed keeps its own fp32 master copy of float16 weights."""
    dtype = str(model_options.get("dtype", model_options.get("torch_dtype", ""))).removeprefix("torch.")
    if dtype in ("float16", "half") and not deepspeed:
        raise UserError(
            "--mixed_precision fp16 keeps fp32 master weights and scales the loss: load the model in float32 "
            "(drop torch_dtype float16 from --additional_model_arguments), or train float16 weights under DeepSpeed "
            "(--zero_stage), which keeps its own fp32 master copy"
        )


def cpu_has_fp16() -> bool:
    """Whether this CPU computes float16 in oneDNN (AVX512-FP16 or AMX-FP16): DeepSpeed's CPU accelerator asks the same
    question and refuses fp16 where the answer is no."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_fp16_device(deepspeed: bool, cuda: bool) -> None:
    """Under fp16 with DeepSpeed and no GPU, refuse a CPU without float16 before the launch: DeepSpeed would stop
    every rank in ``accelerator.prepare``, after the data and the model were loaded. One process and FSDP2 scale the
    loss themselves (autocast on CPU computes float16 anywhere), so only DeepSpeed is checked."""
    if deepspeed and not cuda and not cpu_has_fp16():
        raise UserError(
            "--mixed_precision fp16 under DeepSpeed (--zero_stage) on CPU: this CPU has no float16 in oneDNN "
            "(needs AVX512-FP16 or AMX-FP16), so DeepSpeed refuses it; use --mixed_precision bf16, or train fp16 "
            "on one process or under --fsdp, which scale the loss themselves"
        )


def loss_scaler_of(accelerator: Any) -> LossScaler | None:
    """The scaler :func:`enable_fp16` made for ``accelerator``, if any."""
    return _SCALERS.get(accelerator)


def autocast(accelerator: Any) -> contextlib.AbstractContextManager:
    """The run's autocast: float16 where :func:`enable_fp16` took fp16 over, else accelerate's."""
    if accelerator in _SCALERS:
        return torch.autocast(device_type=accelerator.device.type, dtype=torch.float16)
    return accelerator.autocast()


def scale_metrics(scaler: LossScaler | None, model: Any) -> dict[str, float]:
    """``loss_scale`` and ``overflow_steps``: ours, or DeepSpeed's own under its fp16 (its skipped steps); empty
    when the run does not scale its loss."""
    if scaler is not None:
        return scaler.metrics()
    optimizer = getattr(model, "optimizer", None)
    if not getattr(model, "fp16_enabled", lambda: False)() or optimizer is None:
        return {}
    return {"loss_scale": float(optimizer.loss_scale), "overflow_steps": int(model.skipped_steps)}
