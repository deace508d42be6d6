"""fp16's dynamic loss scaler against ``torch.amp.GradScaler`` (the semantics it copies) and against hand-computed
values: unscaling, growth and back-off, skipped steps on overflow, the found-inf flag agreed across two processes,
and a step without gradients counted as clean; the float16-master-weights refusal."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from open_instruct.engine.loss_scaling import LossScaler, check_fp16_weights, enable_fp16, loss_scaler_of
from open_instruct.errors import UserError
from tests.conftest import free_port


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).sum()


def test_unscaled_gradients_equal_the_unscaled_loss_gradients():
    model, reference = _model(), _model()
    x = torch.randn(5, 4)
    scaler = LossScaler(init_scale=1024.0)
    scaler.scale_loss(_loss(model, x)).backward()
    assert model[0].weight.grad.abs().max() > 10 * reference[0].weight.detach().abs().max()  # really scaled
    assert scaler.unscale_(model.parameters()) is False
    _loss(reference, x).backward()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-6, atol=0)


def test_scale_follows_grad_scaler_through_overflows_and_growth():
    """The same sequence of clean and overflowing steps as torch's GradScaler: same scale, same skipped steps, same
    weights after each step."""
    ours_model, torch_model = _model(), _model()
    ours_opt = torch.optim.SGD(ours_model.parameters(), lr=0.1)
    torch_opt = torch.optim.SGD(torch_model.parameters(), lr=0.1)
    ours = LossScaler(init_scale=8.0, growth_interval=3)
    theirs = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3)
    pattern = [False, False, False, True, False, True, True, False, False, False, False]
    for step, poison in enumerate(pattern):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step))
        for model, scale in ((ours_model, ours.scale_loss), (torch_model, theirs.scale)):
            loss = _loss(model, x) * (math.inf if poison else 1.0)
            scale(loss).backward()
        overflow = ours.unscale_(ours_model.parameters())
        assert overflow is poison
        if not overflow:
            ours_opt.step()
        ours.update(overflow)
        theirs.step(torch_opt)
        theirs.update()
        assert ours.scale == theirs.get_scale(), step
        for a, b in zip(ours_model.parameters(), torch_model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        ours_opt.zero_grad()
        torch_opt.zero_grad()
    assert ours.overflow_steps == sum(pattern) == 3
    assert ours.metrics() == {"loss_scale": theirs.get_scale(), "overflow_steps": 3}


def test_growth_and_backoff_by_hand():
    scaler = LossScaler(init_scale=4.0, growth_factor=2.0, backoff_factor=0.25, growth_interval=2)
    for found, want in [(False, 4.0), (False, 8.0), (False, 8.0), (True, 2.0), (False, 2.0), (False, 4.0)]:
        scaler.update(found)
        assert scaler.scale == want


def test_a_step_without_gradients_is_clean():
    """Every micro-batch skipped as non-finite leaves no gradient: nothing overflowed (GradScaler would raise)."""
    model = _model()
    scaler = LossScaler(init_scale=2.0, growth_interval=1)
    assert scaler.unscale_(model.parameters()) is False
    scaler.update(False)
    assert scaler.scale == 4.0 and scaler.overflow_steps == 0


def test_state_round_trip():
    scaler = LossScaler(init_scale=16.0, growth_interval=3)
    for found in (False, True, False, False):
        scaler.update(found)
    restored = LossScaler()
    restored.load_state_dict(copy.deepcopy(scaler.state_dict()))
    for found in (False, False, True):
        scaler.update(found)
        restored.update(found)
        assert restored.state_dict() == scaler.state_dict()


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = _model()
    scaler = LossScaler(init_scale=8.0)
    # Only rank 1 overflows (a shard FSDP2 holds alone); rank 0 got no gradient at all (every micro-batch skipped).
    if rank == 1:
        (_loss(model, torch.randn(2, 4)) * math.inf).backward()
    overflow = scaler.unscale_(model.parameters())
    scaler.update(overflow)
    results[rank] = (overflow, scaler.scale)
    dist.destroy_process_group()


@pytest.mark.slow
def test_found_inf_is_agreed_across_ranks():
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(free_port(), results), nprocs=2)
        assert dict(results) == {0: (True, 4.0), 1: (True, 4.0)}


class _State:
    deepspeed_plugin = None


class _FakeAccelerator:
    """What enable_fp16 reads and switches off on accelerate's Accelerator."""

    def __init__(self, mixed_precision: str, deepspeed: bool = False) -> None:
        self.mixed_precision = mixed_precision
        self.state = _State()
        self.state.deepspeed_plugin = object() if deepspeed else None
        self.native_amp, self.scaler, self.device = True, object(), torch.device("cpu")


