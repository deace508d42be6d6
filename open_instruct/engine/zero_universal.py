"""ZeRO checkpoints on another number of processes: through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds one optimizer partition per data-parallel rank, and DeepSpeed refuses to load it on another
number of ranks. Its universal format holds every parameter's fp32 weights and optimizer moments whole, and loads on
any number. The conversion (``deepspeed.checkpoint.ds_to_universal``) runs once, on the main process, into
``<checkpoint>/universal.tmp`` renamed to ``<checkpoint>/universal`` when complete: a kill mid-conversion leaves only
the temporary folder (redone), and a restarted run reuses a finished one. ``universal`` is a loadable checkpoint
folder of its own: the converted ZeRO state beside copies of accelerate's files (schedule, sampler, RNG).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path
from typing import Any

MODEL_TAG = "pytorch_model"  # accelerate's DeepSpeed checkpoint tag (its MODEL_NAME)
UNIVERSAL = "universal"


def saved_ranks(path: Path) -> int:
    """How many data-parallel ranks wrote the ZeRO checkpoint in ``path`` (its optimizer partition files)."""
    return len(list((path / MODEL_TAG).glob("*zero_pp_rank_*_optim_states.pt")))


def _convert(path: Path) -> None:
    """Write ``path/universal`` from ``path``'s ZeRO state (temporary folder, then one rename)."""
    from deepspeed.checkpoint import ds_to_universal  # optional: installed for ZeRO runs only

    tmp = path / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion a kill cut short
    tmp.mkdir()
    args = argparse.Namespace(
        input_folder=str(path / MODEL_TAG),
        output_folder=str(tmp / MODEL_TAG),
        num_extract_workers=1,  # in this process: its loads stay weights-only (training/safe_load.py)
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # accelerate's ZeRO-1/2 checkpoints lack the parameter-pattern info: none apply
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines are not the run's
        ds_to_universal.main(args)
    for item in path.iterdir():  # accelerate's own files: schedule, sampler, RNG
        if item.is_file():
            shutil.copy2(item, tmp / item.name)
    tmp.rename(path / UNIVERSAL)


def load_resharded(accelerator: Any, path: str) -> str | None:
    """Load a ZeRO checkpoint written by any number of processes; returns what was converted (None: nothing)."""
    folder = Path(path)
    ranks = saved_ranks(folder)
    if ranks in (0, accelerator.num_processes):
        accelerator.load_state(path)
        return None
    converted = (folder / UNIVERSAL).is_dir()
    # Every rank has finished reading the folder (its manifest, its metadata) before the main process writes into it:
    # files of universal.tmp appearing and vanishing under another rank's directory walk ended a run.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not converted:
        _convert(folder)
    accelerator.wait_for_everyone()
    engine = accelerator.deepspeed_engine_wrapped.engine
    engine._config.load_universal_checkpoint = True
    try:
        accelerator.load_state(str(folder / UNIVERSAL))
    finally:
        engine._config.load_universal_checkpoint = False
    how = "reused" if converted else "converted it"
    return f"ZeRO partitions of {ranks} ranks: {how} to DeepSpeed's universal checkpoint in {folder / UNIVERSAL}"
