"""Launch scripts and YAML recipes: valid bash, every flag accepted by our parser, scripts and YAMLs in agreement.

A renamed or removed flag breaks these tests instead of silently breaking a cluster job.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from open_instruct.config import validate
from open_instruct.config.cli import build_parser, parse_args

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (ROOT / "scripts" / "train").rglob("*") if p.suffix in (".sh", ".sbatch"))
RECIPES = sorted((ROOT / "configs" / "train_configs").rglob("*.yaml"))
ENTRY = "open_instruct/dpo_tune_cache.py"
# Scripts whose DRY_RUN has no side effects, with the environment their YAML twin assumes.
DRY_RUN_SCRIPTS = {
    "tulu3/dpo_8b.sh": ("tulu3/dpo_8b.yaml", {"NUM_NODES": "4", "GPUS_PER_NODE": "8"}),
    "tulu3/dpo_70b.sh": ("tulu3/dpo_70b.yaml", {"NUM_NODES": "16", "GPUS_PER_NODE": "8"}),
    "olmo2/dpo_7b.sh": ("olmo2/dpo_7b.yaml", {"NUM_NODES": "1", "GPUS_PER_NODE": "8"}),
    "olmo2/dpo_13b.sh": ("olmo2/dpo_13b.yaml", {"NUM_NODES": "2", "GPUS_PER_NODE": "8"}),
    "debug/dpo.sh": ("debug/dpo.yaml", {}),
}


def recipe_tokens(script: Path) -> list[str]:
    """The recipe's flags as written in the script (after ``dpo_tune_cache.py`` or ``launch_dpo``), unexpanded."""
    text = script.read_text().replace("\\\n", " ")
    tokens = shlex.split(text, comments=True)
    for i, token in enumerate(tokens):
        if token == ENTRY or token == "launch_dpo":
            flags = []
            for t in tokens[i + 1 :]:
                if t.startswith("$@"):
                    break
                flags.append(t)
            return flags
    return []


def run_dry(script: str, **env: str) -> subprocess.CompletedProcess:
    """A script run with DRY_RUN=1 (it prints its command), the launch variables of this shell left out."""
    launcher_vars = (
        *("NUM_NODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "OUTPUT_DIR", "MODEL"),
        "PUSH_TO_HUB",
    )
    full_env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    full_env.update({"DRY_RUN": "1", **env})
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "train" / script)], env=full_env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out


def dry_run(script: str, **env: str) -> tuple[list[str], list[str]]:
    """(launcher arguments, recipe flags) of the command a script prints with DRY_RUN=1."""
    command = shlex.split(run_dry(script, **env).stdout)
    split = command.index(ENTRY)
    return command[:split], command[split + 1 :]


