"""Full disks in whole runs: the prepared-data cache, the reference cache and a checkpoint that cannot be written each
end the run with one line naming the path and the bytes, leave every earlier cache and checkpoint intact, and the same
command goes on once the fault is gone; on two ZeRO-2 processes a write that fails on rank 1 only, inside DeepSpeed's
save, ends both processes promptly (no hang in mismatched collectives).

The faults are real ``OSError(ENOSPC)`` raised by the writes themselves through ``OPEN_INSTRUCT_TEST_ENOSPC`` (see
open_instruct/disk_space.py); a real full tmpfs is in tests/test_disk_space.py and tests/training/test_space_checks.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from open_instruct.training.checkpointing import COMPLETED, latest_complete_checkpoint
from tests.conftest import ROOT, distributed_env, read_metrics, run_cli, small_run_args, torchrun_command
from tests.test_disk_space import small_tmpfs, unmount

pytestmark = pytest.mark.slow

PAIRS = 16  # 8 per step: 2 optimizer steps, a checkpoint after each


def _size(folder: Path) -> int:
    """What a checkpoint's save wrote before its one-line COMPLETED marker."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "COMPLETED")


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _flags(tiny_model_dir: Path, synthetic_data, out: Path, dcache: Path, **extra: str) -> list[str]:
    """A run of PAIRS pairs that checkpoints every step, its prepared data cached in ``dcache``."""
    train = synthetic_data[0]
    return small_run_args(
        tiny_model_dir, train, out, mixer_list=[str(train), str(PAIRS)], checkpointing_steps="1",
        dataset_local_cache_dir=str(dcache), **extra,
    )  # fmt: skip


