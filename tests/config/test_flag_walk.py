"""Every flag of TrainArguments, walked from the dataclass: its effect against a baseline, its rule's error or note line,
or the test that shows it (tests/flag_effects.py says which). A new flag without an entry fails here."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from open_instruct.config import TrainArguments, validate
from open_instruct.config.cli import parse_args
from open_instruct.config.flag_rules import FLAG_RULES
from open_instruct.errors import UserError
from open_instruct.settings import DataSettings, EngineSettings, ModelSettings
from tests.conftest import ROOT, small_run_args
from tests.flag_effects import EFFECTS, Effect, Inert, RuleOnly, TestedIn

FLAGS = [f.name for f in dataclasses.fields(TrainArguments)]


@pytest.fixture(scope="module")
def world(tiny_model_dir, synthetic_data, tmp_path_factory):
    """Paths the flag values name: another model, a tokenizer with another chat template, the data files."""
    from open_instruct.data.chat_templates import CHAT_TEMPLATES
    from open_instruct.data.synthetic import write_tiny_model

    root = tmp_path_factory.mktemp("walk")
    other_tokenizer = shutil.copytree(tiny_model_dir, root / "tok")
    (other_tokenizer / "chat_template.jinja").write_text(CHAT_TEMPLATES["zephyr"])
    train, test = synthetic_data
    return {
        "root": root,
        "OTHER_MODEL": str(write_tiny_model(root / "other_model", seed=1)),
        "OTHER_TOKENIZER": str(other_tokenizer),
        "TRAIN_FILE": str(train),
        "TEST_FILE": str(test),
        "DATA_DIR": str(train.parent),
        "model": tiny_model_dir,
        "train": train,
    }


def _argv(world, tokens, tag: str) -> list[str]:
    out = []
    for token in tokens:
        if token == "OTHER_DIR":
            token = str(world["root"] / f"other-{tag}")
        out.append(world.get(token, token) if token.isupper() else token)
    return out


def _base(world, tag: str) -> list[str]:
    out = world["root"] / f"out-{tag}"
    flags = small_run_args(world["model"], world["train"], out, mixer_list=[str(world["train"]), "32"])
    return [*flags, "--dataset_local_cache_dir", str(world["root"] / "data_cache")]


def _parse(argv: list[str]) -> TrainArguments:
    args = parse_args(argv)
    validate(args)
    return args


# --- probes: what a flag changes, computed with the project's own code ------------------------------------------
def _loss(args: TrainArguments):
    from open_instruct.objectives.combination import combined_loss
    from open_instruct.objectives.losses import PreferenceLogps

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3.0, 5.0, 4.0, 6.0])
    c, r, rc, rr = (-torch.rand(4, generator=g) - 1 for _ in range(4))
    logps = PreferenceLogps(c, r, rc, rr, c / counts, r / counts, counts, counts + 1, False, c / 9, r / 7)
    losses = combined_loss(args.loss_type, args.loss_weights)(logps, args.loss_settings()).losses
    return [round(x, 8) for x in losses.tolist()], args.needs_reference


def _data(args: TrainArguments):
    from open_instruct.data.prepare import prepare_preference_data
    from open_instruct.model.modeling import load_tokenizer
    from open_instruct.training.reference_cache import dataset_fingerprint

    data = prepare_preference_data(DataSettings.of(args), load_tokenizer(ModelSettings.of(args)))
    evaluation = dataset_fingerprint(data.eval_records) if data.eval_records else None
    return dataset_fingerprint(data.records), evaluation, data.statistics["cache"]["path"]


def _model(args: TrainArguments):
    from open_instruct.model.modeling import load_model, load_tokenizer

    settings = ModelSettings.of(args)
    model = load_model(settings, load_tokenizer(settings), log=lambda line: None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = round(float(sum(p.detach().double().sum() for p in model.parameters())), 4)
    peft = getattr(model, "peft_config", None)
    config = model.config
    return (
        trainable,
        weights,
        config._attn_implementation,
        bool(getattr(model, "is_activation_checkpointing", False)),
        config.rms_norm_eps,
        repr(peft),
        repr(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)),
    )


def _batches(args: TrainArguments):
    from open_instruct.data.prepare import prepare_preference_data
    from open_instruct.data.sampler import pair_dataloader
    from open_instruct.model.batch_layout import choose_batch_layout, with_prompt_sharing
    from open_instruct.model.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelSettings.of(args))
    records = prepare_preference_data(DataSettings.of(args), tokenizer).records
    model = load_model(ModelSettings.of(args), tokenizer, log=lambda line: None)
    layout = choose_batch_layout(model, torch.device("cpu"), args.packing, args.group_by_length, False, None)
    layout = with_prompt_sharing(layout, torch.device("cpu"), args.share_prompt)
    loader = pair_dataloader(
        records,
        tokenizer.pad_token_id,
        args.per_device_train_batch_size,
        args.seed if args.data_loader_seed is None else args.data_loader_seed,  # as dpo_tune_cache orders the data
        layout.packing,
        args.max_tokens_per_batch,
        layout.group_by_length,
        share_prompt=layout.share_prompt,
    )
    return [
        sorted((k, tuple(v.shape), int(v.sum())) for k, v in batch.items() if torch.is_tensor(v))
        for batch, _ in zip(loader, range(3), strict=False)
    ]


def _setup(args: TrainArguments):
    from open_instruct.api import fresh_accelerate_state
    from open_instruct.data.prepare import prepare_preference_data
    from open_instruct.data.sampler import pair_dataloader
    from open_instruct.model.modeling import load_model, load_tokenizer
    from open_instruct.training import recipe

    with fresh_accelerate_state():
        accelerator, output_dir = recipe.start_run(args)
        tokenizer = load_tokenizer(ModelSettings.of(args))
        records = prepare_preference_data(DataSettings.of(args), tokenizer).records
        model = load_model(ModelSettings.of(args), tokenizer, log=lambda line: None)
        loader = pair_dataloader(records, tokenizer.pad_token_id, args.per_device_train_batch_size, args.seed, True)
        run = recipe.prepare_training(args, accelerator, model, loader, output_dir, "pairs", "dpo")
        lrs = []
        for _ in range(run.total_steps):
            lrs.append(round(run.scheduler.get_last_lr()[0], 12))
            run.optimizer.step()
            run.scheduler.step()
        groups = [(g["lr"], g["weight_decay"], g.get("fused")) for g in run.optimizer.param_groups]
        return run.total_steps, lrs, groups, run.run_config["global_batch_size"]


def _engine(args: TrainArguments):
    from open_instruct.engine import select_engine

    engine = select_engine(EngineSettings.of(args), env={})
    return type(engine).__name__, engine.describe(), json.dumps(getattr(engine, "config", None), default=str)


def _tokenizer(args: TrainArguments):
    from open_instruct.model.modeling import load_tokenizer

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        tokenizer = load_tokenizer(ModelSettings.of(args))
    return type(tokenizer).__name__, tokenizer.is_fast, err.getvalue()


def _signals(args: TrainArguments):
    from open_instruct.training.preemption import parse_signals

    return parse_signals(args.preemption_signals)


PROBES = {
    "loss": _loss,
    "data": _data,
    "model": _model,
    "batches": _batches,
    "setup": _setup,
    "engine": _engine,
    "tokenizer": _tokenizer,
    "signals": _signals,
}
CHEAP = [f for f in FLAGS if isinstance(EFFECTS.get(f), Effect) and EFFECTS[f].probe != "run"]


def test_every_flag_has_an_entry():
    missing = [f for f in FLAGS if f not in EFFECTS]
    assert not missing, f"flags with no entry in tests/flag_effects.py EFFECTS: {missing}"
    assert not set(EFFECTS) - set(FLAGS), f"EFFECTS names unknown flags: {sorted(set(EFFECTS) - set(FLAGS))}"
    assert not set(FLAG_RULES) - set(FLAGS), f"FLAG_RULES names unknown flags: {sorted(set(FLAG_RULES) - set(FLAGS))}"
    for flag, entry in EFFECTS.items():
        assert isinstance(entry, Effect | TestedIn | RuleOnly | Inert), flag
        if isinstance(entry, Effect):
            assert entry.probe in (*PROBES, "run"), f"{flag}: unknown probe {entry.probe!r}"
        if isinstance(entry, RuleOnly) or (isinstance(entry, TestedIn) and entry.value):
            assert flag in FLAG_RULES, f"{flag}: RuleOnly / a rule value without a FLAG_RULES entry"


@pytest.mark.parametrize("flag", CHEAP)
def test_flag_changes_what_it_should(flag, world):
    entry = EFFECTS[flag]
    probe = PROBES[entry.probe]
    base = _base(world, flag) + _argv(world, entry.context, flag)
    baseline = probe(_parse(base))
    changed = probe(_parse(base + [f"--{flag}", *_argv(world, entry.value, flag)]))
    assert changed != baseline, f"--{flag} {' '.join(entry.value)} did not change the {entry.probe} probe"


@pytest.mark.parametrize("flag", [f for f in FLAGS if isinstance(EFFECTS.get(f), Inert)])
def test_inert_open_instruct_flag_is_named_in_the_note(flag, world, capsys):
    from open_instruct.config.open_instruct_flags import CLUSTER_ONLY, NO_EFFECT_HERE

    assert flag in CLUSTER_ONLY + NO_EFFECT_HERE, f"--{flag}: Inert but not listed as cluster-only or no-effect"
    _parse(_base(world, flag) + [f"--{flag}", *EFFECTS[flag].value])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"--{flag}" in notes[0], notes


@pytest.mark.parametrize("flag", [f for f in FLAGS if isinstance(EFFECTS.get(f), TestedIn)])
def test_the_test_that_shows_the_effect_exists(flag):
    path, name = EFFECTS[flag].test.split("::")
    source = (ROOT / path).read_text()
    functions = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
    assert name in functions, f"--{flag}: {EFFECTS[flag].test} does not exist"
    text = ast.get_source_segment(source, functions[name])
    assert flag in text or flag in source.split(f"def {name}")[0], f"--{flag}: {EFFECTS[flag].test} never names it"


# What makes these flags' rules fire on top of the baseline (which has a reference pass and no overriding flag).
RULE_CONTEXT = {
    "reference_batch_size": ["--reference_free"],
    "warmup_ratio": ["--warmup_steps", "3"],
    "num_epochs": ["--max_train_steps", "2"],
}


@pytest.mark.parametrize("flag", list(FLAG_RULES))
def test_flag_without_what_it_needs_errors_or_notes(flag, world, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    rule = FLAG_RULES[flag]
    argv = _base(world, flag) + RULE_CONTEXT.get(flag, []) + [f"--{flag}", *_argv(world, EFFECTS[flag].value, flag)]
    args = parse_args(argv)
    if rule.kind == "error":
        with pytest.raises(UserError) as err:
            validate(args)
        assert rule.message(flag, args) in str(err.value)
    else:
        validate(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [rule.message(flag, args)], lines
    validate(parse_args(_base(world, flag)))  # the baseline says nothing
    assert not capsys.readouterr().err.strip()


def test_slow_tokenizer_note_is_one_line_and_a_slow_tokenizer_loads_slow(world, tmp_path):
    """The tiny tokenizer has only tokenizer.json: the note says so; a tokenizer with a slow version loads slow."""
    _, fast, note = _tokenizer(_parse(_base(world, "slow") + ["--use_slow_tokenizer"]))
    assert fast and note.strip().splitlines() == [
        f"note: --use_slow_tokenizer has no effect: {world['model']} ships no slow (Python) tokenizer, "
        "the fast one is used"
    ]
    assert _tokenizer(_parse(_base(world, "fast")))[2] == ""


# --- the few flags only a run shows: three short runs (32 pairs, 4 steps) -----------------------------------------
RUN_FLAGS = [f for f in FLAGS if isinstance(EFFECTS.get(f), Effect) and EFFECTS[f].probe == "run"]


def _run(argv: list[str]) -> None:
    from open_instruct import dpo_tune_cache
    from open_instruct.api import fresh_accelerate_state

    with fresh_accelerate_state():
        dpo_tune_cache.main(argv)


def _steps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("step_*"))


def test_run_level_flags(world, monkeypatch):
    from tests.conftest import read_metrics

    monkeypatch.setenv("REFERENCE_LOGPROBS_CACHE_PATH", str(world["root"] / "env_cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    flags = {f: _argv(world, EFFECTS[f].value, f) for f in RUN_FLAGS}
    base, out = _base(world, "run-base"), world["root"] / "out-run-base"
    _run(base)
    _run(_base(world, "run-ckpt") + ["--checkpointing_steps", "1"])
    changed = _base(world, "run-all") + [token for f in RUN_FLAGS for token in (f"--{f}", *flags[f])]
    _run(changed)
    new_out = Path(flags["output_dir"][0])
    checks = {
        "output_dir": lambda: (new_out / "metrics.jsonl").is_file() and not (world["root"] / "out-run-all").exists(),
        "logging_steps": lambda: (
            [r["training_step"] for r in read_metrics(new_out) if "train_loss" in r] == [2, 4]
            and [r["training_step"] for r in read_metrics(out) if "train_loss" in r] == [1, 2, 3, 4]
        ),
        "checkpointing_steps": lambda: not _steps(out) and _steps(new_out),
        "keep_last_n_checkpoints": lambda: (
            len(_steps(world["root"] / "out-run-ckpt")) == 3 and len(_steps(new_out)) == 1
        ),
        "reference_logprobs_cache_path": lambda: (
            any(Path(flags["reference_logprobs_cache_path"][0]).glob("*.pt"))
            and any((world["root"] / "env_cache").glob("*.pt"))
        ),
    }
    assert set(checks) == set(RUN_FLAGS), f"run flags without a check here: {set(RUN_FLAGS) - set(checks)}"
    failed = [f for f, check in checks.items() if not check()]
    assert not failed, f"no visible effect of {failed}"


def test_a_single_file_has_no_split_but_its_own_name(tmp_path, world):
    from open_instruct.config.flag_rules import single_file_split_problems

    named = tmp_path / "validation.jsonl"
    shutil.copy(world["train"], named)
    data_dir, train = world["DATA_DIR"], str(world["train"])
    assert not single_file_split_problems([train, "1.0"], ["train"], "mixer_list_splits", "train")
    assert not single_file_split_problems([str(named), "1.0"], ["validation"], "mixer_list_splits", "train")
    assert not single_file_split_problems([data_dir, "1.0"], ["test"], "mixer_list_splits", "train")  # a folder
    [problem] = single_file_split_problems([data_dir, "1.0", train, "1.0"], ["test"], "mixer_list_splits", "train")
    assert problem.startswith(f"--mixer_list_splits test: {train} is a single file and has no splits")


@pytest.mark.slow
def test_zero_stage_without_a_launcher_trains_on_one_process(world, tmp_path):
    """No torchrun, no accelerate launch: ZeRO-2 still runs (a one-process group), and trains like plain DDP would;
    on a machine that never ran ZeRO (an empty extensions folder) it compiles no DeepSpeed op (a minute of C++)."""
    from tests.conftest import read_metrics, run_cli

    flags = small_run_args(world["model"], world["train"], tmp_path / "z", mixer_list=[str(world["train"]), "16"])
    extensions = tmp_path / "torch_extensions"
    zero = run_cli(
        flags + ["--zero_stage", "2"], tmp_path / "cache", extra_env={"TORCH_EXTENSIONS_DIR": str(extensions)}
    )
    assert zero.returncode == 0, zero.stderr[-3000:]
    assert "engine: deepspeed zero-2, 1 process," in zero.stdout
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.iterdir())
    plain = run_cli(
        small_run_args(world["model"], world["train"], tmp_path / "p", mixer_list=[str(world["train"]), "16"]),
        tmp_path / "cache",
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    losses = [[r["train_loss"] for r in read_metrics(tmp_path / d)] for d in ("z", "p")]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-5)
