"""What open-instruct's flags do here: trackers (tensorboard read back), gradient norm, profiler trace, mixed pairs,
the reference-cache-only exit through open_instruct/dpo.py, optimizers, ZeRO++ hpZ, gradient sync, data cache,
hub configurations, model config overrides, decoder-layer compilation and checkpointing mode."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from open_instruct.config import TrainArguments
from open_instruct.data import sources
from open_instruct.data.prepare import prepare_preference_data
from open_instruct.data.synthetic import build_tokenizer, write_task
from open_instruct.engine.deepspeed import resolve_deepspeed_config
from open_instruct.errors import UserError
from open_instruct.settings import DataSettings, EngineSettings, ModelSettings, OptimSettings
from open_instruct.training import loop
from open_instruct.training.optim import CombinedOptimizer, build_optimizer, check_optimizer_environment
from tests.conftest import ROOT, cli_env, read_metrics, run_cli, small_run_args


def _args(**values) -> TrainArguments:
    return TrainArguments(**{"model_name_or_path": "m", "mixer_list": ["d.jsonl", "1"], **values})


def _optim(**values) -> OptimSettings:
    return OptimSettings.of(_args(**values))


def _engine(**values) -> EngineSettings:
    return EngineSettings.of(_args(**values))


# --- one short training run with the reporting flags ----------------------------------------------------------


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list(folder.glob("*/events.out.tfevents.*"))  # the run's scalars (its hparams sit in a subfolder)
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.slow
def test_reporting_flags_in_one_run(tiny_model_dir, synthetic_data, tmp_path):
    out, mix = tmp_path / "run", tmp_path / "mix"
    flags = ["--with_tracking", "--report_to", "tensorboard", "--log_grad_norm", "--profiling", "--sync_each_batch"]
    flags += ["--dataset_mix_dir", str(mix), "--optimizer_kwargs", '{"betas": [0.8, 0.9]}']
    result = run_cli(
        small_run_args(tiny_model_dir, synthetic_data[0], out, max_train_steps="4", gradient_accumulation_steps="2")
        + flags,
        tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(out)
    # tensorboard: the event file under <output_dir>/tensorboard holds every logged loss, step by step.
    scalars = _tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["train_loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train_loss"]] == pytest.approx([row["train_loss"] for row in metrics], rel=1e-6)
    # --log_grad_norm: a positive, finite norm at every logged step (no clipping asked for).
    assert all(0 < row["grad_norm"] < float("inf") for row in metrics) and len(metrics) == 4
    assert [v for _, v in scalars["grad_norm"]] == pytest.approx([row["grad_norm"] for row in metrics], rel=1e-6)
    # --profiling: a Chrome trace of the profiled steps, its path printed.
    trace = out / "profile" / "trace_rank0.json"
    assert f"trace of 3 optimizer steps written to {trace}" in result.stdout
    assert any(e.get("name", "").startswith("aten::") for e in json.loads(trace.read_text())["traceEvents"])
    top = (out / "profile" / "top_ops_rank0.txt").read_text()  # the operators table beside it, costliest first
    assert "Self CPU" in top and "aten::" in top
    # --dataset_mix_dir: the 64 mixed training pairs, tokenized, one per line.
    pairs = [json.loads(line) for line in (mix / "train_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 64 and sorted(p["index"] for p in pairs) == list(range(64))
    assert json.loads((out / "run_config.json").read_text())["optimizer_kwargs"] == {"betas": [0.8, 0.9]}


@pytest.mark.slow
def test_cache_logprobs_only_through_the_dpo_py_entry(tiny_model_dir, synthetic_data, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "refcache"
    result = subprocess.run(
        [sys.executable, "open_instruct/dpo.py", *small_run_args(tiny_model_dir, synthetic_data[0], out)]
        + ["--cache_logprobs_only"],
        env=cli_env(cache),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert f"--cache_logprobs_only: reference log-probs cached under {cache}" in result.stdout
    assert any(p.is_file() for p in cache.rglob("*"))  # the reference cache was written
    assert not (out / "metrics.jsonl").exists() and not (out / "model.safetensors").exists()  # and nothing trained


# --- optimizers -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_muon_takes_the_decoder_matrices_and_adamw_the_rest(tiny_model):
    params = list(tiny_model.parameters())
    optimizer = build_optimizer(_optim(optimizer_type="muon", optimizer_kwargs={"mu": 0.9}), tiny_model, params)
    assert isinstance(optimizer, CombinedOptimizer)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    on_muon = {names[id(p)] for g in optimizer.optimizers["muon"].param_groups for p in g["params"]}
    expected = {n for n, p in tiny_model.named_parameters() if ".layers." in n and p.ndim == 2}
    assert on_muon == expected and expected
    on_adamw = {names[id(p)] for g in optimizer.optimizers["adamw"].param_groups for p in g["params"]}
    assert on_adamw == set(names.values()) - expected  # embeddings, head, norms
    assert optimizer.optimizers["muon"].param_groups[0]["momentum"] == 0.9  # open-instruct's "mu"
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    batch = torch.randint(0, 50, (2, 8))
    tiny_model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in tiny_model.named_parameters() if ".layers." in n)


def test_adamw_takes_optimizer_kwargs_and_rejects_unknown_ones(tiny_model):
    params = list(tiny_model.parameters())
    optimizer = build_optimizer(_optim(optimizer_kwargs={"betas": [0.8, 0.9]}), tiny_model, params)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(UserError, match="--optimizer_kwargs for AdamW:.*nonsense"):
        build_optimizer(_optim(optimizer_kwargs={"nonsense": 1}), tiny_model, params)


def test_adamw_is_fused_by_default_and_steps_like_the_unfused_one(tiny_model):
    def kernel(**flags):
        optimizer = build_optimizer(_optim(**flags), tiny_model, list(tiny_model.parameters()))
        return optimizer.param_groups[0].get("fused"), optimizer.param_groups[0].get("foreach")

    assert kernel() == (True, None)  # the default, on CPU as on CUDA
    assert kernel(fused_optimizer=False) == (None, None)
    assert kernel(offload_optimizer=True, zero_stage=2)[0] is None  # the engine steps its own host copies
    assert kernel(optimizer_kwargs={"foreach": True}) == (None, True)  # the user's choice of kernel stands
    # Five AdamW steps on the same gradients from the same start: the fused kernel and the unfused one agree.
    start = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=g) for p in tiny_model.parameters()] for _ in range(5)]
    after = []
    for fused in (True, False):
        with torch.no_grad():
            for n, p in tiny_model.named_parameters():
                p.copy_(start[n])
        optim = _optim(fused_optimizer=fused, learning_rate=1e-2, weight_decay=0.1)
        optimizer = build_optimizer(optim, tiny_model, list(tiny_model.parameters()))
        for step in grads:
            for p, grad in zip(tiny_model.parameters(), step, strict=True):
                p.grad = grad.clone()
            optimizer.step()
        after.append([p.detach().clone() for p in tiny_model.parameters()])
    assert any(not torch.equal(a, start[n]) for a, n in zip(after[0], start, strict=True))
    for fused, unfused in zip(*after, strict=True):
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
@pytest.mark.parametrize("flag", ["use_8bit_optimizer", "dpo_use_paged_optimizer"])
def test_bitsandbytes_optimizers_stop_before_any_work_without_cuda(flag, tmp_path):
    with pytest.raises(UserError, match=f"--{flag} needs a CUDA GPU"):
        check_optimizer_environment(_optim(**{flag: True}))
    result = run_cli(["--model_name_or_path", "m", "--mixer_list", "d.jsonl", "1", f"--{flag}"], tmp_path)
    assert result.returncode == 2 and f"error: --{flag} needs a CUDA GPU" in result.stderr


# --- engine and loop ------------------------------------------------------------------------------------------


def test_zero_hpz_partition_size_goes_into_the_zero3_config(capsys):
    config = resolve_deepspeed_config(_engine(zero_stage=3, zero_hpz_partition_size=8), env={})
    assert config["zero_optimization"]["zero_hpz_partition_size"] == 8
    assert (
        "zero_hpz_partition_size" not in resolve_deepspeed_config(_engine(zero_stage=3), env={})["zero_optimization"]
    )
    config = resolve_deepspeed_config(_engine(zero_stage=2, zero_hpz_partition_size=8), env={})
    assert "zero_hpz_partition_size" not in config["zero_optimization"]
    assert "--zero_hpz_partition_size applies to ZeRO-3 only" in capsys.readouterr().out


class _RecordingAccelerator:
    """The accelerator calls one micro-step makes, recorded (no_sync: gradient all-reduce skipped)."""

    def __init__(self):
        self.no_sync_calls, self.clip_limits, self.sync_gradients = 0, [], False
        self.gradient_state = SimpleNamespace(_set_sync_gradients=lambda v: setattr(self, "sync_gradients", v))

    @contextmanager
    def no_sync(self, model):
        self.no_sync_calls += 1
        yield

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, limit):
        self.clip_limits.append(limit)
        return torch.tensor(2.5)


@pytest.mark.parametrize("sync_each_batch", [False, True])
def test_sync_each_batch_never_skips_the_gradient_sync(sync_each_batch):
    weight = torch.nn.Parameter(torch.ones(2))
    step_fn = SimpleNamespace(run=lambda model, batch, rows, scale: ((weight * 2).sum(), {}, 1))
    guard = SimpleNamespace(maybe_inject=lambda loss, step: loss, check=lambda *a: True)
    settings = loop.LoopSettings(1, 1, 2, 0.0, 1, sync_each_batch=sync_each_batch, log_grad_norm=True)
    accelerator, model = _RecordingAccelerator(), SimpleNamespace(parameters=lambda: [weight])
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    norms = [
        loop._micro_step(accelerator, model, optimizer, scheduler, {"index": torch.zeros(1)}, (1, 1.0, last), step_fn,
                         settings, guard, 0)[3]
        for last in (False, True)
    ]  # fmt: skip
    assert accelerator.no_sync_calls == (0 if sync_each_batch else 1)
    assert norms == [None, 2.5] and accelerator.clip_limits == [float("inf")]  # measured, not clipped


# --- data -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["overwrite_cache", "skip_cache"])
def test_overwrite_and_skip_cache_prepare_again(flag, tmp_path):
    write_task(tmp_path / "data", n_train=24, n_test=8, seed=0)
    values = {"mixer_list": [str(tmp_path / "data" / "train.jsonl"), "1.0"], "max_seq_length": 64}
    values["dataset_local_cache_dir"] = str(tmp_path / "cache")
    data = DataSettings.of(_args(**values))
    first = prepare_preference_data(data, build_tokenizer())
    assert prepare_preference_data(data, build_tokenizer()).statistics["cache"]["status"] == "loaded"
    again = prepare_preference_data(DataSettings.of(_args(**values, **{flag: True})), build_tokenizer())
    assert again.statistics["cache"]["status"] == "rewritten" and list(again.records) == list(first.records)


def test_dataset_config_name_reaches_the_hub_loader(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or [])
    list(
        sources.iter_rows(
            _args(dataset_name="org/prefs", dataset_config_name="v2", mixer_list=[]).mixer_list[0], "train"
        )
    )
    list(sources.iter_rows("org/prefs", "train"))
    assert calls == [(("org/prefs", "v2"), {"split": "train"}), (("org/prefs", None), {"split": "train"})]


# --- model ----------------------------------------------------------------------------------------------------


def _load(tiny_model_dir, **values):
    from open_instruct.model.modeling import load_model, load_tokenizer

    settings = ModelSettings.of(_args(model_name_or_path=str(tiny_model_dir), **values))
    return load_model(settings, load_tokenizer(settings), log=print)


def test_config_name_and_rope_scaling_shape_the_model(tiny_model_dir, tmp_path, capsys):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.125}))
    assert _load(tiny_model_dir, config_name=str(tmp_path / "cfg")).config.rms_norm_eps == 0.125
    model = _load(tiny_model_dir, config_name="olmo3_7B", rope_scaling_factor=4.0)
    assert "--config_name olmo3_7B is an olmo-core model config name" in capsys.readouterr().out
    rope = getattr(model.config, "rope_parameters", None) or model.config.rope_scaling  # transformers 5 / 4
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 8192)


def test_selected_modules_checkpoints_every_decoder_layer(tiny_model_dir):
    assert _load(tiny_model_dir, activation_checkpointing_mode="selected_modules").is_gradient_checkpointing
    assert not _load(tiny_model_dir).is_gradient_checkpointing


def test_compile_model_compiles_each_decoder_layer_in_place(tiny_model_dir):
    # Compilation itself happens at the first forward (about 170 s on this CPU, then 1.5x faster steps with the same
    # losses: BENCHMARKS.md); here: every decoder layer is wrapped, and the checkpoint's names do not change.
    plain, compiled = _load(tiny_model_dir), _load(tiny_model_dir, compile_model=True)
    layers = [m for m in compiled.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert len(layers) == compiled.config.num_hidden_layers and all(m._compiled_call_impl for m in layers)
    assert not any(m._compiled_call_impl for m in plain.modules())
    assert list(compiled.state_dict()) == list(plain.state_dict())