def test_enable_fp16_takes_over_from_accelerate_only_without_deepspeed():
    plain = _FakeAccelerator("fp16")
    scaler = enable_fp16(plain)
    assert isinstance(scaler, LossScaler) and loss_scaler_of(plain) is scaler
    assert plain.native_amp is False and plain.scaler is None  # accelerate's GradScaler would scale a second time
    for other in (_FakeAccelerator("fp16", deepspeed=True), _FakeAccelerator("bf16"), _FakeAccelerator("no")):
        assert enable_fp16(other) is None and loss_scaler_of(other) is None and other.native_amp is True


def test_float16_master_weights_refused_without_deepspeed():
    with pytest.raises(UserError, match="keeps fp32 master weights"):
        check_fp16_weights({"torch_dtype": "float16"}, deepspeed=False)
    check_fp16_weights({"torch_dtype": "float16"}, deepspeed=True)
    check_fp16_weights({"dtype": "bfloat16"}, deepspeed=False)
    check_fp16_weights({}, deepspeed=False)


def test_the_cli_refuses_float16_weights_before_any_work(tmp_path, tiny_model_dir, synthetic_data, capsys):
    """One ``error:`` line, exit code 2, no output folder: the run never started."""
    from open_instruct.dpo_tune_cache import main
    from tests.conftest import small_run_args

    out = tmp_path / "out"
    argv = small_run_args(tiny_model_dir, synthetic_data[0], out, mixed_precision="fp16",
                          additional_model_arguments='{"torch_dtype": "float16"}')  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "--mixed_precision fp16 keeps fp32 master weights" in err and not out.exists()


def test_deepspeed_fp16_optimizer_state_loads_weights_only(tmp_path):
    """ZeRO under fp16 pickles its DynamicLossScaler into the optimizer state: a resume must be allowed to read it
    (and only as data: the weights-only loader rebuilds its fields, it runs no code)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from open_instruct.training.safe_load import load_plain

    scaler = DynamicLossScaler(2.0**12, scale_window=7, min_scale=1, delayed_shift=2, consecutive_hysteresis=False)
    scaler.cur_iter = 5
    torch.save({"loss_scaler": scaler}, tmp_path / "optim_states.pt")
    loaded = load_plain(tmp_path / "optim_states.pt")["loss_scaler"]
    assert (loaded.cur_scale, loaded.scale_window, loaded.cur_iter) == (2.0**12, 7, 5)


def test_fp16_under_deepspeed_needs_a_gpu_or_a_cpu_with_float16(monkeypatch):
    """DeepSpeed's CPU accelerator refuses fp16 where oneDNN has none: refused up front, naming the way out; a GPU, or
    one process / FSDP2 (our own loss scaler), is never refused."""
    import open_instruct.engine.loss_scaling as loss_scaling

    monkeypatch.setattr(loss_scaling, "cpu_has_fp16", lambda: False)
    with pytest.raises(UserError, match=r"fp16 under DeepSpeed .* use --mixed_precision bf16"):
        loss_scaling.check_fp16_device(deepspeed=True, cuda=False)
    loss_scaling.check_fp16_device(deepspeed=True, cuda=True)
    loss_scaling.check_fp16_device(deepspeed=False, cuda=False)
    monkeypatch.setattr(loss_scaling, "cpu_has_fp16", lambda: True)
    loss_scaling.check_fp16_device(deepspeed=True, cuda=False)


def test_cpu_fp16_answer_is_deepspeeds():
    """Our question is the one DeepSpeed's CPU accelerator asks before it refuses fp16."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from open_instruct.engine.loss_scaling import cpu_has_fp16

    assert cpu_has_fp16() == bool(CPU_Accelerator().is_fp16_supported())
