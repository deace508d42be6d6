"""bf16 is in effect on every path: the decoder's matmuls run in the run's precision, log-probs come out fp32.

The unit tests hook every ``nn.Linear`` inside the decoder and read the dtype it produced, on each log-prob
implementation (chunked, full, Liger), unwrapped and under DDP, in training, the reference pass and evaluation. The CLI
tests train 10 steps in bf16 (accelerate's autocast, and a model loaded in bf16) and compare the per-step losses with
fp32: within ``LOSS_TOLERANCE`` of each other, but not equal (before the fix they were bit-identical).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from open_instruct.engine.loss_scaling import cpu_has_fp16
from open_instruct.objectives.logprobs import sequence_logprobs
from open_instruct.training.evaluation import gather_table
from open_instruct.training.precision import in_run_precision, record_activation_dtypes
from open_instruct.training.reference_cache import compute as reference_pass
from tests.conftest import (
    free_port,
    launch,
    read_metrics,
    run_cli,
    run_python,
    small_run_args,
    torchrun_command,
)
from tests.model_helpers import padded_rows, tiny_llama

# Largest per-step |loss(bf16) - loss(fp32)| accepted over 10 steps of the tiny model at lr 1e-3 (measured: 8e-4 for
# autocast, 2e-3 for ZeRO-3). bf16 keeps 8 bits of mantissa, so per-token log-probs move by ~1e-2 and the DPO loss,
# a difference of averaged log-probs through a sigmoid, by a few 1e-3.
LOSS_TOLERANCE = 0.02
# fp16 (autocast with dynamic loss scaling): 10 mantissa bits, so ~8x closer. Measured over the same 10 steps
# (largest per-step loss gap / largest final-weight gap): one process 2.3e-4 / 3.2e-3, DDP 2.4e-4 / 3.2e-3, FSDP2
# 4.3e-4 / 2.2e-3, ZeRO-2 and ZeRO-3 (DeepSpeed's own fp16) 3.6e-4 / 2.2e-3. Bounds ~5x the largest.
FP16_LOSS_TOLERANCE = 2e-3
FP16_WEIGHT_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def make_batch() -> dict[str, torch.Tensor]:
    """A padded pair batch ``[4, 12]``: 2 chosen rows then 2 rejected, labels after a 3-token prompt."""
    return {**padded_rows(), "index": torch.arange(2)}


def accelerator_for(mixed_precision: str):
    """A fresh single-process CPU Accelerator (accelerate keeps its state in a process-wide singleton)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, mixed_precision=mixed_precision)


