"""Reference log-probs: one no-grad pass of the untouched policy, stored on disk under a content hash.

The cache holds, for every dataset ``index``, the summed log-prob and the label-token count of the chosen and the
rejected reply. Both the summed (``dpo``) and the averaged (``dpo_norm``) losses derive their reference from these, so the
loss type is deliberately not part of the key: one pass serves every loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from open_instruct.config import UserError
from open_instruct.logprobs import SequenceLogprobs

FORMAT_VERSION = 2  # 2: sizes and sha256 recorded


@dataclass
class ReferenceLogps:
    """Per-index reference values, each ``[N]``: summed log-probs and label-token counts."""

    chosen_sums: torch.Tensor
    chosen_counts: torch.Tensor
    rejected_sums: torch.Tensor
    rejected_counts: torch.Tensor

    def lookup(self, index: torch.Tensor, length_normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) reference log-probs ``[B]`` for dataset indices ``[B]``, summed or averaged."""
        cpu_index = index.cpu()
        chosen, rejected = self.chosen_sums[cpu_index], self.rejected_sums[cpu_index]
        if length_normalized:
            chosen = chosen / self.chosen_counts[cpu_index].clamp(min=1)
            rejected = rejected / self.rejected_counts[cpu_index].clamp(min=1)
        return chosen.to(index.device), rejected.to(index.device)

    def as_tensor(self) -> torch.Tensor:
        """``[N, 4]``: chosen sum, chosen count, rejected sum, rejected count."""
        return torch.stack([self.chosen_sums, self.chosen_counts, self.rejected_sums, self.rejected_counts], dim=1)

    @classmethod
    def from_tensor(cls, table: torch.Tensor) -> ReferenceLogps:
        """Inverse of :meth:`as_tensor`."""
        return cls(*(table[:, i].clone() for i in range(4)))


def fingerprint(value: Any) -> str:
    """sha256 of a JSON-serialisable value (keys sorted), hex."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(name: str, revision: str | None) -> dict[str, Any]:
    """What identifies the starting weights: hub id and revision, or, for a local folder, its config and the size,
    head and tail bytes of every weight file (cheap even for a 70B checkpoint, and changes when weights change)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return {"model": name, "revision": revision}
    files = {}
    for weight_file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = weight_file.stat().st_size
        digest = hashlib.sha256()
        with weight_file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
        files[weight_file.name] = [size, digest.hexdigest()]
    config = (path / "config.json").read_text() if (path / "config.json").exists() else ""
    return {"model": str(path.resolve()), "config": config, "weights": files}


