"""DeepSpeed ZeRO on CPU with real multi-process launches (gloo), checked against a single-process run.

The single-process baseline trains with the same global batch (8 pairs per step) as the 2-process runs, so with the
seedable sampler every optimizer step sees the same pairs. Each launch prints its wall time at the end of the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from open_instruct.config import TrainArguments
from open_instruct.engine import accelerator_options
from open_instruct.engine.deepspeed import SHIPPED_CONFIGS, build_deepspeed_config, resolve_deepspeed_config
from open_instruct.errors import UserError
from open_instruct.settings import EngineSettings
from tests.conftest import ROOT, cli_env, free_port, read_metrics, small_run_args, torchrun_command

TIMINGS: dict[str, float] = {}
# lr 1e-3 on the tiny model over 8 steps; clipping at 0.5 engages (checked below), so a dropped setting would show.
# One reference batch size everywhere, so every rank's reference batches are the single process's batches: same padding,
# same float sums. (With other sizes the padded length differs and the summed log-probs, about -20, differ by 1 ulp.)
RUN = {"learning_rate": "1e-3", "max_grad_norm": "0.5", "reference_batch_size": "8", "mixer_list": None}


def _env(cache: Path) -> dict[str, str]:
    return {**cli_env(cache), "DS_ACCELERATOR": "cpu", "ACCELERATE_LOG_LEVEL": "error"}


def _flags(model: Path, train: Path, out: Path, **overrides) -> list[str]:
    return small_run_args(model, train, out, **{**RUN, "mixer_list": [str(train), "64"], **overrides})


def _run(name: str, commands: list[list[str]], env: dict[str, str], timeout: int = 420) -> None:
    """Start the commands together (one per 'machine'), wait for all, fail with their output."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    TIMINGS[name] = time.perf_counter() - start
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"{name} failed:\n{out[-6000:]}"


def _cache_table(cache_dir: Path) -> torch.Tensor:
    (path,) = cache_dir.glob("*.pt")
    return torch.load(path, weights_only=True)["table"]


def _losses(out: Path) -> list[float]:
    return [row["train_loss"] for row in read_metrics(out)]


@pytest.fixture(scope="module", autouse=True)
def report_timings(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter and capture and TIMINGS:
        with capture.global_and_fixture_disabled():  # shown even when the tests pass
            reporter.write_line(
                "\ndistributed test launches: "
                + ", ".join(f"{k} {v:.0f}s" for k, v in TIMINGS.items())
                + f" (total {sum(TIMINGS.values()):.0f}s)"
            )


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, synthetic_data, tmp_path_factory) -> Path:
    """Single process, 8 pairs per step, 8 steps."""
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "out"
    flags = _flags(tiny_model_dir, synthetic_data[0], out, per_device_train_batch_size="8")
    _run("single-process", [[sys.executable, "-m", "open_instruct.dpo_tune_cache", *flags]], _env(tmp / "cache"))
    return tmp


def _check_against_baseline(run_dir: Path, baseline: Path, cache_atol: float = 1e-6) -> None:
    ref, got = _cache_table(baseline / "cache"), _cache_table(run_dir / "cache")
    assert got.shape == ref.shape == (64, 6) and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=cache_atol)
    expected, losses = _losses(baseline / "out"), _losses(run_dir / "out")
    assert len(losses) == len(expected) == 8
    assert max(abs(a - b) for a, b in zip(losses, expected)) < 1e-4, (losses, expected)
    assert len(set(round(x, 4) for x in losses)) > 4  # the loss moves: a run that did not train cannot pass
    config = json.loads((run_dir / "out" / "run_config.json").read_text())
    assert config["global_batch_size"] == 8 and config["world_size"] == 2 and config["total_optimizer_steps"] == 8


@pytest.mark.slow
def test_zero2_two_machines_on_loopback(tiny_model_dir, synthetic_data, baseline, tmp_path):
    """accelerate launch --num_machines 2 (one process each, machine_rank 0 and 1) with the shipped ZeRO-2 config."""
    out = tmp_path / "out"
    port = free_port()
    flags = _flags(tiny_model_dir, synthetic_data[0], out, per_device_train_batch_size="4")
    commands = [
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_machines",
            "2",
            "--machine_rank",
            str(rank),
            "--num_processes",
            "2",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--use_deepspeed",
            "--deepspeed_config_file",
            "configs/ds_configs/stage2_no_offloading_accelerate.conf",
            "--deepspeed_multinode_launcher",
            "standard",
            "open_instruct/dpo_tune_cache.py",
            *flags,
        ]
        for rank in (0, 1)
    ]
    _run("zero2 2 machines", commands, _env(tmp_path / "cache"))
    _check_against_baseline(tmp_path, baseline)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).lm_head.weight.shape[0] > 0


