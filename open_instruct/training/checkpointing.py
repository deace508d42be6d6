"""Training-state checkpoints (``step_N`` folders), exact resume, and the final model save.

A checkpoint folder holds accelerate's state (model, optimizer, scheduler, sampler seed/epoch, RNG), our
``trainer_state.json`` (step counters, data position, what the run was) and one ``rng_state_<rank>.pt`` per process.
The ``COMPLETED`` marker is written last, after every rank finished writing: a folder without it is a checkpoint a
kill cut in half, and is never resumed from.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from open_instruct.disk_space import failure_reason, injected_write_fault, write_failure
from open_instruct.engine import engine_of, local_shard
from open_instruct.errors import UserError
from open_instruct.files import move_contents, write_text_atomic
from open_instruct.integrity import check_resume_folder, checked_once, record_manifest, record_manifest_shared
from open_instruct.model.lora import find_peft_model, save_lora_model
from open_instruct.training.preemption import agreed
from open_instruct.training.reshard import changed_settings, reshard_resumed
from open_instruct.training.safe_load import check_distributed_metadata, load_plain, weights_only_loads
from open_instruct.training.space_checks import check_room_before_save, final_model_written

COMPLETED = "COMPLETED"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """Where the loop is: enough to continue exactly. ``batches_in_epoch`` counts this rank's micro-batches (a resume
    on another world size converts it through the global count: ``training/reshard.py``)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens_total: int = 0
    nonfinite_skipped: int = 0
    signature: dict[str, Any] = field(default_factory=dict)
    eval_pending: bool = False  # a stop signal cut the evaluation at ``step`` short: the resume runs it first
    loss_scaler: dict[str, float | int] | None = None  # fp16's LossScaler.state_dict() (equal on every rank)


@dataclass
class CheckpointPolicy:
    """When to save and how many to keep. ``every_steps`` None with ``each_epoch`` False: never."""

    output_dir: Path
    every_steps: int | None = None
    each_epoch: bool = False
    keep_last_n: int = 3
    # Tests only: (step, seconds) to wait before that checkpoint's COMPLETED marker, so a kill lands mid-write.
    test_write_delay: tuple[int, float] | None = None
    # Main process: called with each complete checkpoint's folder (training/hub_checkpoints.py pushes it).
    on_complete: Callable[[Path], None] | None = None
    # Bytes of one checkpoint estimated before the first exists (training/space_checks.py): the check before a save.
    estimated_bytes: int | None = None

    @classmethod
    def from_flag(
        cls,
        output_dir: str | Path,
        checkpointing_steps: str | None,
        keep_last_n: int,
        test_write_delay: tuple[int, float] | None = None,
    ) -> CheckpointPolicy:
        """Parse ``--checkpointing_steps N|epoch``."""
        every = int(checkpointing_steps) if checkpointing_steps and checkpointing_steps.isdigit() else None
        return cls(Path(output_dir), every, checkpointing_steps == "epoch", keep_last_n, test_write_delay)

    def due(self, step: int, end_of_epoch: bool) -> bool:
        """Whether a checkpoint is due after optimizer step ``step``."""
        return bool((self.every_steps and step % self.every_steps == 0) or (self.each_epoch and end_of_epoch))


