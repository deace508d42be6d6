"""Step checkpoints on the Hugging Face Hub (``--push_checkpoints_to_hub``): each complete ``step_N`` folder goes to
branch ``step_N`` of the ``--push_to_hub`` repo, and a run with no local checkpoint resumes from the Hub.

Pushing: the main process hard-links the checkpoint's files under ``<output_dir>/.hub_uploads/step_N`` (instant, no
copy; pruning or the next save unlinks the originals, never these) and a background thread uploads that snapshot, so a
training step only waits for the links. A branch gets the files in one commit and the ``COMPLETED`` marker in a second:
a branch cut short by a kill or a failed upload has no marker and is never resumed from. Each push is retried as
``report/hub_retry.py`` says (the final model's policy); when it fails for good, one ``warning:`` line and training
goes on. Branches are pruned like local
folders (``--keep_last_n_checkpoints``). The run waits for pending uploads at its end and prints one summary line.

Resuming: with no complete local checkpoint (and no ``--resume_from_checkpoint``), the newest branch holding the marker
is downloaded into ``<output_dir>/step_N`` (into a hidden folder first, renamed when whole). A Hub that cannot be
reached at that point stops the run: starting afresh would silently throw the pushed progress away.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from open_instruct.errors import UserError
from open_instruct.report.hub import push_later_command, resolve_repo_id
from open_instruct.report.hub_retry import FIRST_DELAY, HubGaveUp, RetryPolicy, with_retries
from open_instruct.settings import CheckpointSettings, HubSettings
from open_instruct.training.checkpointing import COMPLETED, latest_complete_checkpoint, step_of

UPLOADS = ".hub_uploads"
DOWNLOADS = ".hub_downloads"


def hard_link_snapshot(folder: Path, target: Path) -> Path:
    """``target`` holding hard links to every file under ``folder`` (same file system: no data is copied; a file
    system without hard links gets copies, slower but still safe from pruning)."""
    shutil.rmtree(target, ignore_errors=True)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            link = target / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, link)
            except OSError:
                shutil.copy2(path, link)
    return target


def push_checkpoint(api: Any, repo_id: str, folder: Path, branch: str, private: bool = True) -> None:
    """Branch ``branch`` (made afresh: an earlier push of that step may have left its marker) with the files of
    ``folder``, then, in a second commit, its ``COMPLETED`` marker."""
    api.create_repo(repo_id, private=private, exist_ok=True)
    if branch in (name for _, name in step_branches(api, repo_id)):
        api.delete_branch(repo_id, branch=branch)
    api.create_branch(repo_id, branch=branch, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        revision=branch,
        commit_message=f"checkpoint {branch}: files",
        ignore_patterns=[COMPLETED],
    )
    api.upload_file(
        path_or_fileobj=str(folder / COMPLETED),
        path_in_repo=COMPLETED,
        repo_id=repo_id,
        revision=branch,
        commit_message=f"checkpoint {branch}: complete",
    )


def step_branches(api: Any, repo_id: str) -> list[tuple[int, str]]:
    """The repo's ``step_N`` branches, oldest first."""
    names = [b.name for b in api.list_repo_refs(repo_id).branches]
    return sorted((step, name) for name in names if (step := step_of(name)) is not None)


def prune_branches(api: Any, repo_id: str, newest: int, keep_last_n: int) -> list[str]:
    """As local pruning does: below the just-pushed step ``newest``, delete branches without a marker and complete ones
    beyond the newest ``keep_last_n`` (counting ``newest``; -1 keeps all). Returns the deleted names."""
    doomed, kept = [], 1
    for step, name in reversed(step_branches(api, repo_id)):
        if step >= newest:
            continue
        complete = api.file_exists(repo_id, COMPLETED, revision=name)
        if complete and (keep_last_n < 0 or kept < keep_last_n):
            kept += 1
        else:
            doomed.append(name)
    for name in doomed:
        api.delete_branch(repo_id, branch=name)
    return doomed


class CheckpointPusher:
    """Pushes complete checkpoints in a background thread: :meth:`submit` from the training loop, :meth:`close` at
    the end (waits, prints the summary)."""

    def __init__(
        self,
        output_dir: str | Path,
        repo_id: str,
        keep_last_n: int,
        private: bool = True,
        backoff: float = FIRST_DELAY,
        policy: RetryPolicy | None = None,
    ) -> None:
        # only a Hub call needs huggingface_hub
        from huggingface_hub import HfApi

        self.api, self.repo_id, self.keep_last_n = HfApi(), repo_id, keep_last_n
        self.private, self.policy = private, policy or RetryPolicy(first_delay=backoff)
        self.output_dir, self.uploads = Path(output_dir), Path(output_dir) / UPLOADS
        self.pushed: list[str] = []
        self.failed: list[str] = []
        self.longest_wait = 0.0  # seconds a training step spent in submit(): the snapshot and the hand-over
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="hub-checkpoints", daemon=True)
        self._thread.start()

    def submit(self, checkpoint: Path) -> None:
        """Snapshot ``checkpoint`` and queue its push; returns at once."""
        start = time.perf_counter()
        try:
            self._queue.put(hard_link_snapshot(Path(checkpoint), self.uploads / Path(checkpoint).name))
        except OSError as err:  # a full disk: the push is lost, the run and its local checkpoint are not
            self.failed.append(Path(checkpoint).name)
            print(f"warning: could not stage {checkpoint} for the Hub ({err}); training goes on", file=sys.stderr)
        self.longest_wait = max(self.longest_wait, time.perf_counter() - start)

    def _work(self) -> None:
        while (snapshot := self._queue.get()) is not None:
            try:
                self._push_with_retries(snapshot)
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)

    def _push_with_retries(self, snapshot: Path) -> None:
        branch = snapshot.name
        try:
            with_retries(lambda: push_checkpoint(self.api, self.repo_id, snapshot, branch, self.private), self.policy)
        except HubGaveUp as err:  # reported, never fatal: the checkpoint is still on the local disk
            self.failed.append(branch)
            print(
                f"warning: could not push checkpoint {branch} to the Hub ({self.repo_id}) {err}; training goes on, "
                "the checkpoint is kept locally",
                file=sys.stderr,
                flush=True,
            )
            return
        self.pushed.append(branch)
        try:
            prune_branches(self.api, self.repo_id, step_of(branch) or 0, self.keep_last_n)
        except Exception as err:  # old branches left behind cost space, not progress
            print(f"warning: could not prune old checkpoint branches of {self.repo_id}: {err}", file=sys.stderr)

    def close(self) -> str:
        """Wait for every queued push; print and return the one-line summary."""
        self._queue.put(None)
        self._thread.join()
        with contextlib.suppress(OSError):
            self.uploads.rmdir()
        failed = ""
        if self.failed:  # the run's end says how to retry them without retraining
            later = push_later_command(self.output_dir, self.repo_id)
            failed = f" ({', '.join(self.failed)}); push the ones still on disk later with: {later} --push_checkpoints"
        line = (
            f"Hub checkpoints: {len(self.pushed)} pushed to {self.repo_id} "
            f"(branches {', '.join(self.pushed) or 'none'}), {len(self.failed)} failed{failed}; "
            f"longest wait of a training step on an upload: {self.longest_wait * 1000:.1f} ms"
        )
        print(line, flush=True)
        return line


