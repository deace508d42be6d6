"""Push the final model to the Hugging Face Hub (``--push_to_hub``).

The token comes from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``); it is never a flag, never
printed and never written to the run's files. ``HF_ENDPOINT`` points the client at another Hub (tests use a loopback
server).
"""

from __future__ import annotations

from pathlib import Path

from open_instruct.errors import UserError
from open_instruct.report.hub_retry import HubGaveUp, RetryPolicy, with_retries
from open_instruct.settings import HubSettings

# What a final checkpoint folder holds besides the model that should not go to the Hub: training state, caches and
# anything hidden (temporary files).
IGNORE_PATTERNS = ["step_*", "step_*/**", ".*", "**/.*", "wandb/**", "*.tmp"]


def hub_repo_id(hub: HubSettings, whoami: str | None = None) -> str:
    """``--hf_repo_id`` (``name`` or ``owner/name``, default ``--exp_name``) under ``--hf_entity`` or the token's user."""
    name = hub.hf_repo_id or hub.exp_name
    if "/" in name:
        return name
    entity = hub.hf_entity or whoami
    if not entity:
        raise UserError(
            "--push_to_hub needs --hf_entity or an owner/name --hf_repo_id (or a token to look up the user)"
        )
    return f"{entity}/{name}"


def push_folder(
    folder: str | Path,
    repo_id: str,
    revision: str | None = None,
    private: bool = True,
    commit_message: str = "DPO final model",
    policy: RetryPolicy | None = None,
) -> str:
    """Create the repo (and branch) if missing, upload ``folder`` minus training leftovers, each try of the three as
    the retry policy says (:class:`HubGaveUp` when it fails for good); returns the web URL. Only reads ``folder``."""
    # only a Hub call needs huggingface_hub
    from huggingface_hub import HfApi

    api = HfApi()

    def push() -> None:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=IGNORE_PATTERNS,
        )

    with_retries(push, policy)
    url = f"{api.endpoint}/{repo_id}"
    return f"{url}/tree/{revision}" if revision else url


def push_later_command(output_dir: str | Path, repo_id: str, revision: str | None = None) -> str:
    """The command that pushes ``output_dir`` to the same place later, without retraining."""
    branch = f" --hf_repo_revision {revision}" if revision else ""
    return f"python -m open_instruct.report.push_to_hub --output_dir {output_dir} --hf_repo_id {repo_id}{branch}"


def failed_push_line(output_dir: str | Path, repo_id: str, revision: str | None, err: HubGaveUp) -> str:
    """The one line a push that failed for good ends with: why, where the local model is, how to push it later."""
    return (
        f"push to the Hub ({repo_id}) failed {err}; the local model is kept at {output_dir}; "
        f"push it later with: {push_later_command(output_dir, repo_id, revision)}"
    )


def resolve_repo_id(hub: HubSettings) -> str:
    """The target repo, looking up the token's user when no owner is given (call before training: fails early)."""
    whoami = None
    if "/" not in (hub.hf_repo_id or "") and not hub.hf_entity:
        # only a Hub call needs huggingface_hub
        from huggingface_hub import HfApi

        try:
            whoami = HfApi().whoami()["name"]
        except Exception as err:  # no token, offline, bad token: the user needs the reason, not a traceback
            raise UserError(
                f"--push_to_hub: cannot look up the Hub user ({type(err).__name__}); pass --hf_entity "
                "or an owner/name --hf_repo_id, and set HF_TOKEN"
            ) from None
    return hub_repo_id(hub, whoami)


def push_final_model(
    output_dir: str | Path, hub: HubSettings, repo_id: str | None = None, policy: RetryPolicy | None = None
) -> str:
    """Upload the final model in ``output_dir`` as the flags say and print its URL (one ``error:`` line, the local
    model kept, when the Hub fails for good)."""
    repo_id = repo_id or resolve_repo_id(hub)
    try:
        url = push_folder(output_dir, repo_id, hub.hf_repo_revision, hub.hf_repo_private, policy=policy)
    except HubGaveUp as err:
        raise UserError(failed_push_line(output_dir, repo_id, hub.hf_repo_revision, err)) from None
    print(f"pushed the final model to {url}")
    return url