@pytest.mark.slow
def test_zero3_with_accumulation_matches_and_saves_full_model(tiny_model_dir, synthetic_data, baseline, tmp_path):
    """torchrun, 2 processes, --zero_stage 3, 2 pairs x 2 accumulation steps per process (global batch 8), each
    micro-batch in up to 2 forward passes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    flags = _flags(
        tiny_model_dir,
        synthetic_data[0],
        out,
        per_device_train_batch_size="2",
        gradient_accumulation_steps="2",
        zero_stage="3",
        logprob_chunk_size="8",  # several chunks, a different number per rank: one head gather per call (issue 15)
        max_tokens_per_forward="40",  # a pair is about 27 tokens (prompt shared): 2 passes per micro-batch
    )
    command = torchrun_command(flags)
    _run("zero3 torchrun", [command], _env(tmp_path / "cache"))
    # Chunks of 8 rows multiply in another blocking than the baseline's one chunk: 1-2 ulp on sums of about -20.
    _check_against_baseline(tmp_path, baseline, cache_atol=4e-6)

    # The final checkpoint is a whole Hugging Face model (not a shard) holding the trained weights.
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    trained = load_file(baseline / "out" / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert set(saved) >= set(trained) == set(initial)
    for name, weight in trained.items():
        assert saved[name].shape == weight.shape, name
        moved = (weight - initial[name]).abs().max().item()
        off = (saved[name] - weight).abs().max().item()
        assert off <= max(2e-4, 0.02 * moved), f"{name}: {off} away from the trained weights (update {moved})"
    assert max((trained[n] - initial[n]).abs().max().item() for n in trained) > 1e-3


@pytest.mark.slow
def test_plain_data_parallel_on_cpu_matches(tiny_model_dir, synthetic_data, baseline, tmp_path):
    """No DeepSpeed: 2 processes under torchrun are one data-parallel job (gloo), not two runs training alone."""
    flags = _flags(
        tiny_model_dir,
        synthetic_data[0],
        tmp_path / "out",
        per_device_train_batch_size="2",
        gradient_accumulation_steps="2",
    )
    command = torchrun_command(flags)
    _run("ddp torchrun", [command], _env(tmp_path / "cache"))
    _check_against_baseline(tmp_path, baseline)


@pytest.mark.slow
def test_zero3_grows_partitioned_embeddings_for_an_added_token(tmp_path, synthetic_data):
    """A model one row short of its tokenizer, loaded partitioned (ZeRO-3 init): the embeddings grow to a multiple of
    8 with the mean row, and the gathered final save holds exactly that (learning rate 0: nothing else changes)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from open_instruct.data.synthetic import write_tiny_model

    vocab = len(AutoTokenizer.from_pretrained(write_tiny_model(tmp_path / "probe", seed=0)))
    model_dir = write_tiny_model(tmp_path / "short", seed=0, vocab_size=vocab - 1)
    initial = load_file(model_dir / "model.safetensors")
    out = tmp_path / "out"
    flags = _flags(
        model_dir,
        synthetic_data[0],
        out,
        per_device_train_batch_size="4",
        learning_rate="0",
        max_train_steps="1",
        zero_stage="3",
    )
    command = torchrun_command(flags)
    _run("zero3 embedding resize", [command], _env(tmp_path / "cache"))
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    rows = -(-vocab // 8) * 8
    assert saved.config.vocab_size == rows
    for name, weight in (
        ("model.embed_tokens.weight", saved.get_input_embeddings().weight),
        ("lm_head.weight", saved.get_output_embeddings().weight),
    ):
        old = initial[name]
        assert weight.shape == (rows, old.shape[1]), name
        torch.testing.assert_close(weight[: vocab - 1], old, rtol=0, atol=0)
        torch.testing.assert_close(weight[vocab - 1 :], old.mean(0).expand(rows - vocab + 1, -1), rtol=1e-6, atol=1e-6)


# --- the config logic, without processes -------------------------------------------------------------------------


def _engine(**kwargs) -> EngineSettings:
    base = {"model_name_or_path": "m", "mixer_list": ["d", "1.0"], "reference_logprobs_cache_path": "unused"}
    return EngineSettings.of(TrainArguments(**{**base, **kwargs}))


@pytest.mark.parametrize("name", sorted(SHIPPED_CONFIGS))
def test_shipped_deepspeed_configs_equal_the_code(name: str):
    on_disk = json.loads((ROOT / "configs" / "ds_configs" / name).read_text())
    assert on_disk == build_deepspeed_config(**SHIPPED_CONFIGS[name])


def test_flags_fill_auto_fields_from_the_recipe():
    config = resolve_deepspeed_config(
        _engine(zero_stage=3, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=1.0),
        env={"WORLD_SIZE": "16"},
    )
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 2 * 4 * 16 and config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # No clipping asked for: none in DeepSpeed either (accelerate's default would be 1.0).
    assert resolve_deepspeed_config(_engine(zero_stage=2), env={})["gradient_clipping"] == 0.0


def test_no_deepspeed_without_flags_or_launcher():
    assert resolve_deepspeed_config(_engine(), env={}) is None


def test_launcher_environment_is_honoured(tmp_path):
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
    }
    config = resolve_deepspeed_config(_engine(), env=env)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(build_deepspeed_config(2)))
    config = resolve_deepspeed_config(
        _engine(), env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    )
    assert config["zero_optimization"]["stage"] == 2