@pytest.fixture(scope="module", autouse=True)
def fresh_accelerate_state_afterwards():
    """Leave no bf16 Accelerator state behind for later tests in this process."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def ddp_group():
    """A one-process gloo group, so DistributedDataParallel can wrap the model in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class FakeLigerKernel:
    """Stands in for Liger's fused linear cross-entropy (no Triton on CPU): records the dtypes it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.dtype, torch.dtype]] = []

    def __call__(self, input, weight, target, bias=None, ignore_index=-100, reduction="none", **_):
        self.calls.append((input.dtype, weight.dtype))
        logits = torch.nn.functional.linear(input, weight, bias).float()
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


def run_pass(which: str, accelerator, model, logprob_fn) -> torch.Tensor:
    """Per-row summed log-probs ``[4]`` from a training step (with backward), the reference pass or evaluation."""
    batch = make_batch()
    if which == "train":
        lp = logprob_fn(model, batch)
        lp.sums.sum().backward()
        model.zero_grad(set_to_none=True)
        assert lp.sums.dtype == torch.float32
        return lp.sums.detach()
    if which == "reference":
        ref = reference_pass(model, [batch], accelerator, logprob_fn, rows=2)
        return torch.cat([ref.chosen_sums, ref.rejected_sums])
    table = gather_table(accelerator, model, [batch], 2, lambda m, b: logprob_fn(m, b).sums.view(2, 2).T)
    return table.T.reshape(-1)


@pytest.mark.parametrize("which", ["train", "reference", "eval"])
@pytest.mark.parametrize("wrapper", ["none", "ddp"])
@pytest.mark.parametrize("impl", ["chunked", "full", "liger"])
def test_decoder_runs_in_bf16_and_logprobs_in_fp32(model, ddp_group, monkeypatch, impl, wrapper, which):
    import liger_kernel.transformers.functional as liger_functional

    fake = FakeLigerKernel()
    monkeypatch.setattr(liger_functional, "liger_fused_linear_cross_entropy", fake)
    wrapped = model if wrapper == "none" else torch.nn.parallel.DistributedDataParallel(model)

    def logprob_fn(m, b):
        return sequence_logprobs(m, b["input_ids"], b["attention_mask"], b["labels"], impl=impl)

    results = {}
    for precision in ("no", "bf16"):
        accelerator = accelerator_for(precision)
        with record_activation_dtypes(wrapped) as seen:
            results[precision] = run_pass(which, accelerator, wrapped, in_run_precision(accelerator, logprob_fn))
        assert seen == ({torch.bfloat16} if precision == "bf16" else {torch.float32}), (precision, seen)
    assert results["bf16"].dtype == torch.float32
    # bf16 really computed (not the fp32 numbers) and close to them: ~1e-2 per token over <= 9 label tokens.
    assert not torch.equal(results["bf16"], results["no"])
    torch.testing.assert_close(results["bf16"], results["no"], rtol=0, atol=0.15)
    if impl == "liger":
        # Training goes through the fused kernel, with bf16 operands as autocast would give a matmul; the no-grad
        # passes (reference, evaluation) never call the gradient-computing kernel.
        expected = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)] if which == "train" else []
        assert fake.calls == expected


def test_precision_line_reports_what_ran(model):
    accelerator = accelerator_for("bf16")
    lines: list[str] = []
    fn = in_run_precision(
        accelerator,
        lambda m, b: sequence_logprobs(m, b["input_ids"], b["attention_mask"], b["labels"]),
        report=lines.append,
    )
    with torch.no_grad():
        fn(model, make_batch())
        fn(model, make_batch())
    assert lines == ["precision: decoder matmuls bfloat16, log-probs float32"]


def test_fp16_autocast_is_ours_on_cpu(model):
    """accelerate leaves fp16 off on CPU (the matmuls stayed fp32: the old bug); enable_fp16 makes them float16."""
    from open_instruct.engine.loss_scaling import enable_fp16

    batch = make_batch()
    for takeover, want in ((False, torch.float32), (True, torch.float16)):
        accelerator = accelerator_for("fp16")
        scaler = enable_fp16(accelerator) if takeover else None
        fn = in_run_precision(
            accelerator, lambda m, b: sequence_logprobs(m, b["input_ids"], b["attention_mask"], b["labels"])
        )
        with torch.no_grad(), record_activation_dtypes(model) as seen:
            out = fn(model, batch)
        assert seen == {want} and out.sums.dtype == torch.float32
        assert (scaler is not None) is takeover


def _losses(out) -> list[float]:
    return [row["train_loss"] for row in read_metrics(out)]


def _check_run(out, baseline: list[float], stdout: str) -> None:
    """10 steps within LOSS_TOLERANCE of fp32 but not equal to it, bf16 reported, saved weights load and are finite."""
    from transformers import AutoModelForCausalLM

    losses = _losses(out)
    assert len(losses) == len(baseline) == 10
    gap = max(abs(a - b) for a, b in zip(losses, baseline))
    assert 0 < gap < LOSS_TOLERANCE, (losses, baseline)
    assert "precision: decoder matmuls bfloat16, log-probs float32" in stdout
    saved = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(1, 9).unsqueeze(0)
    assert torch.isfinite(saved(input_ids=ids).logits.float()).all()


def _flags(model_dir, train_file, out, **overrides):
    values = {"mixer_list": [str(train_file), "80"], **overrides}
    return small_run_args(model_dir, train_file, out, **values)


@pytest.fixture(scope="module")
def fp32_losses(tiny_model_dir, synthetic_data, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("fp32") / "out"
    result = run_cli(_flags(tiny_model_dir, synthetic_data[0], out, mixed_precision="no"), out.parent / "cache")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "precision: decoder matmuls float32, log-probs float32" in result.stdout
    return _losses(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [{"mixed_precision": "bf16"}, {"additional_model_arguments": json.dumps({"torch_dtype": "bfloat16"})}],
    ids=["autocast", "bf16-weights"],
)
def test_bf16_training_tracks_fp32(tiny_model_dir, synthetic_data, fp32_losses, tmp_path, flags):
    out = tmp_path / "out"
    result = run_cli(_flags(tiny_model_dir, synthetic_data[0], out, **flags), tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-4000:]
    _check_run(out, fp32_losses, result.stdout)
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == (
        "bfloat16" if "additional_model_arguments" in flags else "float32"
    )


@pytest.mark.slow
def test_bf16_zero2_and_zero3_on_two_processes_track_fp32(tiny_model_dir, synthetic_data, fp32_losses, tmp_path):
    for stage in ("2", "3"):
        out = tmp_path / f"zero{stage}"
        flags = _flags(
            tiny_model_dir,
            synthetic_data[0],
            out,
            per_device_train_batch_size="4",
            zero_stage=stage,
            mixed_precision="bf16",
        )
        result = launch(torchrun_command(flags), tmp_path / "cache")
        _check_run(out, fp32_losses, result.stdout)


@pytest.mark.slow
def test_sft_stage_runs_in_bf16_too(tiny_model_dir, synthetic_data, tmp_path):
    """The SFT recipe builds its log-prob function the same way: its first pass reports bf16 matmuls."""
    args = ["--model_name_or_path", str(tiny_model_dir), "--mixer_list", str(synthetic_data[0]), "16"]
    args += ["--max_seq_length", "64", "--per_device_train_batch_size", "8", "--mixed_precision", "bf16"]
    args += ["--output_dir", str(tmp_path / "out")]
    result = run_python(["-m", "open_instruct.finetune", *args], tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision: decoder matmuls bfloat16, log-probs float32" in result.stdout
    assert all(math.isfinite(r["train_loss"]) for r in read_metrics(tmp_path / "out") if "train_loss" in r)


def _final_weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def fp32_run(tiny_model_dir, synthetic_data, tmp_path_factory) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(per-step losses, final weights) of the fp32 run the fp16 runs are compared with."""
    out = tmp_path_factory.mktemp("fp32-weights") / "out"
    result = run_cli(_flags(tiny_model_dir, synthetic_data[0], out, mixed_precision="no"), out.parent / "cache")
    assert result.returncode == 0, result.stderr[-4000:]
    return _losses(out), _final_weights(out)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["single", "fsdp2", "zero2"])
