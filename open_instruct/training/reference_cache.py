"""Reference log-probs: one no-grad pass of the untouched policy, stored on disk under a content hash.

The cache holds, for every dataset ``index``, the summed log-prob and the label-token count of the chosen and the
rejected reply, and each reply's sum over its first min(n_c, n_r) label tokens (LD-DPO's shared part). Both the summed (``dpo``) and the averaged (``dpo_norm``) losses derive their reference from these, so the
loss type is deliberately not part of the key: one pass serves every loss.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from open_instruct.engine import gather_indexed
from open_instruct.files import atomic_write
from open_instruct.objectives.logprobs import SequenceLogprobs
from open_instruct.objectives.pair_logprobs import shared_and_tail_sums
from open_instruct.training.preemption import PREEMPTED_EXIT_CODE, Preempted, agreed, requested, signal_name
from open_instruct.training.reference_shards import BuilderLock, ShardWriter, parts_dir, read_shards, remove_parts
from open_instruct.training.space_checks import check_room_for_reference, reference_written

FORMAT_VERSION = 3  # 2: sizes and sha256 recorded; 3: LD-DPO's shared-length sums (6 columns)
COLUMNS = 6


@dataclass
class ReferenceLogps:
    """Per-index reference values, each ``[N]``: summed log-probs, label-token counts, and the sums over each reply's
    first min(n_c, n_r) label tokens (LD-DPO)."""

    chosen_sums: torch.Tensor
    chosen_counts: torch.Tensor
    rejected_sums: torch.Tensor
    rejected_counts: torch.Tensor
    chosen_shared: torch.Tensor
    rejected_shared: torch.Tensor

    def lookup(self, index: torch.Tensor, length_normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) reference log-probs ``[B]`` for dataset indices ``[B]``, summed or averaged."""
        cpu_index = index.cpu()
        chosen, rejected = self.chosen_sums[cpu_index], self.rejected_sums[cpu_index]
        if length_normalized:
            chosen = chosen / self.chosen_counts[cpu_index].clamp(min=1)
            rejected = rejected / self.rejected_counts[cpu_index].clamp(min=1)
        return chosen.to(index.device), rejected.to(index.device)

    def pair_sums(
        self, index: torch.Tensor, ld_alpha: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen sums, rejected sums, chosen counts, rejected counts) ``[B]`` for dataset indices ``[B]``; with
        ``ld_alpha`` the sums are LD-DPO's shared + alpha * tail."""
        i = index.cpu()
        chosen, rejected = self.chosen_sums[i], self.rejected_sums[i]
        if ld_alpha is not None:
            chosen_shared, rejected_shared = self.chosen_shared[i], self.rejected_shared[i]
            chosen = chosen_shared + ld_alpha * (chosen - chosen_shared)
            rejected = rejected_shared + ld_alpha * (rejected - rejected_shared)
        values = (chosen, rejected, self.chosen_counts[i], self.rejected_counts[i])
        return tuple(v.to(index.device) for v in values)

    def as_tensor(self) -> torch.Tensor:
        """``[N, 6]``: chosen sum, chosen count, rejected sum, rejected count, chosen shared, rejected shared."""
        columns = [self.chosen_sums, self.chosen_counts, self.rejected_sums, self.rejected_counts]
        return torch.stack(columns + [self.chosen_shared, self.rejected_shared], dim=1)

    @classmethod
    def from_tensor(cls, table: torch.Tensor) -> ReferenceLogps:
        """Inverse of :meth:`as_tensor`."""
        return cls(*(table[:, i].clone() for i in range(COLUMNS)))


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
    if hasattr(records, "fingerprint"):  # an Arrow-backed table: the same bytes, hashed when it was written
        return records.fingerprint()
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
    buffer = io.BytesIO()  # torch.save names its archive after a file's name; a buffer's is fixed: same bytes
    torch.save(payload, buffer)
    with atomic_write(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def check(path: Path, key: str, rows: int) -> tuple[ReferenceLogps | None, str]:
    """(the cached values, "") when the file is whole and matches ``key`` and ``rows``; else (None, what is wrong)."""
    if not path.is_file():
        return None, "missing"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or overwritten files fail here in many ways
        return None, f"unreadable ({type(err).__name__}; truncated or damaged, {path.stat().st_size} bytes)"
    if not isinstance(payload, dict) or payload.get("version") != FORMAT_VERSION:
        found = payload.get("version") if isinstance(payload, dict) else None
        return None, (
            f"written in cache format version {found}, this version reads {FORMAT_VERSION} "
            "(which adds LD-DPO's shared-length sums)"
        )
    if payload.get("key") != key:
        return None, "its key does not match this model and data"
    table = payload.get("table")
    expected = {"rows": rows, "columns": COLUMNS, "nbytes": rows * COLUMNS * 4}
    found = {"rows": payload.get("rows"), "columns": payload.get("columns"), "nbytes": payload.get("nbytes")}
    if found != expected or not isinstance(table, torch.Tensor) or tuple(table.shape) != (rows, COLUMNS):
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


def _progress_bar(accelerator: Any, rows: int, initial: int) -> Any:
    quiet = None if accelerator.is_local_main_process else True  # None: off when not a terminal
    return tqdm(total=rows, initial=initial, desc="reference log-probs", unit="pair", disable=quiet)


def _stop(accelerator: Any, writer: ShardWriter | None, covered: torch.Tensor) -> None:
    """Save the shards and leave (on every rank at the same batch)."""
    if writer is not None:
        writer.flush()
    where = f"in {writer.folder}" if writer is not None else "nowhere (another run is building this cache)"
    accelerator.print(
        f"preempted by {signal_name()} during the reference pass: {int(covered.sum())} of {covered.numel()} pairs "
        f"saved {where}; exiting with code {PREEMPTED_EXIT_CODE}, rerun the same command to resume"
    )
    raise Preempted("stopped during the reference pass")


@torch.no_grad()
def compute(
    model: Any,
    dataloader: Any,
    accelerator: Any,
    logprob_fn: LogprobFn,
    rows: int,
    table: torch.Tensor | None = None,
    writer: ShardWriter | None = None,
) -> ReferenceLogps:
    """One no-grad pass over ``dataloader``; every rank computes its shard, the rows are merged on every rank.

    ``table``: rows already known (from shards; NaN where not); a batch whose rows are all known is skipped.
    ``writer``: where arriving rows are saved as they come. A stop signal saves them and raises ``Preempted``."""
    was_training = model.training
    model.eval()
    table = torch.full((rows, COLUMNS), float("nan"), dtype=torch.float32) if table is None else table
    covered = ~torch.isnan(table[:, 0])
    start, done = time.perf_counter(), 0
    bar = _progress_bar(accelerator, rows, int(covered.sum()))
    try:
        for batch in dataloader:
            needed, stop = agreed(accelerator, not bool(covered[batch["index"].cpu()].all()), requested() is not None)
            if stop:
                _stop(accelerator, writer, covered)
            if not needed:  # every rank's rows came from the shards
                continue
            lp = logprob_fn(model, batch)
            half = batch["index"].shape[0]
            shared, _ = shared_and_tail_sums(lp)
            local = torch.stack(
                [lp.sums[:half], lp.counts[:half].float(), lp.sums[half:], lp.counts[half:].float()]
                + [shared[:half], shared[half:]],
                1,
            )
            merged_index, merged = gather_indexed(accelerator, batch["index"], local)
            table[merged_index] = merged
            covered[merged_index] = True
            if writer is not None:
                writer.add(merged_index, merged)
            done += merged_index.numel()
            bar.update(min(merged_index.numel(), rows - bar.n))
            bar.set_postfix(pairs_per_s=f"{done / (time.perf_counter() - start):.1f}")
    finally:
        bar.close()
        model.train(was_training)
    missing = int(torch.isnan(table[:, 0]).sum())
    if missing:
        raise RuntimeError(f"reference pass left {missing} of {rows} dataset indices without log-probs")
    return ReferenceLogps.from_tensor(table)


def _known_rows(accelerator: Any, path: Path, key: str, rows: int, lock: BuilderLock) -> tuple[torch.Tensor, Any]:
    """(the rows known so far, NaN elsewhere; the shard writer or None), the same table on every rank. The main
    process takes the builder lock; holding it, it replays the shards (or loads a cache another run just finished)."""
    table = torch.full((rows, COLUMNS), float("nan"), dtype=torch.float32)
    writer = None
    if accelerator.is_main_process:
        if lock.acquire():
            cached, _ = check(path, key, rows)  # another run may have finished it since we looked
            if cached is not None:
                table = cached.as_tensor().to(torch.float32)
            else:
                seq = read_shards(lock.folder, key, table, accelerator.print)
                writer = ShardWriter(lock.folder, key, rows, seq, max(1, rows // 64), log=accelerator.print)
        else:
            accelerator.print(
                f"reference log-probs: another run is building {path}; computing here too, without shards"
            )
    if accelerator.num_processes > 1:
        # accelerate is slow to import: --help, validation and the planner never need it
        from accelerate.utils import broadcast

        table = broadcast(table.to(accelerator.device), from_process=0).cpu()
    known = int((~torch.isnan(table[:, 0])).sum())
    if known:
        accelerator.print(f"reference log-probs: continuing a partial pass, {known} of {rows} pairs already done")
    return table, writer


def get_reference(
    model: Any, dataloader: Any, accelerator: Any, logprob_fn: LogprobFn, rows: int, cache_dir: str, key: str
) -> ReferenceLogps:
    """Load the cache for ``key`` if it is valid, else compute it (continuing from its shards) and let the main
    process save it."""
    path = cache_file(cache_dir, key)
    cached, problem = check(path, key, rows)
    if cached is not None:
        accelerator.print(f"reference log-probs: loaded from cache {path}")
        return cached
    if problem != "missing":
        accelerator.print(f"warning: reference cache {path} not used: {problem}; rebuilding it")
    accelerator.print(f"reference log-probs: computing ({rows} pairs); cache {path}")
    check_room_for_reference(accelerator, path, rows)  # before the pass, not after it
    lock = BuilderLock(parts_dir(path))
    try:
        table, writer = _known_rows(accelerator, path, key, rows, lock)
        reference = compute(model, dataloader, accelerator, logprob_fn, rows, table, writer)
        error = None
        if accelerator.is_main_process:
            try:
                save(path, key, reference)
            except OSError as err:
                error = err
            if writer is not None and error is None:
                remove_parts(lock.folder)  # only the lock holder owns the shards
        reference_written(accelerator, path, rows, error)
    finally:
        lock.release()
    accelerator.wait_for_everyone()
    return reference
