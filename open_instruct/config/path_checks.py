"""Every path a run is given, checked for its kind before anything is loaded or written.

A path that exists as the wrong kind of thing (an ``--output_dir`` that is a file, a model path that is a file, a
dataset that is a socket, a cache folder under a file) or a folder the run cannot write into is one ``error:`` line
here, instead of a traceback or a half-written output later. Hub names (anything that does not look like a local path
and does not exist) pass through: the Hub answers for them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from open_instruct.data.sources import LOCAL_SUFFIXES, check_folder, is_data_file
from open_instruct.errors import UserError
from open_instruct.files import is_local_path
from open_instruct.integrity import check_model_files, check_resume_folder
from open_instruct.report.samples import read_prompt_file


def _existing_ancestor(path: Path) -> Path:
    """The nearest part of ``path`` (itself included) that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def folder_to_create(name: str, flag: str) -> Path:
    """A folder the run may create: it is a folder already, or everything above it that exists is a folder."""
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {name} is a file, not a folder")
    anchor = _existing_ancestor(path)
    if not anchor.is_dir():
        raise UserError(f"{flag} {name}: {anchor} is a file, so no folder can be made under it")
    return anchor


def writable_folder(name: str, flag: str) -> None:
    """A folder the run will write into: :func:`folder_to_create`, and the run can write there (checked with a
    probe folder that is removed at once: permission bits do not tell for root or a read-only mount)."""
    anchor = folder_to_create(name, flag)
    problem = None
    if not os.access(anchor, os.W_OK | os.X_OK):
        problem = "permission denied"
    else:
        try:
            shutil.rmtree(tempfile.mkdtemp(prefix=".write_probe.", dir=anchor))
        except OSError as err:
            problem = err.strerror or str(err)
    if problem:
        where = "" if anchor == Path(name).expanduser() else f" (at {anchor}, the part of it that exists)"
        raise UserError(f"{flag} {name} cannot be written: {problem}{where}")


def model_source(name: str | None, flag: str, config_file_ok: bool = False) -> None:
    """A model given as a local path is a folder holding ``config.json`` (with ``config_file_ok``, the pretraining
    recipe's architecture, a ``config.json`` file itself will do)."""
    if not name or not is_local_path(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"{flag}: model path not found: {name}")
    if path.is_file():
        if config_file_ok and path.suffix == ".json":
            return
        raise UserError(f"{flag} {name} is a file; expected a model folder (with config.json) or a hub model id")
    if not path.is_dir():
        raise UserError(f"{flag} {name} is neither a file nor a folder")
    if not (path / "config.json").is_file():
        raise UserError(f"{flag} {name} holds no config.json: not a Hugging Face model folder")
    check_model_files(path, flag)  # a truncated weights file is named now, not as a traceback after setup


def tokenizer_source(name: str | None, flag: str) -> None:
    """A tokenizer given as a local path is a folder."""
    if not name or not is_local_path(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"{flag}: tokenizer path not found: {name}")
    if not path.is_dir():
        raise UserError(f"{flag} {name} is not a folder; expected a tokenizer folder or a hub id")


def dataset_source(name: str, split: str, flag: str, text_files: bool = False) -> None:
    """A dataset given as a local path exists, is a data file of a known kind (``.txt`` only with ``text_files``) or
    a folder that holds data for ``split``."""

    path = Path(name).expanduser()
    if not path.exists():
        if is_data_file(path) or name.endswith((".txt", ".txt.gz")) or is_local_path(name):
            raise UserError(f"{flag}: dataset file not found: {name}")
        return  # a hub name
    if path.is_dir():
        check_folder(path, split)
        return
    if not path.is_file():
        raise UserError(f"{flag} {name} is neither a file nor a folder")
    known = LOCAL_SUFFIXES + ((".txt", ".txt.gz") if text_files else ())
    if not name.endswith(known):
        raise UserError(f"{flag} {name}: unsupported file type; use {', '.join(known)} or a folder of them")


def regular_file(name: str | None, flag: str) -> None:
    """A file the run reads (a DeepSpeed config): not a folder."""
    if name and Path(name).expanduser().is_dir():
        raise UserError(f"{flag} {name} is a folder; expected a file")


def check_paths(args: Any, pretraining: bool = False) -> None:
    """Every path flag of a run, checked for kind and (output) writability. ``pretraining``: the recipe reads
    ``.txt`` corpora and its model path names an architecture (a ``config.json`` file will do)."""
    if getattr(args, "dry_run", False):  # a plan may be made away from the cluster that will write the output
        folder_to_create(args.output_dir, "--output_dir")
    else:
        writable_folder(args.output_dir, "--output_dir")
    folder_to_create(args.dataset_local_cache_dir, "--dataset_local_cache_dir")
    if args.reference_logprobs_cache_path:
        folder_to_create(args.reference_logprobs_cache_path, "--reference_logprobs_cache_path")
    model_source(args.model_name_or_path, "--model_name_or_path", config_file_ok=pretraining)
    tokenizer_source(args.tokenizer_name_or_path, "--tokenizer_name_or_path")
    if args.resume_from_checkpoint and Path(args.resume_from_checkpoint).expanduser().is_file():
        raise UserError(f"--resume_from_checkpoint {args.resume_from_checkpoint} is a file; expected a step_N folder")
    if args.resume_from_checkpoint and Path(args.resume_from_checkpoint).expanduser().is_dir():
        check_resume_folder(Path(args.resume_from_checkpoint).expanduser())  # damaged: said before any work
    regular_file(getattr(args, "deepspeed_config", None), "--deepspeed_config")
    if getattr(args, "sample_prompts", None) and getattr(args, "num_sample_prompts", 0) > 0:
        read_prompt_file(args.sample_prompts)  # every row checked now: a bad one is named before the model loads
    for flag, values, splits in (
        ("--mixer_list", args.mixer_list, args.mixer_list_splits),
        ("--eval_mixer_list", args.eval_mixer_list, args.eval_mixer_list_splits),
    ):
        names = values[0::2]
        for name, split in zip(names, splits * len(names) if len(splits) == 1 else splits):
            dataset_source(name, split, flag, text_files=pretraining)
