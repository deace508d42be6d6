"""``--dry_run``: the memory model against measured peaks, DeepSpeed's estimator, and dry runs of every shipped script
and recipe (offline, no weights opened, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from open_instruct.config import settings_of
from open_instruct.config.cli import parse_args
from open_instruct.engine.deepspeed import DeepSpeedEngine
from open_instruct.plan import memory
from open_instruct.plan.check import plan_of
from open_instruct.plan.model_config import resolve_model_config, shape_of
from tests.conftest import ROOT, cli_env
from tests.plan_measure import measured_vs_planned

SCRIPTS = {  # launch script -> the environment it needs for a plan
    "tulu3/dpo_8b.sh": {"NUM_NODES": "4"},
    "tulu3/dpo_70b.sh": {"NUM_NODES": "16"},
    "olmo2/dpo_7b.sh": {},
    "olmo2/dpo_13b.sh": {"NUM_NODES": "2"},
    "debug/dpo.sh": {},
    "slurm/dpo_8b.sbatch": {"SLURM_NNODES": "4"},
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_opened: list[str] = []
_recording = [False]  # the hook stays for the session (audit hooks cannot be removed): record only when asked


def _audit(event: str, args: tuple) -> None:
    if _recording[0] and event == "open" and isinstance(args[0], str | Path):
        _opened.append(str(args[0]))


sys.addaudithook(_audit)


# --- the memory model against the measured peak of live tensor bytes ---------------------------------------------
@pytest.fixture(scope="module")
def long_pairs(tmp_path_factory) -> Path:
    """32 pairs whose replies are longer than 48 tokens: every sequence is cut to --max_seq_length, the plan's worst
    case, so the measured step is the planned one."""
    rows = []
    for s in range(32):
        prompt = [{"role": "user", "content": f"count up from {s} to {s + 59}"}]
        up = " ".join(str(n) for n in range(s, s + 60))
        down = " ".join(str(n) for n in range(s + 60, s, -1))
        rows.append(
            {
                "chosen": prompt + [{"role": "assistant", "content": up}],
                "rejected": prompt + [{"role": "assistant", "content": down}],
            }
        )
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [["--packing", "false"], ["--packing", "true", "--gradient_checkpointing"]],
    ids=["padded", "packed-checkpointing"],
)
def test_predicted_peak_matches_measured_one_process(tiny_model_dir, long_pairs, tmp_path, extra):
    measured_vs_planned(tiny_model_dir, long_pairs, tmp_path, extra, nproc=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--zero_stage", "2", "--packing", "true"],
        ["--zero_stage", "3", "--packing", "false", "--gradient_checkpointing"],
    ],
    ids=["zero2-packed", "zero3-padded-checkpointing"],
)
def test_predicted_peak_matches_measured_two_processes(tiny_model_dir, long_pairs, tmp_path, extra):
    measured_vs_planned(tiny_model_dir, long_pairs, tmp_path, extra, nproc=2)


# --- model states against DeepSpeed's estimator ------------------------------------------------------------------
def test_parameter_count_is_the_models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config, _ = resolve_model_config(str(tiny_model_dir))
    assert shape_of(config).parameters() == sum(p.numel() for p in model.parameters())
    assert shape_of(config).largest_module_params() == max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
    )
    tulu, _ = resolve_model_config("allenai/Llama-3.1-Tulu-3-8B-SFT")
    assert shape_of(tulu).parameters() == 8_030_261_248  # the model card's count


@pytest.mark.parametrize("offload", ["none", "optimizer", "both"])
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("nodes", [1, 4])
def test_model_states_equal_deepspeeds_estimator(stage, offload, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 2 and offload == "both":
        pytest.skip("parameter offload is ZeRO-3 only")
    flags = ["--model_name_or_path", "m", "--mixer_list", "d.jsonl", "1.0", "--zero_stage", str(stage)]
    flags += ["--offload_optimizer"] * (offload != "none") + ["--offload_param"] * (offload == "both")
    args = parse_args([*flags, "--mixed_precision", "bf16"])
    gpus = 8 * nodes
    layout = DeepSpeedEngine.from_settings(settings_of(args).engine, {"WORLD_SIZE": str(gpus)}).state_layout(4096)
    config, _ = resolve_model_config("allenai/Llama-3.1-Tulu-3-8B-SFT")
    shape = shape_of(config)
    states = memory.model_states(shape, layout, memory.Workload(tokens=1, reference_tokens=1, chunk=1))
    ours = states["parameters"] + states["gradients"] + states["optimizer states"] + states["gathered weights"]
    p = shape.parameters()
    if stage == 2:
        _, theirs = estimate_zero2_model_states_mem_needs(p, 8, nodes, cpu_offload=offload != "none")
    else:
        _, theirs, _ = estimate_zero3_model_states_mem_needs(
            p, shape.largest_module_params(), 8, nodes, offload != "none", offload == "both"
        )
        if offload == "none":  # documented in plan/memory.py: the 16-bit gradient partition DeepSpeed leaves out
            theirs += 2 * p / gpus
    assert ours == pytest.approx(theirs, abs=2)


# --- dry runs of what we ship -------------------------------------------------------------------------------------
# Written meanwhile by others: git's own store (other git commands), and the prepared-data cache that tests running
# in parallel in this checkout fill (their runs use the default --dataset_local_cache_dir); the plan gets its own.
_NOT_OURS = (".git", "local_dataset_cache")


def _tree(root: Path) -> set[str]:
    """Every path under the checkout but what other processes may write there meanwhile."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.relative_to(root).parts[0] not in _NOT_OURS}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_launch_script_plans_offline(script, tmp_path):
    env = {k: v for k, v in cli_env(tmp_path / "ref").items() if k not in ("NUM_NODES", "GPUS_PER_NODE", "MODEL")}
    env.update(
        {"PLAN": "1", "OUTPUT_DIR": str(tmp_path / "out"), "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    )
    env["HF_TOKEN"] = "hf_plan_only"  # the reproductions push by default: their plan checks a token is there
    env.update(SCRIPTS[script])
    before = _tree(ROOT)
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "train" / script),
            "--dry_run_num_pairs",
            "1000",
            "--dataset_local_cache_dir",
            str(tmp_path / "data_cache"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "needs " in done.stdout and "GiB of" in done.stdout and "x H100-80GB" in done.stdout
    assert _tree(ROOT) == before
    assert not any((tmp_path / name).exists() for name in ("out", "ref", "data_cache"))


def _demo_folder(root: Path, model_dir: Path, data: Path) -> None:
    """A demo folder whose model is its config.json alone: any attempt to load weights fails."""
    (root / ".demo" / "model").mkdir(parents=True)
    (root / ".demo" / "model" / "config.json").write_text((model_dir / "config.json").read_text())
    (root / ".demo" / "data").mkdir()
    (root / ".demo" / "data" / "train.jsonl").write_text(data.read_text())


def test_cpu_demo_script_plans_from_a_config_only_folder(tiny_model_dir, synthetic_data, tmp_path):
    _demo_folder(tmp_path, tiny_model_dir, synthetic_data[0])
    env = {**cli_env(tmp_path / "ref"), "PLAN": "1", "DEMO_DIR": str(tmp_path / ".demo")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    before = _tree(tmp_path)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "train" / "debug" / "dpo_cpu.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "256 pairs: 48 optimizer steps" in done.stdout  # 256 pairs / 16 per step x 3 epochs
    assert _tree(tmp_path) == before


RECIPES = sorted((ROOT / "configs" / "train_configs").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_yaml_recipe_plans_without_weights_or_writes(
    recipe, tiny_model_dir, synthetic_data, tmp_path, monkeypatch, capsys
):
    from open_instruct import dpo_tune_cache

    _demo_folder(tmp_path, tiny_model_dir, synthetic_data[0])
    monkeypatch.chdir(tmp_path)  # the recipes' relative output and cache folders land here, if anything is written
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("REFERENCE_LOGPROBS_CACHE_PATH", str(tmp_path / "ref"))
    before = _tree(tmp_path)
    _opened.clear()
    _recording[0] = True
    try:
        dpo_tune_cache.main([str(recipe), "--dry_run", "--dry_run_gpu", "H100-80GB", "--dry_run_num_pairs", "100"])
    finally:
        _recording[0] = False
    printed = capsys.readouterr().out
    assert "memory per GPU" in printed and "GiB of" in printed
    assert any(p.endswith("config.json") for p in _opened)  # the hook sees the model config being read
    assert not [p for p in _opened if p.endswith(WEIGHT_SUFFIXES)]
    assert _tree(tmp_path) == before


def test_bad_value_is_one_error_line_in_a_dry_run(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "open_instruct.dpo_tune_cache",
            str(ROOT / "configs/train_configs/tulu3/dpo_8b.yaml"),
            "--dry_run",
            "--per_device_train_batch_size",
            "0",
        ],
        env=cli_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "--per_device_train_batch_size must be >= 1" in lines[-1]


def test_a_run_that_does_not_fit_gets_changes_that_do(capsys, monkeypatch, tmp_path):
    from open_instruct import dpo_tune_cache

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags = [str(ROOT / "configs/train_configs/tulu3/dpo_70b.yaml"), "--dry_run", "--dry_run_gpu", "H100-80GB"]
    flags += ["--dry_run_num_processes", "8", "--zero_stage", "2", "--mixed_precision", "bf16"]
    dpo_tune_cache.main(flags)
    printed = capsys.readouterr().out
    assert "DOES NOT FIT" in printed
    words = "--zero_stage 3 --offload_optimizer --offload_param"
    change = next(line for line in printed.splitlines() if line.strip().startswith(words))
    # The suggested figure is the plan of that change.
    replanned = plan_of(settings_of(parse_args([*flags, *words.split()])), "dpo", None, []).peak
    assert change.split()[-3] == f"{replanned / 2**30:.1f}" and change.endswith("fits")


def test_python_api_plans_without_writing(tiny_model_dir, synthetic_data, tmp_path, capsys):
    from open_instruct.api import PreferenceDatasetConfig, TrainingConfig, run_dpo

    out = tmp_path / "out"
    plan = run_dpo(
        str(tiny_model_dir),
        TrainingConfig(output_dir=str(out)),
        preference_config=PreferenceDatasetConfig(dataset_name=str(synthetic_data[0])),
        dry_run=True,
    )
    assert plan.shape.hidden == 64 and plan.recipe["examples"] == 256
    assert "memory per GPU" in capsys.readouterr().out and not out.exists()


def test_planning_flags_need_dry_run(tmp_path):
    from open_instruct.config import validate
    from open_instruct.errors import UserError

    args = parse_args(["--model_name_or_path", "m", "--mixer_list", "d.jsonl", "1.0", "--dry_run_num_nodes", "2"])
    with pytest.raises(UserError, match="--dry_run_num_nodes needs --dry_run"):
        validate(args)


def test_sft_entry_plans_without_writing(tiny_model_dir, synthetic_data, tmp_path, capsys):
    from open_instruct import finetune

    out = tmp_path / "sft"
    finetune.main(
        ["--model_name_or_path", str(tiny_model_dir), "--mixer_list", str(synthetic_data[0]), "1.0"]
        + ["--output_dir", str(out), "--per_device_train_batch_size", "8", "--dry_run"]
    )
    printed = capsys.readouterr().out
    assert "plan (sft)" in printed and "global batch 8 conversations" in printed and "256 conversations" in printed
    assert not out.exists()


def test_pretraining_refuses_dry_run_instead_of_ignoring_it():
    from open_instruct.errors import UserError
    from open_instruct.pretrain import check_pretrain_arguments

    args = parse_args(["--tokenizer_name_or_path", "t", "--mixer_list", "d.jsonl", "1.0", "--dry_run"])
    with pytest.raises(UserError, match="--dry_run is not supported for pretraining"):
        check_pretrain_arguments(args)


def test_planning_page_table_is_what_the_script_prints(monkeypatch, capsys):
    import importlib.util

    monkeypatch.chdir(ROOT)  # the script changes to the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("plan_table", ROOT / "scripts" / "plan" / "plan_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| Tulu 3")]
    assert len(rows) == 18
    page = (ROOT / "docs" / "planning.md").read_text()
    assert all(row in page for row in rows)


def test_dry_run_mfu_scales_the_predicted_time(monkeypatch, tmp_path):
    """--dry_run_mfu is the utilisation the time estimate assumes: twice the MFU, half the step time."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags = [str(ROOT / "configs/train_configs/tulu3/dpo_8b.yaml"), "--dry_run", "--dry_run_gpu", "H100-80GB"]
    flags += ["--dry_run_num_processes", "8", "--dry_run_num_pairs", "1000"]
    slow = plan_of(settings_of(parse_args([*flags, "--dry_run_mfu", "0.2"])), "dpo", None, []).time
    fast = plan_of(settings_of(parse_args([*flags, "--dry_run_mfu", "0.4"])), "dpo", None, []).time
    assert (slow.mfu, fast.mfu, fast.mfu_source) == (0.2, 0.4, "--dry_run_mfu")
    assert fast.step_seconds == pytest.approx(slow.step_seconds / 2, rel=1e-9)