def step_of(name: str) -> int | None:
    """N of a ``step_N`` folder or branch name; None for any other name."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """``<output_dir>/step_<step>``."""
    return Path(output_dir) / f"step_{step}"


def is_complete(path: str | Path) -> bool:
    """A checkpoint counts only once its ``COMPLETED`` marker exists."""
    return (Path(path) / COMPLETED).is_file()


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``step_N`` folder (complete or not), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_complete_checkpoint(output_dir: str | Path, before: int | None = None) -> tuple[Path | None, list[Path]]:
    """(newest complete checkpoint (older than step ``before``) or None, incomplete folders newer than it)."""
    incomplete: list[Path] = []
    for step, path in reversed(list_checkpoints(output_dir)):
        if before is not None and step >= before:
            continue
        if is_complete(path):
            return path, incomplete
        incomplete.append(path)
    return None, incomplete


def resolve_resume(output_dir: str | Path, resume_from: str | None) -> tuple[Path | None, str]:
    """The checkpoint to resume from (explicit flag, else the newest complete one in ``output_dir``) and why."""
    if resume_from:
        path = Path(resume_from).expanduser()
        if not path.is_dir():
            raise UserError(f"--resume_from_checkpoint: folder not found: {path}")
        if not is_complete(path):
            raise UserError(
                f"--resume_from_checkpoint: {path} has no {COMPLETED} marker (a checkpoint cut short); "
                "pick an earlier step_N folder"
            )
        check_resume_folder(path)
        return path, f"resuming from {path} (--resume_from_checkpoint)"
    path, incomplete = latest_complete_checkpoint(output_dir)
    notes = [f"ignoring incomplete checkpoint {p} (no {COMPLETED} marker)" for p in incomplete]
    damaged = False
    while path is not None and (problem := checked_once(path)):  # a file changed after its COMPLETED marker
        path, damaged = latest_complete_checkpoint(output_dir, before=step_of(path.name))[0], True
        instead = f"resuming from {path} instead" if path else "no intact checkpoint is left: starting fresh"
        notes.append(f"warning: checkpoint damaged: {problem}; {instead}")
    if path is not None and not damaged:
        notes.append(f"resuming from {path} (newest complete checkpoint in --output_dir)")
    return path, "\n".join(notes)


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) random states of this process, as tensors, lists and numbers only: the file
    loads with ``weights_only=True`` (no pickled objects)."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": [version, list(words), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (also reads the tuples and numpy arrays older checkpoints stored)."""
    version, words, gauss = states["python"]
    random.setstate((version, tuple(words), gauss))
    numpy_state = states["numpy"]
    if isinstance(numpy_state, tuple):  # older checkpoints: np.random.get_state() itself
        np.random.set_state(numpy_state)
    else:
        keys, pos, has_gauss, cached = numpy_state
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(accelerator: Any, model: Any, policy: CheckpointPolicy, state: TrainerState) -> Path:
    """Write ``step_<state.step>`` on every rank, then the ``COMPLETED`` marker, then prune old checkpoints.

    A save that cannot fit (free space below one more checkpoint: training/space_checks.py) is refused before any
    write. A write that fails on any rank (a full disk, a lost mount) removes the partial folder, keeps every earlier
    checkpoint (pruning happens only after a complete one), and stops the run with one line naming the bytes and
    the checkpoint a rerun resumes from."""
    path = checkpoint_dir(policy.output_dir, state.step)
    if not model_is_finite(accelerator, model):
        raise UserError(
            f"the model's weights became NaN/Inf by optimizer step {state.step} (an overflow in the "
            f"gradients?); checkpoint {path} was not written"
        )
    if accelerator.is_main_process and path.exists():
        shutil.rmtree(path)  # a leftover from a kill mid-write, or an earlier run's
    accelerator.wait_for_everyone()
    needed = check_room_before_save(
        accelerator, path, latest_complete_checkpoint(path.parent)[0], policy.estimated_bytes
    )
    error = None
    try:
        engine_of(accelerator).save_state(accelerator, str(path))
        rng_file = path / f"rng_state_{accelerator.process_index}.pt"
        injected_write_fault(rng_file)
        torch.save(capture_rng(), rng_file)
        if accelerator.is_main_process:
            write_text_atomic(path / TRAINER_STATE, json.dumps(asdict(state), indent=2))
    except Exception as err:  # a full disk also arrives as torch's RuntimeError or safetensors' own error
        error = write_failure(err)
        if error is None:
            raise
    if policy.test_write_delay and policy.test_write_delay[0] == state.step:
        time.sleep(policy.test_write_delay[1])
    _all_written(accelerator, path, error, needed)  # every rank's files are there: the marker may go in
    error = record_manifest_shared(accelerator, path, skip=(COMPLETED,))  # sizes and checksums, before the marker
    if accelerator.is_main_process and error is None:
        try:
            write_text_atomic(path / COMPLETED, f"step {state.step}\n")
        except OSError as err:
            error = err
    _all_written(accelerator, path, error, needed)
    if accelerator.is_main_process:
        prune_checkpoints(policy.output_dir, policy.keep_last_n)
        if policy.on_complete is not None:
            policy.on_complete(path)
    accelerator.wait_for_everyone()
    return path