def dataset_fingerprint(records: Iterable[dict[str, Any]]) -> str:
    """sha256 over every index, token id and label: covers data, mix, template, tokenizer and truncation at once."""
    digest = hashlib.sha256()
    for r in records:
        for key in ("index", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            value = r[key]
            digest.update(torch.tensor(value if isinstance(value, list) else [value], dtype=torch.int64).numpy())
    return digest.hexdigest()


def cache_file(cache_dir: str | Path, key: str) -> Path:
    """Where the cache for ``key`` lives."""
    return Path(cache_dir).expanduser() / f"{key}.pt"


def table_checksum(table: torch.Tensor) -> str:
    """sha256 of the table's raw bytes (float32, row-major)."""
    return hashlib.sha256(table.contiguous().to(torch.float32).numpy().tobytes()).hexdigest()


def save(path: Path, key: str, reference: ReferenceLogps) -> None:
    """Write atomically (a temporary name in the same folder, then rename), with the key, sizes and a checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = reference.as_tensor().to(torch.float32).contiguous()
    payload = {
        "version": FORMAT_VERSION,
        "key": key,
        "rows": table.shape[0],
        "columns": table.shape[1],
        "nbytes": table.numel() * table.element_size(),
        "sha256": table_checksum(table),
        "table": table,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def check(path: Path, key: str, rows: int) -> tuple[ReferenceLogps | None, str]:
    """(the cached values, "") when the file is whole and matches ``key`` and ``rows``; else (None, what is wrong)."""
    if not path.is_file():
        return None, "missing"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or overwritten files fail here in many ways
        return None, f"unreadable ({type(err).__name__}; truncated or damaged, {path.stat().st_size} bytes)"
    if not isinstance(payload, dict) or payload.get("version") != FORMAT_VERSION:
        return None, "written by another version of the cache format"
    if payload.get("key") != key:
        return None, "its key does not match this model and data"
    table = payload.get("table")
    expected = {"rows": rows, "columns": 4, "nbytes": rows * 4 * 4}
    found = {"rows": payload.get("rows"), "columns": payload.get("columns"), "nbytes": payload.get("nbytes")}
    if found != expected or not isinstance(table, torch.Tensor) or tuple(table.shape) != (rows, 4):
        shape = tuple(table.shape) if isinstance(table, torch.Tensor) else None
        return None, f"sizes do not match: expected {expected}, recorded {found}, table shape {shape}"
    if payload.get("sha256") != table_checksum(table):
        return None, "checksum mismatch (the table was altered or damaged)"
    if not torch.isfinite(table).all():
        return None, "holds NaN/Inf values"
    return ReferenceLogps.from_tensor(table), ""


def load(path: Path, key: str, rows: int) -> ReferenceLogps | None:
    """The cached values, or None when the file is missing, damaged or does not match this key and size."""
    return check(path, key, rows)[0]


LogprobFn = Callable[[Any, dict[str, torch.Tensor]], SequenceLogprobs]


@torch.no_grad()
def compute(model: Any, dataloader: Any, accelerator: Any, logprob_fn: LogprobFn, rows: int) -> ReferenceLogps:
    """One no-grad pass over ``dataloader``; every rank computes its shard, the shards are merged on every rank."""
    was_training = model.training
    model.eval()
    table = torch.full((rows, 4), float("nan"), dtype=torch.float32)
    start, done = time.perf_counter(), 0
    bar = tqdm(
        total=rows,
        desc="reference log-probs",
        unit="pair",
        disable=None if accelerator.is_local_main_process else True,
    )  # None: off when not a terminal
    for batch in dataloader:
        lp = logprob_fn(model, batch)
        half = batch["index"].shape[0]
        local = torch.stack([lp.sums[:half], lp.counts[:half].float(), lp.sums[half:], lp.counts[half:].float()], 1)
        merged_index = accelerator.gather(batch["index"]).cpu()
        merged = accelerator.gather(local.float().contiguous()).cpu()
        table[merged_index] = merged
        done += merged_index.numel()
        bar.update(min(merged_index.numel(), rows - bar.n))
        bar.set_postfix(pairs_per_s=f"{done / (time.perf_counter() - start):.1f}")
    bar.close()
    model.train(was_training)
    missing = int(torch.isnan(table[:, 0]).sum())
    if missing:
        raise RuntimeError(f"reference pass left {missing} of {rows} dataset indices without log-probs")
    return ReferenceLogps.from_tensor(table)


def get_reference(
    model: Any, dataloader: Any, accelerator: Any, logprob_fn: LogprobFn, rows: int, cache_dir: str, key: str
) -> ReferenceLogps:
    """Load the cache for ``key`` if it is valid, else compute it and let the main process save it."""
    path = cache_file(cache_dir, key)
    cached, problem = check(path, key, rows)
    if cached is not None:
        accelerator.print(f"reference log-probs: loaded from cache {path}")
        return cached
    if problem != "missing":
        accelerator.print(f"warning: reference cache {path} not used: {problem}; rebuilding it")
    accelerator.print(f"reference log-probs: computing ({rows} pairs); cache {path}")
    reference = compute(model, dataloader, accelerator, logprob_fn, rows)
    if accelerator.is_main_process:
        try:
            save(path, key, reference)
        except OSError as err:
            raise UserError(f"cannot write the reference cache {path}: {err}") from err
    accelerator.wait_for_everyone()
    return reference