def test_flags_apply_on_top_of_a_config_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(build_deepspeed_config(2)))
    config = resolve_deepspeed_config(_engine(deepspeed_config=str(path), zero_stage=3, offload_param=True), env={})
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        (
            {"train_micro_batch_size_per_gpu": 4},
            {},
            "train_micro_batch_size_per_gpu is 4 but --per_device_train_batch",
        ),
        ({"gradient_accumulation_steps": 8}, {}, "gradient_accumulation_steps is 8 but --gradient_accumulation_steps"),
        ({"train_batch_size": 64}, {}, "train_batch_size is 64 but per-device batch x accumulation x 4 processes"),
        ({"gradient_clipping": 1.0}, {}, "gradient_clipping is 1.0 but --max_grad_norm asks for 0.0"),
        ({"optimizer": {"type": "AdamW"}}, {}, "remove the 'optimizer' section"),
        (
            {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}},
            {},
            "only this rank's shard",
        ),
        (
            {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
            {},
            "offload_param needs ZeRO stage 3",
        ),
        ({"bf16": {"enabled": True}}, {}, "a DeepSpeed config needs a 'zero_optimization' section"),
    ],
)
def test_config_file_that_disagrees_with_the_flags_is_an_error(tmp_path, content, kwargs, message):
    config = {"zero_optimization": {"stage": 2}, **content}
    if "zero_optimization" not in content and "bf16" in content:
        config.pop("zero_optimization")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_deepspeed_config(_engine(deepspeed_config=str(path), **kwargs), env={"WORLD_SIZE": "4"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"offload_param": True, "zero_stage": 2}, "--offload_param needs ZeRO stage 3"),
        ({"offload_optimizer": True, "zero_stage": 0}, "--offload_optimizer needs ZeRO stage 1, 2 or 3"),
        ({"offload_optimizer": True}, "need --zero_stage or --deepspeed_config"),
        ({"deepspeed_config": "/nonexistent/ds.json"}, "DeepSpeed config not found: /nonexistent/ds.json"),
    ],
)
def test_bad_deepspeed_flags_are_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        resolve_deepspeed_config(_engine(**kwargs), env={})


def test_offload_config():
    config = resolve_deepspeed_config(_engine(zero_stage=3, offload_optimizer=True, offload_param=True), env={})
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    # accelerate swaps our torch AdamW for DeepSpeed's CPU Adam unless this is set false: keep its default.
    assert config.get("zero_force_ds_cpu_optimizer", True) is True


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("OPEN_INSTRUCT_TEST_OFFLOAD"),
    reason="set OPEN_INSTRUCT_TEST_OFFLOAD=1: compiles DeepSpeed's CPU Adam on first use (minutes on 2 cores)",
)
def test_zero3_offload_matches(tiny_model_dir, synthetic_data, baseline, tmp_path):
    """ZeRO-3 with optimizer and parameters offloaded to CPU (DeepSpeedCPUAdam), same numbers as the baseline."""
    flags = _flags(
        tiny_model_dir,
        synthetic_data[0],
        tmp_path / "out",
        per_device_train_batch_size="4",
        zero_stage="3",
        offload_optimizer="true",
        offload_param="true",
    )
    command = torchrun_command(flags)
    _run("zero3 offload torchrun", [command], _env(tmp_path / "cache"))
    _check_against_baseline(tmp_path, baseline)


def test_cpu_process_group_settings():
    several = {"WORLD_SIZE": "2"}
    if torch.cuda.is_available():
        pytest.skip("CPU-only settings")
    assert accelerator_options(_engine(), env=several) == {"deepspeed_plugin": None, "cpu": True, "backend": None}
    options = accelerator_options(_engine(zero_stage=2), env=several)
    assert options["backend"] == "gloo" and options["cpu"] is False and options["deepspeed_plugin"] is not None


def test_launcher_accumulation_or_clipping_that_disagrees_is_an_error():
    with pytest.raises(UserError, match="--gradient_accumulation_steps 4 disagrees"):
        accelerator_options(
            _engine(gradient_accumulation_steps=2), env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}
        )
    with pytest.raises(UserError, match="--gradient_clipping 1.0 disagrees"):
        accelerator_options(_engine(), env={"ACCELERATE_GRADIENT_CLIPPING": "1.0"})
    accelerator_options(
        _engine(gradient_accumulation_steps=4, max_grad_norm=1.0),
        env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4", "ACCELERATE_GRADIENT_CLIPPING": "1.0"},
    )