@contextlib.contextmanager
def pushing(faults: Any, hub: HubSettings, checkpoint: CheckpointSettings, repo_id: str | None) -> Iterator[None]:
    """Within the block, every complete checkpoint the loop saves (scheduled or at a stop signal) is pushed; on the way
    out (also a preemption's), pending pushes are waited for. ``repo_id`` None (other ranks, flag off): nothing."""
    if not hub.push_checkpoints_to_hub or repo_id is None:
        yield
        return
    pusher = CheckpointPusher(checkpoint.output_dir, repo_id, checkpoint.keep_last_n_checkpoints, hub.hf_repo_private)
    for policy in {id(p): p for p in (faults.policy, faults.preemption) if p is not None}.values():
        policy.on_complete = pusher.submit
    try:
        yield
    finally:
        pusher.close()


def resolve_and_fetch(hub: HubSettings, checkpoint: CheckpointSettings, accelerator: Any) -> str | None:
    """The ``--push_to_hub`` repo (main process; None elsewhere or without the flag), and, with no local checkpoint,
    the newest complete one on the Hub in the output folder (the main process first: on a shared disk the others then
    find it there)."""
    repo_id = resolve_repo_id(hub) if hub.push_to_hub and accelerator.is_main_process else None
    with accelerator.main_process_first():
        fetch_for_resume(hub, checkpoint, repo_id, accelerator.print)
    return repo_id


def download_checkpoint(api: Any, repo_id: str, branch: str, output_dir: Path) -> Path:
    """Branch ``branch`` as ``<output_dir>/<branch>``: downloaded into a hidden folder, renamed into place when whole."""
    # only a Hub call needs huggingface_hub
    from huggingface_hub import snapshot_download

    staging = output_dir / DOWNLOADS / f"{branch}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    snapshot_download(repo_id, revision=branch, local_dir=staging, endpoint=api.endpoint)
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping, not the checkpoint's
    if not (staging / COMPLETED).is_file():
        raise UserError(f"checkpoint branch {branch} of {repo_id} lost its {COMPLETED} marker while downloading")
    target = output_dir / branch
    shutil.rmtree(target, ignore_errors=True)  # an incomplete local folder of that step
    staging.rename(target)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()
    return target


def newest_on_hub(api: Any, repo_id: str) -> str | None:
    """The newest ``step_N`` branch holding the ``COMPLETED`` marker; None when the repo or such a branch is missing."""
    # only a Hub call needs huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        branches = step_branches(api, repo_id)
    except RepositoryNotFoundError:
        return None
    for _, name in reversed(branches):
        if api.file_exists(repo_id, COMPLETED, revision=name):
            return name
    return None


def fetch_for_resume(
    hub: HubSettings, checkpoint: CheckpointSettings, repo_id: str | None, log: Any = print
) -> Path | None:
    """With ``--push_checkpoints_to_hub`` and no complete local checkpoint to resume from, download the newest complete
    one from the Hub into the output folder; returns it (None: nothing to fetch). An unreachable Hub is an error."""
    output_dir = Path(checkpoint.output_dir)
    if not hub.push_checkpoints_to_hub or checkpoint.resume_from_checkpoint:
        return None
    if latest_complete_checkpoint(output_dir)[0] is not None:
        return None
    # only a Hub call needs huggingface_hub
    from huggingface_hub import HfApi

    repo_id = repo_id or resolve_repo_id(hub)
    api = HfApi()
    try:
        branch = newest_on_hub(api, repo_id)
        if branch is None:
            log(f"no complete checkpoint on the Hub ({repo_id}): a new run")
            return None
        path = download_checkpoint(api, repo_id, branch, output_dir)
    except UserError:
        raise
    except Exception as err:  # offline, refused, 5xx: starting afresh would throw the pushed progress away
        raise UserError(
            f"--push_checkpoints_to_hub: no local checkpoint in {output_dir} and the Hub ({repo_id}) cannot be "
            f"reached to look for one ({type(err).__name__}: {err}); rerun when it can, or without "
            "--push_checkpoints_to_hub to start afresh"
        ) from None
    log(f"downloaded checkpoint {branch} from the Hub ({repo_id}) into {path}")
    return path