def _all_written(accelerator: Any, path: Path, error: OSError | None, needed: int | None = None) -> None:
    """Agree across ranks (a collective, so also a barrier) whether every write succeeded; if one failed, remove the
    partial checkpoint and raise on every rank the same line: the checkpoint, the bytes it needs and has free, and the
    checkpoint a rerun resumes from."""
    failed, disk_full = agreed(accelerator, error is not None, error is not None and error.errno == errno.ENOSPC)
    if not failed:
        return
    if accelerator.is_main_process:
        (path / COMPLETED).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    previous, _ = latest_complete_checkpoint(path.parent)
    kept = (
        f"the previous checkpoint {previous} is intact and a rerun resumes from it"
        if previous
        else ("there is no earlier checkpoint")
    )
    if disk_full:  # every rank says the same: the disk is full, wherever it filled
        error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    raise UserError(f"could not write checkpoint {path}: {failure_reason(error, path.parent, needed)}; {kept}")


def prune_checkpoints(output_dir: str | Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest ``keep_last_n`` complete checkpoints (-1 keeps all), and incomplete ones older than
    the newest complete one. Returns what was removed."""
    checkpoints = list_checkpoints(output_dir)
    complete = [p for _, p in checkpoints if is_complete(p)]
    if not complete:
        return []
    newest_step = max(s for s, p in checkpoints if is_complete(p))
    doomed = [p for s, p in checkpoints if not is_complete(p) and s < newest_step]
    if keep_last_n >= 0:
        doomed += complete[: max(0, len(complete) - keep_last_n)]
    for path in doomed:
        # Drop the marker first: a kill during the delete leaves an ignored folder, never a half-deleted "complete" one.
        (path / COMPLETED).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def load_checkpoint(accelerator: Any, path: str | Path, signature: dict[str, Any]) -> tuple[TrainerState, Any]:
    """Restore accelerate's state from ``path``; returns our counters and this rank's RNG states (to restore once
    the resumed data iterator exists, so the random streams line up with an uninterrupted run)."""
    path = Path(path)
    state = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
    changed = changed_settings(state.signature, signature)
    if changed:
        details = ", ".join(f"{k}: checkpoint {old!r} vs now {new!r}" for k, (old, new) in sorted(changed.items()))
        raise UserError(
            f"cannot resume exactly from {path}: the run changed ({details}); "
            "use the original settings or a new --output_dir"
        )
    # A checkpoint folder may come from elsewhere: every pickle in it is loaded weights-only (never runs code).
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    rng = load_plain(rng_file) if rng_file.is_file() else None
    check_distributed_metadata(path)
    with weights_only_loads():
        conversion = engine_of(accelerator).load_state(accelerator, str(path))
    reshard_resumed(accelerator, state, conversion)
    return state, rng


def model_is_finite(accelerator: Any, model: Any) -> bool:
    """Whether every parameter on every rank is finite (partitioned parameters are checked where their shards live)."""
    bad = torch.zeros(1, device=accelerator.device)
    for param in model.parameters():
        data = local_shard(param).detach()
        if data.numel() and not torch.isfinite(data).all():
            bad += 1
            break
    return float(accelerator.reduce(bad, reduction="sum")) == 0


def save_final_model(
    accelerator: Any, model: Any, tokenizer: Any, output_dir: str | Path, merge_lora: bool = False
) -> Path:
    """Write the model (safetensors) and tokenizer in Hugging Face format directly into ``output_dir``.

    Every rank takes part (a partitioning engine gathers the full weights); the main process writes into a temporary folder and then
    renames each file into place, so a reader never sees a partial file. A LoRA model writes its adapter instead (and,
    with ``merge_lora``, merged full weights into ``output_dir/merged``). A model with NaN/Inf weights is refused.
    """

    if not model_is_finite(accelerator, model):
        raise UserError("the trained model has NaN/Inf weights; the final model was not written")
    if find_peft_model(model) is not None:
        return save_lora_model(accelerator, model, tokenizer, output_dir, merge=merge_lora)
    output_dir = Path(output_dir)
    state_dict = engine_of(accelerator).full_state_dict(accelerator, model)
    error, needed = None, sum(t.numel() * t.element_size() for t in (state_dict or {}).values())
    if accelerator.is_main_process:
        tmp = output_dir / ".final_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            record_manifest(tmp)  # sizes and checksums: a later push or load can check the files
            move_contents(tmp, output_dir)  # one rename per file: a reader never sees a partial file
        except Exception as err:  # a full disk: safetensors' own error, an OSError
            shutil.rmtree(tmp, ignore_errors=True)
            if (error := write_failure(err)) is None:
                raise
    final_model_written(accelerator, output_dir, error, needed)
    accelerator.wait_for_everyone()
    return output_dir