def test_fp16_training_tracks_fp32(tiny_model_dir, synthetic_data, fp32_run, tmp_path, engine):
    """fp16 really computes (losses and weights differ from fp32: before, they were byte-identical on one process),
    stays within the measured tolerance of fp32, and logs its loss scale (ours, or DeepSpeed's under ZeRO)."""
    out = tmp_path / "out"
    extra = {} if engine == "single" else {"per_device_train_batch_size": "4"}
    extra.update({"zero2": {"zero_stage": "2"}, "fsdp2": {"fsdp": None}}.get(engine, {}))
    flags = _flags(tiny_model_dir, synthetic_data[0], out, mixed_precision="fp16", **extra)
    flags += ["--fsdp"] if engine == "fsdp2" else []
    if engine == "single":
        result = run_cli(flags, tmp_path / "cache")
        assert result.returncode == 0, result.stderr[-4000:]
    elif engine == "zero2" and not cpu_has_fp16():
        # DeepSpeed's CPU accelerator has fp16 only where oneDNN does (AVX512-FP16/AMX-FP16): refused before the launch.
        result = run_cli(flags, tmp_path / "cache")
        assert result.returncode == 2 and not out.exists(), result.stderr[-4000:]
        assert result.stderr.strip().splitlines()[-1].startswith("error: --mixed_precision fp16 under DeepSpeed")
        return
    else:
        result = launch(torchrun_command(flags), tmp_path / "cache")
    assert "precision: decoder matmuls float16, log-probs float32" in result.stdout
    losses, weights = _losses(out), _final_weights(out)
    baseline, baseline_weights = fp32_run
    assert len(losses) == len(baseline) == 10
    gap = max(abs(a - b) for a, b in zip(losses, baseline))
    weight_gap = max(float((weights[k].float() - w).abs().max()) for k, w in baseline_weights.items())
    assert 0 < gap < FP16_LOSS_TOLERANCE, (losses, baseline)
    assert 0 < weight_gap < FP16_WEIGHT_TOLERANCE
    rows = read_metrics(out)
    assert [(r["loss_scale"], r["overflow_steps"]) for r in rows] == [(2.0**16, 0)] * 10
