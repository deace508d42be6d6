"""Push a finished run's output folder to the Hub later, without retraining (after a push that failed, or a run
without ``--push_to_hub``).

python -m open_instruct.report.push_to_hub --output_dir OUT [--hf_repo_id NAME|OWNER/NAME] [--hf_entity OWNER]
    [--hf_repo_revision BRANCH] [--hf_repo_private true|false] [--push_checkpoints]

The flags mean what they mean for training; each one left out is taken from the run's ``OUT/run_config.json`` (then
the training defaults), so ``--output_dir`` alone pushes where the run would have. The folder must hold a complete
final model (config, weights, tokenizer); otherwise one ``error:`` line names what is missing, before any Hub call.
``--push_checkpoints`` also pushes each complete ``step_N`` folder to branch ``step_N``, as
``--push_checkpoints_to_hub`` does. Uploads follow ``report/hub_retry.py``'s policy and only read the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from open_instruct.errors import UserError
from open_instruct.integrity import safetensors_problem
from open_instruct.report.hub import push_final_model, push_later_command, resolve_repo_id
from open_instruct.report.hub_retry import HubGaveUp, RetryPolicy, with_retries
from open_instruct.settings import HubSettings
from open_instruct.training.checkpointing import is_complete, list_checkpoints
from open_instruct.training.hub_checkpoints import push_checkpoint

RUN_CONFIG = "run_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _weights_file_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (missing, or not as long as its header says); None when whole."""
    if not path.is_file():
        return f"{path.name} (missing)"
    problem = safetensors_problem(path)
    return f"{path.name} ({problem})" if problem else None


def weights_problems(folder: Path) -> list[str]:
    """What is wrong with the model weights in ``folder`` (one file or an index and its shards)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [p for shard in shards if (p := _weights_file_problem(folder / shard))]
    if (folder / "pytorch_model.bin").is_file():
        return []
    problem = _weights_file_problem(folder / "model.safetensors")
    return [problem] if problem else []


def missing_parts(folder: Path) -> list[str]:
    """What a complete final model lacks in ``folder``: config, weights, tokenizer (empty: complete)."""
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    missing += weights_problems(folder)
    if not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer file ({' or '.join(TOKENIZER_FILES)})")
    return missing


def hub_settings(output_dir: Path, ns: argparse.Namespace) -> HubSettings:
    """The Hub target: each flag given, else the run's ``run_config.json``, else the training default."""
    saved = json.loads((output_dir / RUN_CONFIG).read_text()) if (output_dir / RUN_CONFIG).is_file() else {}

    def pick(name: str, default: object) -> object:
        value = getattr(ns, name)
        return value if value is not None else saved.get(name, default)

    repo_id = pick("hf_repo_id", None) or saved.get("save_to_hub")  # --save_to_hub is --hf_repo_id's other name
    return HubSettings(
        push_to_hub=True,
        push_checkpoints_to_hub=ns.push_checkpoints,
        exp_name=str(pick("exp_name", "dpo")),
        hf_entity=pick("hf_entity", None),
        hf_repo_id=repo_id,
        hf_repo_revision=pick("hf_repo_revision", None),
        hf_repo_private=bool(pick("hf_repo_private", True)),
    )


def push_checkpoints(output_dir: Path, repo_id: str, private: bool, policy: RetryPolicy | None = None) -> list[str]:
    """Push every complete ``step_N`` folder to branch ``step_N``; returns the branch names."""
    # only a Hub call needs huggingface_hub
    from huggingface_hub import HfApi

    api, pushed = HfApi(), []
    for _, folder in list_checkpoints(output_dir):
        if not is_complete(folder):
            continue
        try:
            with_retries(lambda f=folder: push_checkpoint(api, repo_id, f, f.name, private), policy)
        except HubGaveUp as err:
            raise UserError(
                f"push of checkpoint {folder} to the Hub ({repo_id}) failed {err}; the local checkpoint is kept; "
                f"push it later with: {push_later_command(output_dir, repo_id)} --push_checkpoints"
            ) from None
        pushed.append(folder.name)
    return pushed


def push_output_folder(ns: argparse.Namespace, policy: RetryPolicy | None = None) -> str:
    """Check the folder, then push its final model (and, asked, its checkpoints); returns the model's URL."""
    output_dir = Path(ns.output_dir)
    if not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is not a folder; pass a finished run's output folder")
    missing = missing_parts(output_dir)
    if missing:
        raise UserError(
            f"{output_dir} holds no complete final model: {', '.join(missing)}; "
            "pass the output folder of a run that finished (its final save writes these)"
        )
    hub = hub_settings(output_dir, ns)
    repo_id = resolve_repo_id(hub)
    url = push_final_model(output_dir, hub, repo_id, policy)
    if ns.push_checkpoints:
        branches = push_checkpoints(output_dir, repo_id, hub.hf_repo_private, policy)
        print(f"pushed {len(branches)} checkpoints to {repo_id} (branches {', '.join(branches) or 'none'})")
    return url


def _flag_bool(text: str) -> bool:
    """``true``/``false`` (and 1/0, yes/no), as the training flag reads them."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's flags (named as for training)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="a finished run's output folder")
    parser.add_argument("--hf_repo_id", help="name or owner/name (default: the run's, else --exp_name)")
    parser.add_argument("--hf_entity", help="the owner when --hf_repo_id has none (default: the run's, else you)")
    parser.add_argument("--exp_name", help="the repo name when --hf_repo_id is not given (default: the run's)")
    parser.add_argument("--hf_repo_revision", help="the branch (default: the run's, else main)")
    parser.add_argument(
        "--hf_repo_private",
        type=_flag_bool,
        nargs="?",
        const=True,
        help="true or false (default: the run's, else true)",
    )
    parser.add_argument("--push_checkpoints", action="store_true", help="also push each complete step_N folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, policy: RetryPolicy | None = None) -> None:
    """Command line: one ``error:`` line and exit code 2 when the folder or the push fails."""
    try:
        push_output_folder(parse_args(argv), policy)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