def test_scripts_found():
    names = {str(p.relative_to(ROOT / "scripts" / "train")) for p in SCRIPTS}
    assert set(DRY_RUN_SCRIPTS) | {"debug/dpo_cpu.sh", "launch.sh", "slurm/dpo_8b.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_bash_syntax(script: Path):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_name_in_every_script_is_ours(script: Path):
    known = {s for action in build_parser()._actions for s in action.option_strings}
    names = [t for t in recipe_tokens(script) if t.startswith("--")]
    if script.name not in ("launch.sh", "dpo_8b.sbatch"):  # the library and the SLURM wrapper pass no recipe flags
        assert len(names) >= 10, f"no recipe flags found in {script}"
    unknown = [n for n in names if n not in known]
    assert not unknown, f"{script.name}: flags our parser does not know: {unknown}"


def test_cpu_demo_script_parses_fully():
    """dpo_cpu.sh builds data before its dry run, so its flags are read from the file (all values are literal)."""
    tokens = [
        t.replace("$DEMO_DIR", ".demo").replace("$OUTPUT_DIR", ".demo/output")
        for t in recipe_tokens(ROOT / "scripts" / "train" / "debug" / "dpo_cpu.sh")
    ]
    args = parse_args(tokens)
    validate(args)
    assert args == parse_args([str(ROOT / "configs" / "train_configs" / "debug" / "dpo_cpu.yaml")])


@pytest.mark.parametrize("script", sorted(DRY_RUN_SCRIPTS))
def test_dry_run_command_parses_and_matches_yaml(script: str):
    from accelerate.commands.launch import launch_command_parser

    yaml_name, env = DRY_RUN_SCRIPTS[script]
    # Where the model goes is the launch's choice, not the recipe's: the YAML twin holds what is trained, so the
    # comparison is with the Hub push off (test_reproductions_push_unless_told_not_to: the push adds one flag only).
    launcher, flags = dry_run(script, **env, PUSH_TO_HUB="0")
    assert launcher[:2] == ["accelerate", "launch"]
    launch = launch_command_parser().parse_args(launcher[2:] + [ENTRY] + flags)
    args = parse_args(flags)
    validate(args)
    if launch.use_deepspeed:
        assert (ROOT / launch.deepspeed_config_file).is_file()
    expected = parse_args([str(ROOT / "configs" / "train_configs" / yaml_name)])
    differ = [f.name for f in dataclasses.fields(args) if getattr(args, f.name) != getattr(expected, f.name)]
    assert not differ, f"{script} and {yaml_name} disagree on {differ}"


@pytest.mark.parametrize("nodes", ["1", "2", "4", "16"])
@pytest.mark.parametrize("script", ["tulu3/dpo_8b.sh", "tulu3/dpo_70b.sh", "olmo2/dpo_7b.sh", "olmo2/dpo_13b.sh"])
def test_global_batch_is_128_on_any_node_count(script: str, nodes: str):
    launcher, flags = dry_run(
        script, NUM_NODES=nodes, NODE_RANK=str(int(nodes) - 1), MASTER_ADDR="10.0.0.1", GPUS_PER_NODE="8"
    )
    launch = dict(zip(launcher[2::2], launcher[3::2], strict=False))
    args = parse_args(flags)
    processes = int(launch["--num_processes"])
    assert processes == 8 * int(nodes)
    assert launch["--machine_rank"] == str(int(nodes) - 1) and launch["--main_process_ip"] == "10.0.0.1"
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * processes == 128


REPRODUCTIONS = ["tulu3/dpo_8b.sh", "tulu3/dpo_70b.sh", "olmo2/dpo_7b.sh", "olmo2/dpo_13b.sh"]


def header_fields(script: str) -> dict[str, str]:
    """The ``#   name  value`` lines of a reproduction script's header, by name."""
    fields = {}
    for line in (ROOT / "scripts" / "train" / script).read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        words = line[1:].split(maxsplit=1)
        if len(words) == 2 and line.startswith("#   ") and not line.startswith("#    "):
            fields[words[0]] = words[1]
    return fields


@pytest.mark.parametrize("script", REPRODUCTIONS)
def test_reproduction_header_states_what_the_command_runs(script: str):
    """The header's model, data, batch, learning rate, epochs and seed are the ones the printed command passes."""
    yaml_name, env = DRY_RUN_SCRIPTS[script]
    launcher, flags = dry_run(script, **env)
    args = parse_args(flags)
    launch = dict(zip(launcher[2::2], launcher[3::2], strict=False))
    header = header_fields(script)
    assert header["model"].startswith(args.model_name_or_path + ",")
    assert header["data"].startswith(f"{args.mixer_list[0]}, all of it, {args.max_seq_length} tokens")
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * int(launch["--num_processes"])
    assert header["batch"].startswith(
        f"global {global_batch} pairs: {args.per_device_train_batch_size} pair per device"
    )
    optimizer = header["optimizer"]
    lr, schedule = optimizer.split(", ")[:2]
    assert float(lr.removeprefix("lr ")) == args.learning_rate and schedule == f"{args.lr_scheduler_type} decay"
    assert (
        f"warmup ratio {args.warmup_ratio:g}, weight decay {args.weight_decay:g}, {args.num_epochs} epoch" in optimizer
    )
    assert optimizer.endswith(f"loss {'+'.join(args.loss_type)}, beta {args.beta:g}")
    assert header["seed"].split()[0] == str(args.seed)
    assert "(" in header["seed"], "the header says where the seed comes from"


@pytest.mark.parametrize("script", REPRODUCTIONS)
def test_reproductions_push_unless_told_not_to(script: str):
    env = DRY_RUN_SCRIPTS[script][1]
    pushed, local = run_dry(script, **env), run_dry(script, **env, PUSH_TO_HUB="0")
    pushed_flags, local_flags = (
        shlex.split(r.stdout)[shlex.split(r.stdout).index(ENTRY) + 1 :] for r in (pushed, local)
    )
    assert pushed_flags == [*local_flags, "--push_to_hub"]  # the default adds the push and nothing else
    assert parse_args(pushed_flags).push_to_hub and not parse_args(local_flags).push_to_hub
    said = [line for line in pushed.stderr.splitlines() if "PUSH_TO_HUB=0" in line]
    assert len(said) == 1 and said[0].endswith("to keep the model local"), pushed.stderr
    assert "PUSH_TO_HUB" not in local.stderr
    assert "PUSH_TO_HUB=0 keeps it local" in (ROOT / "scripts" / "train" / script).read_text()  # the header says so


def test_push_to_hub_takes_0_or_1_only():
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "train" / "tulu3/dpo_8b.sh")],
        env={**os.environ, "DRY_RUN": "1", "PUSH_TO_HUB": "no"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "error: PUSH_TO_HUB must be 0 or 1, got 'no'" in out.stderr and not out.stdout


@pytest.mark.parametrize("script", [p for p in SCRIPTS if "debug" in p.parts], ids=lambda p: p.name)
def test_debug_and_cpu_scripts_stay_offline(script: Path):
    text = script.read_text()
    assert "push_to_hub" not in text and "PUSH_FLAGS" not in text
    if script.name == "dpo.sh":
        out = run_dry("debug/dpo.sh")
        assert "--push_to_hub" not in shlex.split(out.stdout) and "PUSH_TO_HUB" not in out.stderr


def test_indivisible_global_batch_is_an_error():
    with pytest.raises(AssertionError, match=r"not a multiple of 1 per device x 24 processes"):
        dry_run("tulu3/dpo_8b.sh", NUM_NODES="3", GPUS_PER_NODE="8")


def test_extra_flags_override_the_recipe():
    script = ROOT / "scripts" / "train" / "debug" / "dpo.sh"
    out = subprocess.run(
        ["bash", str(script), "--seed", "7"], capture_output=True, text=True, env={**os.environ, "DRY_RUN": "1"}
    )
    flags = shlex.split(out.stdout)[shlex.split(out.stdout).index(ENTRY) + 1 :]
    assert parse_args(flags).seed == 7


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_recipe_parses_and_validates(recipe: Path):
    validate(parse_args([str(recipe)]))


@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_accelerate_configs_load(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate_configs" / name))
    assert config.distributed_type == "DEEPSPEED"
    ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
    assert ds_file.is_file() and f"stage{name[-6]}" in ds_file.name