def _run(args: list[str], cache: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    return run_cli(args, cache, extra_env={"OPEN_INSTRUCT_TEST_ENOSPC": fault} if fault else None)


def test_full_disk_in_each_cache_and_a_checkpoint_then_the_same_command_finishes(
    tiny_model_dir, synthetic_data, tmp_path
):
    refcache, dcache, out = tmp_path / "refcache", tmp_path / "dcache", tmp_path / "out"
    args = _flags(tiny_model_dir, synthetic_data, out, dcache)

    # 1. The prepared-data cache cannot be written: one line, no entry, no temporary folder.
    result = _run(args, refcache, fault="dcache/.:*")
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = _errors(result.stderr)
    assert line.startswith(f"error: cannot write the prepared-data cache {dcache}/") and "No space left" in line
    assert "rerun the same command" in line and list(dcache.iterdir()) == []

    # 2. The reference cache's final file cannot be written: one line naming it and its bytes; its shards stay.
    result = _run(args, refcache, fault="refcache/.:*")
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = _errors(result.stderr)
    [cache_file] = [p for p in refcache.iterdir() if p.suffix == ".parts"]
    table_bytes = PAIRS * 6 * 4 + 4096
    assert line.startswith(
        f"error: cannot write the reference cache {cache_file.with_suffix('.pt')}: No space left on device; "
        f"it needs about {table_bytes:,} bytes"
    ), line
    assert sorted(p.name for p in refcache.iterdir()) == [cache_file.name]  # no cache file, no temporary file
    assert any(cache_file.iterdir())

    # 3. Rerun: the pass continues from its shards, trains, and checkpoint step_2 cannot be written.
    result = _run(args, refcache, fault="step_2/:*")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"continuing a partial pass, {PAIRS} of {PAIRS} pairs already done" in result.stdout
    assert cache_file.with_suffix(".pt").is_file() and not cache_file.exists()
    step_1 = out / "step_1"
    [line] = _errors(result.stderr)
    assert line.startswith(
        f"error: could not write checkpoint {out / 'step_2'}: No space left on device; "
        f"it needs about {_size(step_1):,} bytes"
    ), line
    assert line.endswith(f"the previous checkpoint {step_1} is intact and a rerun resumes from it")
    assert not (out / "step_2").exists() and latest_complete_checkpoint(out) == (step_1, [])
    before = _files(step_1)

    # 4. The same command without the fault resumes from step_1 and finishes.
    result = _run(args, refcache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {step_1}" in result.stdout and (out / "model.safetensors").is_file()
    assert [row["training_step"] for row in read_metrics(out)] == [1, 2]
    assert (out / "step_2" / COMPLETED).is_file() and _files(step_1) == before


def test_a_write_failing_on_rank_1_inside_deepspeeds_save_ends_both_ranks_promptly(
    tiny_model_dir, synthetic_data, tmp_path
):
    """Rank 1's ZeRO-2 optimizer shard of step_2 cannot be written. Both ranks must leave DeepSpeed's save through its
    barriers together and exit with the one line; before the fix rank 0 waited in DeepSpeed's last barrier while
    rank 1 waited in the next all-reduce, until the collective timeout."""
    out = tmp_path / "out"
    flags = _flags(
        tiny_model_dir, synthetic_data, out, tmp_path / "dcache", per_device_train_batch_size="4", zero_stage="2"
    )
    env = {**distributed_env(tmp_path / "cache"), "OPEN_INSTRUCT_TEST_ENOSPC": "step_2/pytorch_model/zero_pp_rank_1:1"}
    proc = subprocess.Popen(
        torchrun_command(flags),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a hang is ended with its workers, not only the launcher
    )
    try:
        deadline = time.monotonic() + 540
        while not (out / "step_2").exists() and proc.poll() is None:  # the save of step_2 has begun
            assert time.monotonic() < deadline, "step_2 never started"
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=45)  # bounded: a hang fails here
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode != 0, output[-3000:]
    lines = {line.split("; it needs")[0] for line in output.splitlines() if line.startswith("error:")}
    assert lines == {f"error: could not write checkpoint {out / 'step_2'}: No space left on device"}, output[-3000:]
    step_1 = out / "step_1"
    assert f"it needs about {_size(step_1):,} bytes" in output
    assert not (out / "step_2").exists() and latest_complete_checkpoint(out) == (step_1, [])


def test_a_checkpoint_that_cannot_fit_on_a_small_file_system_is_refused_then_resumed(
    tiny_model_dir, synthetic_data, tmp_path
):
    """A real 2.5 MB tmpfs as --output_dir: the tiny model's first checkpoint (about 1.7 MB) fits, a second cannot (the
    first is pruned only after it): a warning at the start, the refusal before step_2's write, then the same command
    on the enlarged file system resumes and finishes."""
    out = small_tmpfs(tmp_path / "out", "2500k")
    try:
        args = _flags(tiny_model_dir, synthetic_data, out, tmp_path / "dcache")
        result = _run(args, tmp_path / "refcache")
        assert result.returncode == 2, result.stderr[-3000:]
        assert f"warning: {out} has " in result.stdout and "the final model" in result.stdout
        step_1 = out / "step_1"
        [line] = _errors(result.stderr)
        assert line.startswith(
            f"error: not enough free space to write checkpoint {out / 'step_2'}: it needs about {_size(step_1):,} "
            "bytes"
        ), line
        # The free figure is the one at the check; the run's .run.lock file (one block) is removed after it.
        free_then = int(re.search(r"the size of step_1, and ([\d,]+) bytes", line).group(1).replace(",", ""))
        assert 0 <= shutil.disk_usage(out).free - free_then <= 8192, line
        assert not (out / "step_2").exists() and latest_complete_checkpoint(out) == (step_1, [])
        before = _files(step_1)
        subprocess.run(["mount", "-o", "remount,size=8m", str(out)], check=True)
        result = _run(args, tmp_path / "refcache")
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"resuming from {step_1}" in result.stdout and (out / "model.safetensors").is_file()
        assert _files(step_1) == before and (out / "step_2" / COMPLETED).is_file()
    finally:
        unmount(out)
