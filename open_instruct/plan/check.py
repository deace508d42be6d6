"""The dry run: every check that needs no weights and no GPU, then the plan.

Checked: the flags (already, by the entry's validation), the model's ``config.json``, every dataset source (a local
one: exists, its first rows parse in the format asked for, its size; a Hub one: reachable, else
``--dry_run_num_pairs`` stands in for its size), the output folder (writable; a checkpoint there means the run
resumes), the Hub target (a token) and tracking (wandb installed and logged in, or offline). Nothing is written.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from open_instruct.data.formats import RowError, detect_format, normalize
from open_instruct.data.sft import conversation
from open_instruct.data.sources import is_data_file, iter_rows
from open_instruct.errors import UserError
from open_instruct.plan import build, report
from open_instruct.plan.model_config import resolve_model_config, shape_of
from open_instruct.settings import DataSettings, RunSettings

FIRST_ROWS = 3


def _splits(names: list[str], splits: list[str]) -> list[str]:
    return splits * len(names) if len(splits) == 1 else splits


def check_local_dataset(name: str, split: str, dataset_format: str, stage: str = "dpo") -> int:
    """Rows of a local dataset; its first rows must parse: preference pairs in ``dataset_format`` (``auto``:
    detected), or for SFT conversations (``messages``, or a preference row's chosen side)."""
    rows = 0
    for row, location in iter_rows(name, split):
        if rows < FIRST_ROWS:
            try:
                if stage == "sft":
                    conversation(row)
                else:
                    normalize(row, detect_format(list(row), row) if dataset_format == "auto" else dataset_format)
            except RowError as err:
                raise UserError(f"{location or name}: {err}") from err
        rows += 1
    if rows == 0:
        raise UserError(f"dataset {name} (split {split}) has no rows")
    return rows


def hub_dataset_reachable(name: str) -> bool:
    """Whether the Hub answers for this dataset repo (False offline); a repo the Hub says is missing is an error."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        # only a Hub call needs huggingface_hub
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError  # as above
    except ImportError:
        return False
    try:
        HfApi().dataset_info(name, timeout=10)
    except RepositoryNotFoundError as err:
        raise UserError(f"dataset {name!r} not found on the Hugging Face Hub") from err
    except Exception:  # offline, DNS, proxy: not checkable from here
        return False
    return True


def _amount(amount: str, rows: int) -> int:
    value = float(amount)
    return min(rows, int(value)) if "." not in amount else int(math.floor(rows * value))


def check_datasets(
    data: DataSettings, notes: list[str], stage: str = "dpo", dry_run_num_pairs: int | None = None
) -> int | None:
    """Training examples the mix yields (None when a Hub dataset's size cannot be read and no stand-in is given)."""
    total: int | None = 0
    names, amounts = data.mixer_list[0::2], data.mixer_list[1::2]
    pairs = list(zip(names, amounts, _splits(names, data.mixer_list_splits)))
    evals = data.eval_mixer_list[0::2]
    pairs += [(n, None, s) for n, s in zip(evals, _splits(evals, data.eval_mixer_list_splits))]
    for name, amount, split in pairs:
        path = Path(name).expanduser()
        if path.exists() or is_data_file(path):
            rows = check_local_dataset(name, split, data.dataset_format, stage)
            if amount is not None and total is not None:
                total += _amount(amount, rows)
        else:
            reachable = hub_dataset_reachable(name)
            notes.append(f"Hub dataset {name}: " + ("reachable" if reachable else "not checked (Hub unreachable)"))
            if amount is not None and total is not None:
                # A row count is what the mix takes (assuming the dataset has that many); a fraction is unknown.
                total = total + int(amount) if "." not in amount else None
    if dry_run_num_pairs:
        total = dry_run_num_pairs
    if total is not None:
        total = int(total * (1 - data.eval_fraction))
        if data.max_train_samples:
            total = min(total, data.max_train_samples)
    return total


def check_output(output_dir: str, notes: list[str]) -> None:
    """The output folder can be created and written; a checkpoint in it means the run resumes."""
    out = Path(output_dir).expanduser()
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"--output_dir {output_dir}: cannot write under {existing}")
    steps = sorted(out.glob("step_*")) if out.is_dir() else []
    notes.append(f"output {out}: " + (f"resumes from {steps[-1].name}" if steps else "new run"))


def check_hub_and_tracking(
    push_to_hub: bool, with_tracking: bool, notes: list[str], push_checkpoints: bool = False
) -> None:
    """A push needs a token; wandb tracking needs wandb and a login (or offline mode)."""
    if push_to_hub:
        # only a Hub call needs huggingface_hub
        from huggingface_hub import get_token

        if not get_token():
            raise UserError("--push_to_hub: no Hugging Face token (run `hf auth login` or set HF_TOKEN)")
        notes.append("Hub push: token found")
        if push_checkpoints:  # the plan stays offline: whether the Hub holds a checkpoint is the run's to find out
            notes.append(
                "Hub checkpoints: each step_N to branch step_N; with none local, resumes from the Hub's newest"
            )
    if with_tracking:
        try:
            import wandb  # noqa: F401
        except ImportError as err:
            raise UserError("--with_tracking needs wandb (pip install wandb)") from err
        offline = os.environ.get("WANDB_MODE", "") in ("offline", "disabled")
        netrc = Path.home() / ".netrc"
        logged_in = "WANDB_API_KEY" in os.environ or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
        if not (offline or logged_in):
            raise UserError(
                "--with_tracking: wandb is not logged in (wandb login, WANDB_API_KEY, or WANDB_MODE=offline)"
            )
        notes.append("tracking: wandb " + ("offline" if offline else "logged in"))


def plan_of(settings: RunSettings, stage: str, num_examples: int | None, notes: list[str]) -> build.Plan:
    """The plan of a run (its model's shape read from its ``config.json``), ``notes`` listed as what was checked."""
    model = settings.model
    config, source = resolve_model_config(model.model_name_or_path or "", model.model_revision)
    plan = build.build_plan(
        stage,
        shape_of(config),
        source,
        num_examples,
        model=model,
        batch=settings.batch,
        reference=settings.reference,
        engine=settings.engine,
        optim=settings.optim,
        plan=settings.plan,
        max_seq_length=settings.data.max_seq_length,
    )
    plan.checks.extend(notes)
    return plan


def dry_run(settings: RunSettings, stage: str = "dpo") -> build.Plan:
    """Check everything a run needs without loading weights, print its plan; returns the plan."""
    if settings.model.model_name_or_path is None:
        raise UserError("--dry_run needs --model_name_or_path (the plan is of a model)")
    notes: list[str] = []
    num_examples = check_datasets(settings.data, notes, stage, settings.plan.dry_run_num_pairs)
    check_output(settings.checkpoint.output_dir, notes)
    hub = settings.hub
    check_hub_and_tracking(hub.push_to_hub, settings.tracking.with_tracking, notes, hub.push_checkpoints_to_hub)
    plan = plan_of(settings, stage, num_examples, notes)

    def peak_of(changes: dict[str, Any]) -> float:
        return plan_of(settings.replaced(**changes), stage, num_examples, []).peak

    text = report.format_plan(plan, report.suggestions(plan, peak_of))
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, flush=True)
    return plan
