"""FSDP2 (``fully_shard``) as the second engine: selection, conflicts, the engine line, and real 2-process CPU runs
(gloo) checked step by step against the single-process baseline of ``test_distributed``.

The slow launches: FSDP2 2 shards x 1 replica with accumulation and checkpoints (torchrun), its rerun from step_4
after both processes are killed mid-checkpoint, and HSDP 1 shard x 2 replicas through ``accelerate launch
--config_file configs/accelerate_configs/fsdp2.yaml``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from open_instruct.config import TrainArguments
from open_instruct.engine import Engine, select_engine
from open_instruct.engine.deepspeed import DeepSpeedEngine
from open_instruct.engine.fsdp2 import Fsdp2Engine, mesh_shape
from open_instruct.errors import UserError
from open_instruct.settings import EngineSettings
from open_instruct.training.checkpointing import COMPLETED
from tests.conftest import ROOT, cli_env, free_port, read_metrics, torchrun_command
from tests.runs.test_distributed import TIMINGS, _cache_table, _env, _flags, baseline, report_timings  # noqa: F401


def _engine(**kwargs) -> EngineSettings:
    base = {"model_name_or_path": "m", "mixer_list": ["d", "1.0"], "reference_logprobs_cache_path": "unused"}
    return EngineSettings.of(TrainArguments(**{**base, **kwargs}))


# --- selection, layout, conflicts, the engine line (no processes) ------------------------------------------------


def test_fsdp_flag_selects_fsdp2_over_all_processes():
    engine = select_engine(_engine(fsdp=True, mixed_precision="bf16"), env={"WORLD_SIZE": "4"})
    assert isinstance(engine, Fsdp2Engine)
    assert (engine.layout.shards, engine.layout.replicas) == (4, 1)
    assert engine.describe() == (
        "engine: fsdp2, 4 shards x 1 replica, per decoder layer, mixed precision bf16 params / fp32 reduce, "
        "no offload, distributed checkpoints"
    )


def test_hsdp_degrees_offload_and_checkpointing_in_the_engine_line():
    engine = select_engine(
        _engine(fsdp_shard_degree=2, fsdp_offload_params=True, gradient_checkpointing=True), env={"WORLD_SIZE": "8"}
    )
    assert isinstance(engine, Fsdp2Engine) and (engine.layout.shards, engine.layout.replicas) == (2, 4)
    assert engine.describe() == (
        "engine: fsdp2, 2 shards x 4 replicas (HSDP), per decoder layer, fp32 params / fp32 reduce, "
        "params+gradients+optimizer offloaded to CPU, activation checkpointing, distributed checkpoints"
    )
    plugin = engine.plugin()
    assert plugin.fsdp_version == 2 and type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
    assert plugin.activation_checkpointing is False  # the model's own checkpointing already runs: not twice
    # open-instruct's ways of asking for it reach the engine line too (the model checkpoints every layer then)
    for asked in ({"activation_memory_budget": 0.5}, {"activation_checkpointing_mode": "selected_modules"}):
        assert select_engine(_engine(fsdp=True, **asked), env={"WORLD_SIZE": "2"}).layout.gradient_checkpointing
    assert not select_engine(_engine(fsdp=True), env={"WORLD_SIZE": "2"}).layout.gradient_checkpointing


@pytest.mark.parametrize(
    ("shards", "replicas", "world", "expected"),
    [(None, None, 8, (8, 1)), (4, None, 8, (4, 2)), (None, 2, 8, (4, 2)), (1, 2, 2, (1, 2)), (2, 1, 2, (2, 1))],
)
def test_mesh_shape(shards, replicas, world, expected):
    assert mesh_shape(shards, replicas, world) == expected


@pytest.mark.parametrize(
    ("shards", "replicas", "world", "message"),
    [
        (3, None, 8, "--fsdp_shard_degree 3 does not divide the 8 processes"),
        (None, 3, 8, "--fsdp_num_replicas 3 does not divide the 8 processes"),
        (2, 2, 8, "--fsdp_shard_degree 2 x --fsdp_num_replicas 2 = 4 processes, but the run has 8"),
        (0, None, 8, "--fsdp_shard_degree must be >= 1, got 0"),
    ],
)
def test_degrees_that_do_not_fit_the_world_are_errors(shards, replicas, world, message):
    with pytest.raises(UserError, match=message.replace("+", r"\+")):
        select_engine(_engine(fsdp_shard_degree=shards, fsdp_num_replicas=replicas), env={"WORLD_SIZE": str(world)})


@pytest.mark.parametrize(
    ("kwargs", "env", "message"),
    [
        ({"fsdp": True, "zero_stage": 3}, {}, "--fsdp asks for FSDP2 but --zero_stage asks for DeepSpeed"),
        (
            {"fsdp_num_replicas": 2},
            {"ACCELERATE_USE_DEEPSPEED": "true"},
            "--fsdp_num_replicas asks for FSDP2 but accelerate launch --use_deepspeed asks for DeepSpeed",
        ),
        (
            {"deepspeed_config": "ds.json"},
            {"ACCELERATE_USE_FSDP": "true"},
            "accelerate launch --use_fsdp asks for FSDP2 but --deepspeed_config asks for DeepSpeed",
        ),
        (
            {},
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"},
            "FSDP sharding strategy HYBRID_SHARD has no FSDP2 equivalent",
        ),
        (
            {},
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "full_shard"},
            "FSDP2 needs fsdp_reshard_after_forward true or false, got 'full_shard'",
        ),
        (
            {},
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"},
            "FSDP auto wrap policy SIZE_BASED_WRAP is not supported",
        ),
    ],
)
def test_conflicting_engine_choices_are_errors(kwargs, env, message):
    with pytest.raises(UserError, match=message):
        select_engine(_engine(**kwargs), env={"WORLD_SIZE": "2", **env})


def test_launcher_settings_are_read():
    env = {
        "WORLD_SIZE": "2",
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_OFFLOAD_PARAMS": "true",
        "FSDP_ACTIVATION_CHECKPOINTING": "true",
        "FSDP_RESHARD_AFTER_FORWARD": "false",
        "ACCELERATE_MIXED_PRECISION": "bf16",
    }
    layout = select_engine(_engine(), env=env).layout
    assert layout.offload_params and layout.activation_checkpointing and not layout.reshard_after_forward
    assert layout.mixed_precision == "bf16"
    # The launcher's default FSDP version (1) runs as FSDP2, and the engine line says so.
    line = select_engine(
        _engine(), env={"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}
    ).describe()
    assert line.startswith("engine: fsdp2, 2 shards x 1 replica") and "FSDP version 1 runs as FSDP2" in line


def test_engine_line_names_every_engine():
    assert select_engine(_engine(), env={}).describe() == "engine: single process, fp32, no offload"
    ddp = select_engine(_engine(mixed_precision="bf16"), env={"WORLD_SIZE": "2"})
    assert (
        type(ddp) is Engine
        and ddp.describe() == "engine: data parallel (DDP), 2 processes, mixed precision bf16, no offload"
    )
    zero = select_engine(_engine(zero_stage=3, offload_optimizer=True), env={"WORLD_SIZE": "4"})
    assert isinstance(zero, DeepSpeedEngine)
    assert zero.describe() == "engine: deepspeed zero-3, 4 processes, fp32, optimizer offloaded to CPU"
    alone = select_engine(_engine(fsdp=True), env={})
    assert alone.describe().startswith("engine: single process (FSDP2 asked for, but without a launcher")
    one_rank = select_engine(_engine(fsdp=True), env={"WORLD_SIZE": "1", "LOCAL_RANK": "0"})  # torchrun, 1 process
    assert one_rank.describe().startswith("engine: fsdp2, 1 shard x 1 replica, per decoder layer")


def test_the_fsdp_switch_of_the_process_state_ends_with_the_run():
    """On CPU an FSDP2 run switches accelerate's process state, which lives as long as the process, to FSDP; the next
    run in the process (the Python API's next stage, a matrix cell: it crashed with "no attribute is_fsdp2") starts
    from the launcher's type again. The 2-process path: several FSDP2 cells in one launch in tests/runs/test_matrix.py."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    from open_instruct.api import fresh_accelerate_state
    from open_instruct.engine import fsdp2

    existed = bool(PartialState._shared_state)
    try:
        with fresh_accelerate_state():
            before = PartialState(cpu=True).distributed_type
            fsdp2._SWITCHED_FROM.append(before)  # as Fsdp2Engine.build_accelerator records its switch
            PartialState().distributed_type = DistributedType.FSDP
        assert PartialState().distributed_type == before != DistributedType.FSDP
        assert not fsdp2._SWITCHED_FROM
    finally:
        if not existed:
            PartialState._reset_state()


def test_conflict_is_one_error_line_before_any_work(tiny_model_dir, synthetic_data, tmp_path):
    flags = _flags(tiny_model_dir, synthetic_data[0], tmp_path / "out", zero_stage="2")
    result = subprocess.run(
        [sys.executable, "-m", "open_instruct.dpo_tune_cache", *flags, "--fsdp"],
        env=cli_env(tmp_path / "cache"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --fsdp asks for FSDP2 but --zero_stage asks for DeepSpeed; pick one engine"]
    assert not (tmp_path / "out" / "run_config.json").exists()


# --- real launches: 2 CPU processes (gloo) ------------------------------------------------------------------------


def _launch(name: str, command: list[str], env: dict[str, str]) -> str:
    """Run one launcher command to the end; its output (failing with it when the run fails)."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    TIMINGS[name] = time.perf_counter() - start
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{name} failed:\n{output[-6000:]}"
    return output


def _check_against_baseline(run_dir: Path, baseline: Path) -> None:  # noqa: F811 (the fixture imported above)
    """Reference cache equal to the single process's, per-step losses within 1e-4, the same global batch."""
    names = [{p.name for p in (d / "cache").glob("*.pt")} for d in (baseline, run_dir)]
    assert names[0] == names[1] and len(names[0]) == 1  # the same cache key: the engine is not part of it
    ref, got = _cache_table(baseline / "cache"), _cache_table(run_dir / "cache")
    assert got.shape == ref.shape and got.shape[0] == 64 and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    expected, losses = _losses_by_step(baseline / "out"), _losses_by_step(run_dir / "out")
    assert sorted(losses) == sorted(expected) == list(range(1, 9))
    assert max(abs(losses[s] - expected[s]) for s in losses) < 1e-4, (losses, expected)
    assert len({round(x, 4) for x in losses.values()}) > 4  # the loss moves: a run that did not train cannot pass
    config = json.loads((run_dir / "out" / "run_config.json").read_text())
    assert config["global_batch_size"] == 8 and config["world_size"] == 2 and config["total_optimizer_steps"] == 8


def _losses_by_step(out: Path) -> dict[int, float]:
    return {row["training_step"]: row["train_loss"] for row in read_metrics(out)}


def _fsdp_flags(model: Path, train: Path, out: Path) -> list[str]:
    """FSDP2 2 shards x 1 replica, 2 pairs x 2 accumulation per process (global batch 8), checkpoints every 4 steps."""
    return _flags(
        model,
        train,
        out,
        per_device_train_batch_size="2",
        gradient_accumulation_steps="2",
        fsdp_shard_degree="2",
        fsdp_num_replicas="1",
        checkpointing_steps="4",
        keep_last_n_checkpoints="-1",
    )


@pytest.fixture(scope="module")
def fsdp_run(tiny_model_dir, synthetic_data, tmp_path_factory) -> Path:
    """torchrun, 2 processes, FSDP2 2 shards x 1 replica, 2 pairs x 2 accumulation per process, checkpoints at 4, 8."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    flags = _fsdp_flags(tiny_model_dir, synthetic_data[0], tmp / "out")
    output = _launch("fsdp2 2x1 torchrun", torchrun_command(flags), _env(tmp / "cache"))
    line = "engine: fsdp2, 2 shards x 1 replica, per decoder layer, fp32 params / fp32 reduce, no offload"
    assert output.count(line) == 1, output[-3000:]  # printed once, by the main process
    return tmp


@pytest.mark.slow
def test_fsdp2_matches_single_process_and_saves_a_full_model(fsdp_run, baseline, tiny_model_dir):  # noqa: F811
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _check_against_baseline(fsdp_run, baseline)  # per-step losses within 1e-4, reference cache equal
    out = fsdp_run / "out"
    assert (out / "step_8" / "COMPLETED").is_file() and (out / "step_8" / "pytorch_model_fsdp_0").is_dir()
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    trained = load_file(baseline / "out" / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert set(trained) == set(initial) and set(saved) >= set(trained)
    for name, weight in trained.items():
        moved = (weight - initial[name]).abs().max().item()
        off = (saved[name] - weight).abs().max().item()
        assert off <= max(2e-4, 0.02 * moved), f"{name}: {off} away from the trained weights (update {moved})"
    assert max((trained[n] - initial[n]).abs().max().item() for n in trained) > 1e-3


@pytest.mark.slow
def test_fsdp2_killed_mid_checkpoint_resumes_exactly(fsdp_run, tiny_model_dir, synthetic_data, tmp_path):
    """Both processes killed while step_8's distributed checkpoint is written (before its COMPLETED marker): the rerun
    ignores step_8, resumes from step_4 and reproduces steps 5-8 and the final weights of the uninterrupted run."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    flags = _fsdp_flags(tiny_model_dir, synthetic_data[0], out)
    shutil.copytree(fsdp_run / "cache", tmp_path / "cache")  # the reference pass is not what this test is about
    env = {**_env(tmp_path / "cache"), "OPEN_INSTRUCT_TEST_CHECKPOINT_DELAY": "8:600"}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            torchrun_command(flags), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 300
            while not (out / "step_8" / "trainer_state.json").is_file():
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "step_8 was never written"
                time.sleep(0.2)
        finally:  # torchrun and both workers (each in its own session), as a preemption would
            for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                process.send_signal(signal.SIGKILL)
            proc.wait()
    assert (out / "step_4" / COMPLETED).is_file() and not (out / "step_8" / COMPLETED).exists()
    output = _launch("fsdp2 rerun after kill", torchrun_command(flags), _env(tmp_path / "cache"))
    assert f"ignoring incomplete checkpoint {out / 'step_8'}" in output and "resumed at optimizer step 4" in output
    expected, got = _losses_by_step(fsdp_run / "out"), _losses_by_step(out)
    assert sorted(got) == list(range(1, 9))
    assert all(got[s] == pytest.approx(expected[s], abs=1e-6) for s in got), (got, expected)
    before, after = load_file(fsdp_run / "out" / "model.safetensors"), load_file(out / "model.safetensors")
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6


@pytest.mark.slow
def test_hsdp_one_shard_two_replicas_through_accelerate_launch(tiny_model_dir, synthetic_data, baseline, tmp_path):  # noqa: F811
    """accelerate launch with the shipped FSDP2 config and --fsdp_num_replicas 2: pure replication as HSDP."""
    flags = _flags(
        tiny_model_dir,
        synthetic_data[0],
        tmp_path / "out",
        per_device_train_batch_size="2",
        gradient_accumulation_steps="2",
        fsdp_num_replicas="2",
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate_configs/fsdp2.yaml",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "open_instruct/dpo_tune_cache.py",
        *flags,
    ]
    output = _launch("hsdp 1x2 accelerate launch", command, _env(tmp_path / "cache"))
    assert "engine: fsdp2, 1 shard x 2 replicas, per decoder layer" in output
    _check_against_baseline(tmp_path, baseline)
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["fsdp_num_replicas"] == 2


# --- the shipped accelerate config and the launch scripts' ENGINE option -----------------------------------------


def test_fsdp2_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate_configs" / "fsdp2.yaml"))
    assert config.distributed_type == "FSDP"
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_launch_scripts_engine_option():
    import shlex

    def dry_run(**env: str) -> subprocess.CompletedProcess:
        script = ROOT / "scripts" / "train" / "olmo2" / "dpo_7b.sh"
        full_env = {**os.environ, "DRY_RUN": "1", "NUM_NODES": "2", "GPUS_PER_NODE": "8", **env}
        return subprocess.run(["bash", str(script)], env=full_env, capture_output=True, text=True, timeout=60)

    launcher = shlex.split(dry_run(ENGINE="fsdp2").stdout)
    launcher = launcher[: launcher.index("open_instruct/dpo_tune_cache.py")]
    assert launcher[-2:] == ["--config_file", "configs/accelerate_configs/fsdp2.yaml"]
    assert "--use_deepspeed" not in launcher and "--num_processes" in launcher
    assert "--use_deepspeed" in dry_run().stdout  # the default stays DeepSpeed
    bad = dry_run(ENGINE="megatron")
    assert bad.returncode == 2 and "error: ENGINE must be deepspeed or fsdp2, got 'megatron'" in bad.stderr
